"""Speculative decoding as two jitted calls over a contiguous target cache, mirroring generate.py.

Legend: B rows, T prompt tokens (padded), S cache slots, M max new tokens, k drafted
tokens per round, V vocab, N top logprobs, D model dim.

`spec_prefill` runs the prompts, samples each row's first token exactly as plain
decoding does, and prefills the drafter. `spec_decode` is a `lax.while_loop` of rounds:

    1. the drafter proposes d_1..d_k (and the shaped logits q it drew them from); one that
       may abstain proposes -1 (nothing) and, with widths, fewer than k: the round then
       verifies only as wide as its longest proposal;
    2. ONE target forward over [x_P, d_1..d_k] at positions P..P+k (q_lens = k+1 for
       running rows, 0 for finished ones) gives p_1..p_{k+1} and writes their K/V;
    3. verification (verify.py) accepts n_acc drafts and picks the next token;
    4. the row emits d_1..d_{n_acc}, then that token, cut after the first stop token
       and at max_tokens: n_emit <= n_acc + 1 tokens;
    5. P += n_emit. The K/V of [x_P, d_1..d_{n_emit-1}] are valid (all accepted); the rest
       are rolled back by not advancing the length (masked, overwritten next round).

Rows advance by different amounts; nothing leaves the device inside the loop. Counters
per row: target forwards (rounds), drafted and accepted tokens, for Spec-Bench's
τ = (accepted + forwards) / forwards and the acceptance rate accepted / drafted.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.engine.request import EngineRequest
from jaxinfer.generate import LENGTH, RUNNING, STOPPED, GenerateStatics, bucket, round_up
from jaxinfer.kv.cache import AttentionMeta, KVCache, init_contiguous
from jaxinfer.model import Weights, forward
from jaxinfer.sampling import (Penalties, PenaltyInputs, RowLimits, SamplingTensors, block_stop_tokens, sample,
                               token_logprobs)
from jaxinfer.spec.drafters import DraftContext
from jaxinfer.spec.verify import verify
from jaxinfer.static_batch import StaticBatchGenerator


@dataclasses.dataclass(frozen=True)
class SpecStatics:
    """Everything that changes the compiled program (hashable)."""

    max_len: int  # S: cache slots per row; >= prompt + max_tokens + k
    max_new: int  # M: output slots per row
    num_logprobs: int = -1  # N top logprobs per generated token; -1: none
    num_prompt_logprobs: int = -1
    backend: str = "xla"
    greedy: bool = False  # every row is greedy: the sampling code is not compiled


@struct.dataclass
class SpecState:
    tokens: jax.Array  # [B] last emitted token x_P, the next round's first input
    kv: KVCache  # target cache, [B, K, S, H] per layer
    kv_lens: jax.Array  # [B] P: tokens in the target cache
    history: jax.Array  # [B, S] prompt + output tokens (history[b, P] = x_P)
    num_generated: jax.Array  # [B]
    finish: jax.Array  # [B] RUNNING / STOPPED / LENGTH
    out_tokens: jax.Array  # [B, M]
    out_logprobs: jax.Array  # [B, M]   (M = 0 when logprobs are off)
    out_ranks: jax.Array  # [B, M]
    out_top_ids: jax.Array  # [B, M, N]
    out_top_logprobs: jax.Array  # [B, M, N]
    forwards: jax.Array  # [B] target forwards (verification rounds) while running
    drafted: jax.Array  # [B] drafted tokens
    accepted: jax.Array  # [B] accepted drafted tokens (before stop / max_tokens cuts)
    draft: Any  # the drafter's state
    pen: Penalties | None = None  # penalties, logit_bias, allowed_token_ids (None: no row has any)


def _write(arr: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """arr [B, X, ...] <- values [B, n, ...] at slots [B, n]; out-of-range slots are dropped."""
    b = jnp.arange(arr.shape[0])[:, None]
    return arr.at[b, slots].set(values.astype(arr.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "statics"))
def spec_prefill(weights: Weights, cfg: ModelConfig, drafter, draft_params, statics: SpecStatics,
                 tokens: jax.Array, prompt_lens: jax.Array, st: SamplingTensors, limits: RowLimits,
                 pen: PenaltyInputs | None = None):
    """Run prompts tokens [B, T] (right-padded), sample each row's first token, prefill the drafter.

    The first token is drawn exactly as `generate.prefill` draws it. Rows with prompt_lens 0
    are padding and finish at once. pen: the rows' penalties (None when no row has any); the
    state then carries their token counts. Returns (SpecState, prompt_logprobs or None) like
    `generate.prefill`.
    """
    b, t = tokens.shape
    s, m = statics.max_len, statics.max_new
    kv, page_table = init_contiguous(cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim, weights.dtype)
    meta = AttentionMeta(page_table=page_table, kv_lens=prompt_lens, q_lens=prompt_lens, contiguous=True,
                         fresh=True)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    last = jnp.maximum(prompt_lens - 1, 0)[:, None]  # [B, 1]
    want_prompt_lp = statics.num_prompt_logprobs >= 0
    logits, hidden, kv = forward(weights, cfg, tokens, positions, kv, meta, backend=statics.backend,
                                 logits_at=None if want_prompt_lp else last)
    prompt_lp = None
    if want_prompt_lp:
        prompt_lp = token_logprobs(logits[:, :-1], tokens[:, 1:], statics.num_prompt_logprobs)
        logits = jnp.take_along_axis(logits, last[:, :, None], axis=1)
    zeros = jnp.zeros((b,), jnp.int32)
    first_logits = block_stop_tokens(logits[:, 0], limits, zeros)  # [B, V]
    penalties = None if pen is None else pen.build(cfg.vocab_size)
    shaped = first_logits if penalties is None else penalties.apply(first_logits)
    # [B]; exactly generate.prefill's draw (greedy batches skip compiling the sampler)
    first = sample(shaped, st, zeros, statics.greedy)
    running = prompt_lens > 0
    if penalties is not None:
        penalties = penalties.record(first, running)

    n = max(statics.num_logprobs, 0)
    m_lp = m if statics.num_logprobs >= 0 else 0
    out_lp = jnp.zeros((b, m_lp), jnp.float32)
    out_rank = jnp.zeros((b, m_lp), jnp.int32)
    out_top_ids = jnp.zeros((b, m_lp, n), jnp.int32)
    out_top_lp = jnp.zeros((b, m_lp, n), jnp.float32)
    if statics.num_logprobs >= 0:
        lp, rank, top_ids, top_lp = token_logprobs(first_logits, first, statics.num_logprobs)
        slot0 = jnp.where(running, 0, m)[:, None]
        out_lp, out_rank = _write(out_lp, slot0, lp[:, None]), _write(out_rank, slot0, rank[:, None])
        out_top_ids = _write(out_top_ids, slot0, top_ids[:, None])
        out_top_lp = _write(out_top_lp, slot0, top_lp[:, None])

    history = jnp.zeros((b, s), jnp.int32).at[:, :t].set(tokens)
    history = _write(history, jnp.where(running, prompt_lens, s)[:, None], first[:, None])
    hit_stop = jnp.any(first[:, None] == limits.stop_ids, axis=-1)
    finish = jnp.where(running, jnp.where(hit_stop, STOPPED, RUNNING), LENGTH)
    finish = jnp.where((finish == RUNNING) & (limits.max_tokens <= 1), LENGTH, finish)
    dstate = drafter.init(draft_params, b, s, weights.dtype)
    dstate = drafter.prefill(draft_params, weights, dstate, tokens, prompt_lens, hidden, first)
    state = SpecState(
        tokens=first, kv=kv, kv_lens=prompt_lens, history=history,
        num_generated=running.astype(jnp.int32), finish=finish.astype(jnp.int32),
        out_tokens=_write(jnp.zeros((b, m), jnp.int32), jnp.where(running, 0, m)[:, None], first[:, None]),
        out_logprobs=out_lp, out_ranks=out_rank, out_top_ids=out_top_ids, out_top_logprobs=out_top_lp,
        forwards=zeros, drafted=zeros, accepted=zeros, draft=dstate, pen=penalties)
    return state, prompt_lp


def _context(s: SpecState, st: SamplingTensors, limits: RowLimits, statics: SpecStatics) -> DraftContext:
    return DraftContext(tokens=s.tokens, kv_lens=s.kv_lens, active=s.finish == RUNNING, history=s.history,
                        num_generated=s.num_generated, st=st, limits=limits, pen=s.pen, greedy=statics.greedy)


def _either(pred: jax.Array, if_true, if_false, s: SpecState) -> SpecState:
    """`lax.cond(pred, if_true, if_false, s)` as two conditionals whose false branch passes `s`
    through. XLA:CPU copies the buffers that both branches of one conditional update in place, and
    all of them when the false branch updates and the true one passes through: one plain cond here
    cost 36 copies of a layer's K or V per n-gram round (plus the draft model's cache and the
    history), this pair none (compiled HLO, batch 1). The branches take the state as their argument,
    not as a closure, for the same reason."""
    s = jax.lax.cond(pred, if_true, lambda s: s, s)
    return jax.lax.cond(~pred, if_false, lambda s: s, s)


def _round(weights: Weights, cfg: ModelConfig, drafter, draft_params, statics: SpecStatics,
           s: SpecState, st: SamplingTensors, limits: RowLimits) -> SpecState:
    """One propose / verify / accept round for every running row."""
    ctx = _context(s, st, limits, statics)
    args = (weights, cfg, drafter, draft_params, statics, st, limits)

    # 1. Propose d_1..d_k (q: the shaped logits they were drawn from; None = one-hot; a draft
    #    token -1 is no proposal: always rejected).
    def verify_proposal(s):
        draft, q_logits, dstate, kv = drafter.propose(draft_params, weights, s.kv, s.draft,
                                                      _context(s, st, limits, statics))  # [B, k]
        return _verify_emit(*args, s.replace(kv=kv, draft=dstate), draft, q_logits)

    if getattr(drafter, "hybrid", False):  # prompt lookup if every running row has a match, else the model
        looked = drafter.lookup(ctx)  # [B, k]
        return _either(jnp.all(~ctx.active | (looked[:, 0] >= 0)),
                       lambda s: _verify_emit(*args, s, looked, None), verify_proposal, s)
    if not getattr(drafter, "abstains", False):
        return verify_proposal(s)
    # A drafter that may abstain (n-gram without a match): when no running row has a proposal, a
    # plain one-token step does the same work as verifying k rejected tokens, at 1 / (k+1) the width.
    # Proposals may also be shorter than k (-1 after the last): the round verifies at the narrowest
    # of the drafter's widths ((k,) unless it has several) that holds every running row's proposal,
    # one conditional per width, each passing the state through when not taken (see _either: no
    # buffer copies).
    draft, q_logits, dstate, kv = drafter.propose(draft_params, weights, s.kv, s.draft, ctx)  # [B, k]
    s = s.replace(kv=kv, draft=dstate)
    widths = drafter.widths
    need = jnp.max(jnp.where(ctx.active, jnp.sum(draft >= 0, axis=1), 0))
    bounds = (0,) + tuple(widths)
    for lo, w in itertools.pairwise(bounds):
        s = jax.lax.cond((need > lo) & (need <= w),
                         lambda s, w=w: _verify_emit(*args, s, draft[:, :w], None if q_logits is None
                                                     else q_logits[:, :w]), lambda s: s, s)
    return jax.lax.cond(need == 0, lambda s: _verify_emit(*args, s, draft[:, :0], None), lambda s: s, s)


def _verify_emit(weights: Weights, cfg: ModelConfig, drafter, draft_params, statics: SpecStatics,
                 st: SamplingTensors, limits: RowLimits, s: SpecState, draft: jax.Array, q_logits) -> SpecState:
    """Steps 2-5 of a round for drafts [B, k'] (k' = k, or 0 for a plain step) proposed from s
    (whose kv and draft state are the ones the proposal left)."""
    b, k = draft.shape
    ctx = _context(s, st, limits, statics)
    active, p, g = ctx.active, ctx.kv_lens, ctx.num_generated
    kv, dstate = s.kv, s.draft

    # 2. One target forward over [x_P, d_1..d_k] at P..P+k: logits i are p_{i+1}.
    inputs = jnp.concatenate([s.tokens[:, None], jnp.maximum(draft, 0)], axis=1)  # [B, k+1]
    q_lens = jnp.where(active, k + 1, 0).astype(jnp.int32)
    meta = AttentionMeta(page_table=jnp.arange(b, dtype=jnp.int32)[:, None], kv_lens=p + q_lens, q_lens=q_lens,
                         contiguous=True)
    positions = p[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [B, k+1]
    logits, hidden, kv = forward(weights, cfg, inputs, positions, kv, meta, backend=statics.backend)

    # 3. Accept n_acc drafts; `nxt` is the correction (first rejection) or the bonus token.
    n_acc, nxt, blocked = verify(logits, draft, q_logits, st, limits, g, statics.greedy, s.pen)  # [B], [B], [B, k+1, V]

    # 4. Emit d_1..d_{n_acc}, nxt; cut after the first stop token and at max_tokens.
    i = jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [1, k+1]
    padded = jnp.pad(draft, ((0, 0), (0, 1)))  # [B, k+1]
    emitted = jnp.where(i < n_acc[:, None], padded, nxt[:, None])  # [B, k+1]; valid for i <= n_acc
    is_stop = jnp.any(emitted[..., None] == limits.stop_ids[:, None, :], axis=-1) & (i <= n_acc[:, None])
    has_stop = jnp.any(is_stop, axis=1)  # [B]
    n_to_stop = jnp.where(has_stop, jnp.argmax(is_stop, axis=1) + 1, k + 1)  # tokens up to the stop
    n_emit = jnp.minimum(jnp.minimum(n_acc + 1, n_to_stop), limits.max_tokens - g)
    n_emit = jnp.where(active, n_emit, 0).astype(jnp.int32)  # [B]
    keep = i < n_emit[:, None]  # [B, k+1]
    m = statics.max_new
    out_slots = jnp.where(keep, g[:, None] + i, m)  # dropped where not kept
    extras = {}
    if statics.num_logprobs >= 0:
        lp, rank, top_ids, top_lp = token_logprobs(blocked, emitted, statics.num_logprobs)  # [B, k+1(, N)]
        extras = dict(out_logprobs=_write(s.out_logprobs, out_slots, lp),
                      out_ranks=_write(s.out_ranks, out_slots, rank),
                      out_top_ids=_write(s.out_top_ids, out_slots, top_ids),
                      out_top_logprobs=_write(s.out_top_logprobs, out_slots, top_lp))
    if s.pen is not None:  # the next round's penalties count what this one emitted
        extras["pen"] = s.pen.record(emitted, keep)
    num_generated = g + n_emit
    last_tok = jnp.take_along_axis(emitted, jnp.maximum(n_emit - 1, 0)[:, None], axis=1)[:, 0]
    stopped = active & has_stop & (n_to_stop <= n_emit)
    finish = jnp.where(stopped, STOPPED, s.finish)
    finish = jnp.where(active & (finish == RUNNING) & (num_generated >= limits.max_tokens), LENGTH, finish)

    # 5. P += n_emit: the rejected tail of this round's K/V is rolled back by not advancing.
    dstate = drafter.commit(draft_params, weights, dstate, ctx, hidden, emitted, n_emit)
    act = active.astype(jnp.int32)
    return s.replace(
        tokens=jnp.where(n_emit > 0, last_tok, s.tokens), kv=kv, kv_lens=p + n_emit,
        history=_write(s.history, jnp.where(keep, p[:, None] + 1 + i, s.history.shape[1]), emitted),
        num_generated=num_generated, finish=finish.astype(jnp.int32),
        out_tokens=_write(s.out_tokens, out_slots, emitted),
        forwards=s.forwards + act, drafted=s.drafted + jnp.sum(draft >= 0, axis=1) * act,
        accepted=s.accepted + n_acc * act,
        draft=dstate, **extras)


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "statics"), donate_argnames=("state",))
def spec_decode(weights: Weights, cfg: ModelConfig, drafter, draft_params, statics: SpecStatics,
                state: SpecState, st: SamplingTensors, limits: RowLimits, max_rounds: jax.Array) -> SpecState:
    """Up to max_rounds speculative rounds on device; stops early once every row finished."""

    def step(carry):
        r, s = carry
        return r + 1, _round(weights, cfg, drafter, draft_params, statics, s, st, limits)

    def cond(carry):
        r, s = carry
        return (r < max_rounds) & jnp.any(s.finish == RUNNING)

    _, state = jax.lax.while_loop(cond, step, (jnp.int32(0), state))
    return state


# ----------------------------------------------------------------------------- host side

@dataclasses.dataclass
class SpecStats:
    """Acceptance counters summed over the rows a SpecDecoder ran (Spec-Bench definitions)."""

    forwards: int = 0  # target verification forwards (one per row per round)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens emitted by the rounds (the prefill's first token is not counted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target forward, counting the correction / bonus token."""
        return (self.accepted + self.forwards) / self.forwards if self.forwards else 0.0

    def add_state(self, state: SpecState, num_rows: int):
        host = jax.device_get({"f": state.forwards, "d": state.drafted, "a": state.accepted,
                               "n": state.num_generated})
        self.forwards += int(host["f"][:num_rows].sum())
        self.drafted += int(host["d"][:num_rows].sum())
        self.accepted += int(host["a"][:num_rows].sum())
        self.emitted += int(np.maximum(host["n"][:num_rows] - 1, 0).sum())


