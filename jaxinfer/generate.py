"""Static-batch generation over a contiguous KV cache, as two jitted calls.

Legend: B rows, T prompt tokens (padded), S cache slots, M max new tokens,
N top logprobs, V vocab.

``prefill`` runs the prompts (right-padded; rows of different lengths) and
samples each row's first token; ``decode`` is a ``lax.while_loop`` that feeds the
last token back until every row has stopped or ``max_steps`` ran out. The host
calls ``decode`` once (the whole generation on device) or in segments to stream.
Rows stop on their own stop token ids (honouring min_tokens) and max_tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, KVCache, init_contiguous
from jaxinfer.kv.quant import KVQuantSpec
from jaxinfer.model import Weights, forward, loop_layout
from jaxinfer.sampling import (Penalties, PenaltyInputs, RowLimits, SamplingTensors, block_stop_tokens, sample,
                               token_logprobs)

RUNNING, STOPPED, LENGTH = 0, 1, 2  # finish codes


@dataclasses.dataclass(frozen=True)
class GenerateStatics:
    """Everything that changes the compiled program (hashable)."""

    max_len: int  # S: cache slots per row
    max_new: int  # M: output slots per row
    num_logprobs: int = -1  # N top logprobs per generated token; -1: none
    num_prompt_logprobs: int = -1  # likewise for prompt tokens; -1: none
    backend: str = "xla"
    kv_quant: KVQuantSpec | None = None  # quantized KV cache (None: the model dtype)
    greedy: bool = False  # every row is greedy: the sampler's filters and draw are not compiled


@struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B] last sampled token, the next step's input
    kv: KVCache
    kv_lens: jax.Array  # [B] tokens in cache
    num_generated: jax.Array  # [B]
    finish: jax.Array  # [B] RUNNING / STOPPED / LENGTH
    out_tokens: jax.Array  # [B, M]
    out_logprobs: jax.Array  # [B, M]    (M = 0 when logprobs are off)
    out_ranks: jax.Array  # [B, M]
    out_top_ids: jax.Array  # [B, M, N]
    out_top_logprobs: jax.Array  # [B, M, N]
    pen: Penalties | None = None  # penalties, logit_bias, allowed_token_ids (None: no row has any)


def _emit(state: DecodeState, logits, st: SamplingTensors, limits: RowLimits,
          statics: GenerateStatics, active) -> DecodeState:
    """Sample the next token of every active row from logits [B, V] and record it (its
    logprobs are the model's, before penalties, as vLLM reports them)."""
    logits = block_stop_tokens(logits, limits, state.num_generated)
    shaped = logits if state.pen is None else state.pen.apply(logits)
    tok = sample(shaped, st, state.num_generated, statics.greedy)  # [B]
    b = jnp.arange(tok.shape[0])
    slot = jnp.where(active, state.num_generated, statics.max_new)  # inactive rows: dropped
    out_tokens = state.out_tokens.at[b, slot].set(tok, mode="drop")
    extras = {}
    if statics.num_logprobs >= 0:
        lp, rank, top_ids, top_lp = token_logprobs(logits, tok, statics.num_logprobs)
        extras = dict(
            out_logprobs=state.out_logprobs.at[b, slot].set(lp, mode="drop"),
            out_ranks=state.out_ranks.at[b, slot].set(rank, mode="drop"),
            out_top_ids=state.out_top_ids.at[b, slot].set(top_ids, mode="drop"),
            out_top_logprobs=state.out_top_logprobs.at[b, slot].set(top_lp, mode="drop"))
    num_generated = state.num_generated + active
    hit_stop = jnp.any(tok[:, None] == limits.stop_ids, axis=-1)
    finish = jnp.where(active & hit_stop, STOPPED, state.finish)
    finish = jnp.where(active & (finish == RUNNING) & (num_generated >= limits.max_tokens),
                       LENGTH, finish)
    if state.pen is not None:
        extras["pen"] = state.pen.record(tok, active)
    return state.replace(tokens=jnp.where(active, tok, state.tokens), out_tokens=out_tokens,
                         num_generated=num_generated, finish=finish, **extras)


def prompt_forward(weights: Weights, cfg: ModelConfig, max_len: int, backend: str, kv_quant: KVQuantSpec | None,
                   tokens: jax.Array, prompt_lens: jax.Array, all_positions: bool = False):
    """Prompts tokens [B, T] (right-padded) into a fresh contiguous cache of max_len slots per row.

    Returns (logits, kv): logits [B, 1, V] at each row's last prompt token, or [B, T, V] at every
    position when all_positions (prompt logprobs)."""
    b, t = tokens.shape
    kv, page_table = init_contiguous(cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim, weights.dtype,
                                     kv_quant)
    meta = AttentionMeta(page_table=page_table, kv_lens=prompt_lens, q_lens=prompt_lens, contiguous=True,
                         fresh=True)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    last = jnp.maximum(prompt_lens - 1, 0)[:, None]  # [B, 1]
    logits, _, kv = forward(weights, cfg, tokens, positions, kv, meta, backend=backend,
                            logits_at=None if all_positions else last)
    return logits, kv


def first_cache_window(longest_prompt: int, full: int, backend: str) -> int:
    """Slots a growing contiguous cache starts with: the longest prompt plus one, rounded up to 64
    (a power of two for the Pallas kernel, which takes one power-of-two page per row), at most full.

    Every decode step reads every slot, so a cache sized for the end of generation would make each
    early step pay for it; callers double the window (up to full) when the rows outgrow it."""
    window = round_up(longest_prompt + 1, 64)
    if backend == "pallas":
        window = bucket(window)
    return min(full, window)


@functools.partial(jax.jit, static_argnames=("cfg", "statics"))
def prefill(weights: Weights, cfg: ModelConfig, statics: GenerateStatics, tokens: jax.Array,
            prompt_lens: jax.Array, st: SamplingTensors, limits: RowLimits, pen: PenaltyInputs | None = None):
    """Run prompts tokens [B, T] (right-padded to T) and sample each row's first token.

    pen: the rows' penalties (None when no row has any); the decode state then carries their
    token counts.

    Rows with prompt_lens 0 are padding and finish at once. Returns (DecodeState,
    prompt_logprobs): the latter is None unless statics.num_prompt_logprobs >= 0,
    else a tuple (logprob [B, T-1], rank, top_ids [B, T-1, N], top_logprobs) of
    token t+1 given tokens <= t.
    """
    b = tokens.shape[0]
    want_prompt_lp = statics.num_prompt_logprobs >= 0
    logits, kv = prompt_forward(weights, cfg, statics.max_len, statics.backend, statics.kv_quant, tokens,
                                prompt_lens, all_positions=want_prompt_lp)
    prompt_lp = None
    if want_prompt_lp:
        prompt_lp = token_logprobs(logits[:, :-1], tokens[:, 1:], statics.num_prompt_logprobs)
        last = jnp.maximum(prompt_lens - 1, 0)[:, None, None]
        logits = jnp.take_along_axis(logits, last, axis=1)
    m, n = statics.max_new, max(statics.num_logprobs, 0)
    m_lp = m if statics.num_logprobs >= 0 else 0
    state = DecodeState(
        tokens=jnp.zeros((b,), jnp.int32), kv=kv, kv_lens=prompt_lens,
        num_generated=jnp.zeros((b,), jnp.int32),
        finish=jnp.where(prompt_lens > 0, RUNNING, LENGTH).astype(jnp.int32),
        out_tokens=jnp.zeros((b, m), jnp.int32),
        out_logprobs=jnp.zeros((b, m_lp), jnp.float32), out_ranks=jnp.zeros((b, m_lp), jnp.int32),
        out_top_ids=jnp.zeros((b, m_lp, n), jnp.int32),
        out_top_logprobs=jnp.zeros((b, m_lp, n), jnp.float32),
        pen=None if pen is None else pen.build(cfg.vocab_size))
    state = _emit(state, logits[:, 0], st, limits, statics, prompt_lens > 0)
    return state, prompt_lp


@functools.partial(jax.jit, static_argnames=("cfg", "statics"), donate_argnames=("state",))
def decode(weights: Weights, cfg: ModelConfig, statics: GenerateStatics, state: DecodeState,
           st: SamplingTensors, limits: RowLimits, max_steps: jax.Array) -> DecodeState:
    """Up to max_steps decode steps on device; stops early once every row finished."""
    weights = loop_layout(weights)
    b = state.tokens.shape[0]
    page_table = jnp.arange(b, dtype=jnp.int32)[:, None]

    def step(carry):
        i, s = carry
        active = s.finish == RUNNING
        q_lens = active.astype(jnp.int32)
        kv_lens = s.kv_lens + q_lens
        # bf16 caches stored as bits are read whole (`attention_reference`), not a slice at a time
        # (`layers.contiguous_bits_loop`): this cache doubles as rows grow, so it stays at least half full
        meta = AttentionMeta(page_table=page_table, kv_lens=kv_lens, q_lens=q_lens, contiguous=True,
                             bits_loop=False)
        positions = (kv_lens - 1)[:, None]  # [B, 1]
        logits, _, kv = forward(weights, cfg, s.tokens[:, None], positions, s.kv, meta,
                                backend=statics.backend)
        s = s.replace(kv=kv, kv_lens=kv_lens)
        return i + 1, _emit(s, logits[:, 0], st, limits, statics, active)

    def cond(carry):
        i, s = carry
        return (i < max_steps) & jnp.any(s.finish == RUNNING)

    _, state = jax.lax.while_loop(cond, step, (jnp.int32(0), state))
    return state


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= minimum): bounds the number of compiled shapes."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def fine_bucket(n: int, minimum: int = 1, steps: int = 4) -> int:
    """Smallest bucket >= n (and >= minimum) on a grid of `steps` sizes per power of two
    (steps=4: ... 16, 20, 24, 28, 32, 40, 48, ...): at most 1/steps of padding, at most
    `steps` programs per doubling of the size."""
    n = max(n, minimum, 1)
    if n <= steps:
        return n
    octave = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
    grain = max(1, octave // steps)
    return round_up(n, grain)


SHAPE_BUCKETS = ("fine", "pow2", "slots")


def shape_bucket(n: int, minimum: int = 1, grid: str = "fine") -> int:
    """An engine call's rows, tokens or page-table width on `grid`: "fine" (`fine_bucket`, at most
    25% padding) or "pow2" (`bucket`, powers of two: at most 2x padding, about half the programs).
    "slots" is "pow2" here; the engine also gives its decode calls every sequence slot's row."""
    return fine_bucket(n, minimum) if grid == "fine" else bucket(n, minimum)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