class SpecDecoder(StaticBatchGenerator):
    """Static batches decoded speculatively; finishes EngineRequests in place like StaticBatchGenerator.

    >>> dec = SpecDecoder(weights, cfg, SpeculativeConfig.from_dict({...}, cfg), max_model_len)
    >>> dec.run(requests, batch_size=8); dec.stats.tau

    Rows are sorted by prompt length and cut into padded batches; each batch runs
    `spec_prefill` + `spec_decode`, then the host replays its tokens through each
    request (stop strings, logprobs, finish reasons). `drafter` / `draft_params` may be
    given directly (tests, benchmarks); otherwise they are built from `spec`.
    """

    def __init__(self, weights: Weights, cfg: ModelConfig, spec, max_model_len: int, backend: str = "xla",
                 decode_token=None, drafter=None, draft_params=None):
        super().__init__(weights, cfg, max_model_len, backend, decode_token)
        if drafter is None:
            from jaxinfer.spec.config import build_drafter
            drafter, draft_params = build_drafter(spec, cfg, weights.dtype, backend, target=weights)
        self.spec, self.drafter, self.draft_params = spec, drafter, draft_params
        self.stats = SpecStats()

    def statics_for(self, rows: list[EngineRequest], gs: GenerateStatics) -> SpecStatics:
        """The cache must hold the k+1 verified positions past the last token of the longest row.
        Output slots are bucketed (a power of two) so batches of different max_tokens share a program."""
        need = round_up(max(len(r.prompt_ids) + r.max_tokens for r in rows) + self.drafter.k + 1, 64)
        if self.backend == "pallas":  # the Triton kernel takes power-of-two pages (here: one per row)
            need = bucket(need)
        return SpecStatics(max_len=need, max_new=bucket(gs.max_new), num_logprobs=gs.num_logprobs,
                           num_prompt_logprobs=gs.num_prompt_logprobs, backend=self.backend,
                           greedy=gs.greedy)

    def segments(self, rows: list[EngineRequest], segment: int | None) -> Iterator:
        """Prefill, then `segment` rounds at a time (None: to the end); yields (state, prompt_lp)."""
        gs, tokens, prompt_lens, st, limits, pen = self._prepare(rows)
        statics = self.statics_for(rows, gs)
        now = time.perf_counter()
        for r in rows:
            r.metrics.first_scheduled_time = now
        args = (self.weights, self.cfg, self.drafter, self.draft_params, statics)
        state, prompt_lp = spec_prefill(*args, tokens, prompt_lens, st, limits, pen)
        yield state, prompt_lp
        rounds = jnp.int32(statics.max_new if segment is None else segment)
        while bool(jnp.any(state.finish == RUNNING)):
            state = spec_decode(*args, state, st, limits, rounds)
            yield state, prompt_lp
        self.stats.add_state(state, len(rows))
