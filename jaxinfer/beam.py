"""Beam search as one jit-compiled loop over the contiguous KV cache.

Legend: B prompts, W beams per prompt, C candidates kept per step, V vocab,
M max new tokens, S cache slots, E eos ids.

The algorithm is transformers' vectorised beam search, the peer the tests
compare against token for token:
- every step scores all W x V one-token extensions of the running beams
  (running score + log-softmax of the next token) and keeps the best
  C = max(2, 1 + E) x W of them, so at least W survive even if many end here;
- a candidate that ends (an eos id, or the M-th token) and ranks among the
  first W joins the prompt's finished pool, scored sum_logprob / length **
  length_penalty (length: generated tokens); the pool keeps its best W;
- the best W candidates that did not end are the next running beams, and the
  cache rows are reordered to follow their parents;
- a prompt stops taking new finished beams once no running beam can beat its
  worst finished one (early_stopping False: judged at the current length;
  "never": at the longest possible length when length_penalty > 0; True: as
  soon as W beams have finished). The loop ends when every prompt has stopped,
  or at M tokens.

`beam_prefill` runs each prompt once and copies its cache rows to the W beams;
`beam_decode` is a lax.while_loop of beam steps. Reordering copies cache rows
([B x W, K, S, H] per layer per step): the cost beam search pays on a
contiguous cache, where a paged cache would copy only the last partial page.
So the host runs the loop in segments over a cache that starts at the longest
prompt and doubles as the beams grow (`run_beam_search`).

With temperature > 0 the C candidates are drawn without replacement from the
softmax of the running scores (Gumbel top-k) instead of taken best first, on
log-probabilities of logits / temperature (stochastic beam search).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.generate import bucket, fine_bucket, first_cache_window, prompt_forward, round_up
from jaxinfer.kv.cache import AttentionMeta, KVCache, grow_contiguous
from jaxinfer.kv.quant import KVQuantSpec
from jaxinfer.model import Weights, forward, loop_layout
from jaxinfer.outputs import Logprob
from jaxinfer.sampling import is_int, seed_key

_NEG = -1.0e9  # transformers' "impossible" score offset
EARLY_STOPPING = (False, True, "never")


@dataclasses.dataclass
class BeamSearchParams:
    """Beam search settings; vLLM's names, plus transformers' early_stopping and a seed.

    length_penalty: finished beams are ranked by sum_logprob / generated_len ** length_penalty
    (> 0 favours longer outputs, < 0 shorter, 0 ranks by total log-probability).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None

    def __post_init__(self):
        def bad(field, allowed):
            raise ValueError(f"BeamSearchParams.{field}={getattr(self, field)!r}: {allowed}")

        if not is_int(self.beam_width) or self.beam_width < 1:
            bad("beam_width", "must be an integer >= 1")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0: the best candidates, > 0: sampled)")
        if not (isinstance(self.length_penalty, (int, float)) and np.isfinite(self.length_penalty)):
            bad("length_penalty", "must be a finite number")
        if not any(self.early_stopping is v or self.early_stopping == v and isinstance(v, str)
                   for v in EARLY_STOPPING):
            bad("early_stopping", f"must be one of {EARLY_STOPPING}")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")


@dataclasses.dataclass
class BeamSearchSequence:
    """One finished beam. tokens: prompt + generated (as vLLM's); text: their decoding."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]  # per generated token: {token: Logprob}
    cum_logprob: float  # sum of the generated tokens' log-probabilities
    score: float  # cum_logprob / generated_len ** length_penalty: the beams' order
    text: str | None
    finish_reason: str  # "stop" (an eos id) | "length"
    stop_reason: int | None = None  # the eos id that ended it
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclasses.dataclass
class BeamSearchOutput:
    """The beam_width finished beams of one prompt, best score first."""

    sequences: list[BeamSearchSequence]


@dataclasses.dataclass(frozen=True)
class BeamStatics:
    """Everything that changes the compiled program (hashable)."""

    max_len: int  # S
    max_new: int  # M (output slots; the run's max_tokens may be fewer)
    beam_width: int  # W
    num_candidates: int  # C
    early_stopping: bool | str
    sampled: bool  # temperature > 0
    backend: str = "xla"
    kv_quant: KVQuantSpec | None = None


@struct.dataclass
class BeamInputs:
    """The run's settings that do not change the compiled program."""

    eos_ids: jax.Array  # [E] token ids that end a beam
    max_new: jax.Array  # most tokens a beam generates (<= BeamStatics.max_new)
    temperature: jax.Array
    length_penalty: jax.Array


@struct.dataclass
class BeamState:
    kv: KVCache  # B x W rows, beam w of prompt b in row b * W + w
    lens: jax.Array  # [B x W] prompt lengths
    step: jax.Array  # tokens generated so far by every running beam
    key: jax.Array
    run_tokens: jax.Array  # [B, W, M]
    run_logprobs: jax.Array  # [B, W, M] each token's log-probability
    run_scores: jax.Array  # [B, W] summed log-probabilities
    parents: jax.Array  # [B, W] the beam each running beam came from at the last step
    fin_tokens: jax.Array  # [B, W, M]
    fin_logprobs: jax.Array  # [B, W, M]
    fin_scores: jax.Array  # [B, W] length-penalised; unfilled slots hold about -1e9
    fin_cum: jax.Array  # [B, W] summed log-probabilities
    fin_lens: jax.Array  # [B, W] generated tokens
    fin_eos: jax.Array  # [B, W] whether it ended on an eos id
    fin_filled: jax.Array  # [B, W] slot holds a finished beam
    open: jax.Array  # [B] the prompt still takes new finished beams
    alive: jax.Array  # the loop goes on


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, ...] at idx [B, R] along axis 1 -> [B, R, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def initial_state(kv: KVCache, prompt_lens: jax.Array, w: int, m: int, key: jax.Array) -> BeamState:
    """W beams per prompt, all equal to the prompt: only beam 0 may extend at the first step
    (transformers' -1e9 start scores), so the first W candidates are distinct tokens. Padding
    rows (prompt_lens 0) take no finished beams and do not hold the loop open."""
    b = prompt_lens.shape[0]
    real = prompt_lens > 0
    zeros = jnp.zeros((b, w, m), jnp.int32)
    return BeamState(
        kv=kv, lens=jnp.repeat(prompt_lens, w), step=jnp.int32(0), key=key,
        run_tokens=zeros, run_logprobs=zeros.astype(jnp.float32),
        run_scores=jnp.where(jnp.arange(w) == 0, 0.0, _NEG) * jnp.ones((b, 1), jnp.float32),
        parents=jnp.zeros((b, w), jnp.int32),
        fin_tokens=zeros, fin_logprobs=zeros.astype(jnp.float32),
        fin_scores=jnp.full((b, w), _NEG, jnp.float32), fin_cum=jnp.zeros((b, w), jnp.float32),
        fin_lens=jnp.zeros((b, w), jnp.int32), fin_eos=jnp.zeros((b, w), bool),
        fin_filled=jnp.broadcast_to(~real[:, None], (b, w)), open=real, alive=jnp.bool_(True))


def select(s: BeamState, logits: jax.Array, statics: BeamStatics, run: BeamInputs) -> BeamState:
    """One beam step from the running beams' next-token logits [B x W, V] (token index s.step)."""
    eos_ids, max_new, length_penalty = run.eos_ids, run.max_new, run.length_penalty
    b, w = s.run_scores.shape
    v = logits.shape[-1]
    n = s.step
    logits = logits.astype(jnp.float32)
    if statics.sampled:
        logits = logits / run.temperature
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, w * v)
    total = (s.run_scores[:, :, None] + logp.reshape(b, w, v)).reshape(b, w * v)  # beam w, token t: w * V + t
    key = s.key
    if statics.sampled:  # C draws without replacement from softmax(total), then best first
        key, sub = jax.random.split(key)
        _, idx = jax.lax.top_k(total + jax.random.gumbel(sub, total.shape), statics.num_candidates)
        order = jnp.argsort(-jnp.take_along_axis(total, idx, axis=1), axis=1, stable=True)
        idx = jnp.take_along_axis(idx, order, axis=1)
        cand = jnp.take_along_axis(total, idx, axis=1)
    else:
        cand, idx = jax.lax.top_k(total, statics.num_candidates)  # [B, C]
    parent, tok = idx // v, idx % v
    tok_lp = jnp.take_along_axis(logp, idx, axis=1)
    at_n = jnp.arange(s.run_tokens.shape[-1]) == n  # [M]
    cand_tokens = jnp.where(at_n, tok[..., None], _gather(s.run_tokens, parent))  # [B, C, M]
    cand_lps = jnp.where(at_n, tok_lp[..., None], _gather(s.run_logprobs, parent))
    is_eos = jnp.any(tok[..., None] == eos_ids, axis=-1)  # [B, C]
    ends = is_eos | (n + 1 >= max_new)

    # The best W candidates that go on are the next running beams.
    keep = cand + jnp.where(ends, _NEG, 0.0)
    _, nxt = jax.lax.top_k(keep, w)
    run_scores = jnp.take_along_axis(keep, nxt, axis=1)

    # Candidates among the first W that end join the finished pool if they beat its worst.
    ended_top = ends & (jnp.arange(statics.num_candidates) < w)
    pen = cand / (n + 1).astype(jnp.float32) ** length_penalty
    if statics.early_stopping is True:
        pen = pen + jnp.where(jnp.all(s.fin_filled, axis=1, keepdims=True), _NEG, 0.0)
    pen = pen + jnp.where(s.open[:, None], 0.0, _NEG) + jnp.where(ended_top, 0.0, _NEG)
    merged = jnp.concatenate([s.fin_scores, pen], axis=1)  # [B, W + C]
    fin_scores, best = jax.lax.top_k(merged, w)

    def pick(old, new):
        return _gather(jnp.concatenate([old, new], axis=1), best)

    fin_filled = pick(s.fin_filled, ended_top)
    # Can a running beam still beat the worst finished one? (length: now, or the longest for
    # early_stopping="never" with a positive length penalty)
    length = (n + 1).astype(jnp.float32)
    if statics.early_stopping == "never":
        length = jnp.where(length_penalty > 0, max_new.astype(jnp.float32), length)
    best_running = run_scores[:, :1] / length ** length_penalty
    worst = jnp.where(fin_filled, jnp.min(fin_scores, axis=1, keepdims=True), _NEG)
    open_ = s.open & jnp.any(best_running > worst, axis=1)
    alive = jnp.any(open_) & jnp.any(~ends)  # every candidate ends at max_new
    if statics.early_stopping is True:
        alive = alive & ~jnp.all(fin_filled)
    return s.replace(
        step=n + 1, key=key,
        run_tokens=_gather(cand_tokens, nxt), run_logprobs=_gather(cand_lps, nxt), run_scores=run_scores,
        parents=jnp.take_along_axis(parent, nxt, axis=1),
        fin_tokens=pick(s.fin_tokens, cand_tokens), fin_logprobs=pick(s.fin_logprobs, cand_lps),
        fin_scores=fin_scores, fin_cum=pick(s.fin_cum, cand),
        fin_lens=pick(s.fin_lens, jnp.broadcast_to(n + 1, cand.shape).astype(jnp.int32)),
        fin_eos=pick(s.fin_eos, is_eos), fin_filled=fin_filled, open=open_, alive=alive)


@functools.partial(jax.jit, static_argnames=("cfg", "statics"))
def beam_prefill(weights: Weights, cfg: ModelConfig, statics: BeamStatics, tokens: jax.Array,
                 prompt_lens: jax.Array, run: BeamInputs, key: jax.Array) -> BeamState:
    """Prefill prompts tokens [B, T] (right-padded; prompt_lens 0: a padding row) once each, copy
    their cache rows to the W beams, and take the first beam step."""
    logits, kv = prompt_forward(weights, cfg, statics.max_len, statics.backend, statics.kv_quant, tokens,
                                prompt_lens)
    w = statics.beam_width
    kv = jax.tree_util.tree_map(lambda x: jnp.repeat(x, w, axis=0), kv)
    state = initial_state(kv, prompt_lens, w, statics.max_new, key)
    return select(state, jnp.repeat(logits[:, 0], w, axis=0), statics, run)


@functools.partial(jax.jit, static_argnames=("cfg", "statics"), donate_argnames=("state",))
def beam_decode(weights: Weights, cfg: ModelConfig, statics: BeamStatics, state: BeamState, run: BeamInputs,
                max_steps: jax.Array) -> BeamState:
    """Up to max_steps beam steps on device (a lax.while_loop); stops early once the search is over."""
    weights = loop_layout(weights)  # as generate.decode: no per-call copy of transposed weights on CPU
    b, w = state.run_scores.shape
    rows = jnp.arange(b * w, dtype=jnp.int32)[:, None]

    def step(carry):
        i, s = carry
        src = (jnp.arange(b)[:, None] * w + s.parents).reshape(-1)  # each beam's parent row
        kv = jax.tree_util.tree_map(lambda x: x[src], s.kv)
        kv_lens = s.lens + s.step  # the newest token (index step - 1) goes to slot lens + step - 1
        meta = AttentionMeta(page_table=rows, kv_lens=kv_lens, q_lens=jnp.ones_like(kv_lens), contiguous=True)
        newest = s.run_tokens[:, :, s.step - 1].reshape(-1, 1)
        logits, _, kv = forward(weights, cfg, newest, (kv_lens - 1)[:, None], kv, meta, backend=statics.backend)
        return i + 1, select(s.replace(kv=kv), logits[:, 0], statics, run)

    _, state = jax.lax.while_loop(lambda c: c[1].alive & (c[0] < max_steps), step, (jnp.int32(0), state))
    return state


def run_beam_search(weights: Weights, cfg: ModelConfig, prompts: list[list[int]], params: BeamSearchParams,
                    eos_ids: list[int], max_rows: int, decode, backend: str = "xla",
                    kv_quant: KVQuantSpec | None = None) -> list[BeamSearchOutput]:
    """Beam search for already-validated prompts, max(1, max_rows // beam_width) prompts per call.

    The batch, prompt and cache sizes are bucketed, so repeated calls reuse compiled programs.
    Every step copies and reads every cache slot, so the cache starts at `first_cache_window` and
    doubles between decode segments as the beams grow, as `StaticBatchGenerator.segments` does;
    each cache length is its own decode program."""
    w = params.beam_width
    eos = [] if params.ignore_eos else list(dict.fromkeys(eos_ids))
    per_call = max(1, max_rows // w)
    seed = params.seed if params.seed is not None else 0
    run = BeamInputs(eos_ids=jnp.asarray(eos, jnp.int32).reshape(len(eos)), max_new=jnp.int32(params.max_tokens),
                     temperature=jnp.float32(params.temperature), length_penalty=jnp.float32(params.length_penalty))
    outs = []
    for start in range(0, len(prompts), per_call):
        group = prompts[start:start + per_call]
        lens = [len(p) for p in group]
        b = bucket(len(group), minimum=1)
        t = fine_bucket(max(lens), minimum=16)
        full = round_up(max(lens) + params.max_tokens, 32)
        if backend == "pallas":  # the Triton kernel takes power-of-two pages (here: one per row)
            full = bucket(full)
        window = first_cache_window(max(lens), full, backend)
        statics = BeamStatics(max_len=window, max_new=bucket(params.max_tokens, minimum=16), beam_width=w,
                              num_candidates=max(2, 1 + len(eos)) * w, early_stopping=params.early_stopping,
                              sampled=params.temperature > 0, backend=backend, kv_quant=kv_quant)
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(group):
            tokens[i, :len(p)] = p
        state = beam_prefill(weights, cfg, statics, jnp.asarray(tokens),
                             jnp.asarray(lens + [0] * (b - len(group)), jnp.int32), run,
                             jax.random.fold_in(jax.random.key_data(seed_key(seed)), start))
        done = 1  # tokens every running beam holds
        while bool(state.alive):
            fits = window - (max(lens) + done) + 1  # steps before the newest token's slot leaves the cache
            if fits <= 0:
                window = min(full, 2 * window)
                statics = dataclasses.replace(statics, max_len=window)
                state = state.replace(kv=grow_contiguous(state.kv, window))
                continue
            state = beam_decode(weights, cfg, statics, state, run, jnp.int32(fits))
            done = int(state.step)
        outs += beam_search_outputs(state, group, decode)
    return outs


def beam_search_outputs(state: BeamState, prompts: list[list[int]], decode) -> list[BeamSearchOutput]:
    """Host side: each real prompt's finished beams as BeamSearchOutput (decode: ids -> text or None)."""
    host = jax.device_get({k: getattr(state, k) for k in ("fin_tokens", "fin_logprobs", "fin_scores", "fin_cum",
                                                          "fin_lens", "fin_eos", "fin_filled")})
    outs = []
    for i, prompt in enumerate(prompts):
        seqs = []
        for j in range(host["fin_tokens"].shape[1]):
            if not host["fin_filled"][i, j]:
                continue
            n = int(host["fin_lens"][i, j])
            gen = host["fin_tokens"][i, j, :n].tolist()
            lps = host["fin_logprobs"][i, j, :n].tolist()
            eos = bool(host["fin_eos"][i, j])
            tokens = list(prompt) + gen
            seqs.append(BeamSearchSequence(
                tokens=tokens, logprobs=[{t: Logprob(lp)} for t, lp in zip(gen, lps)],
                cum_logprob=float(host["fin_cum"][i, j]), score=float(host["fin_scores"][i, j]),
                text=decode(tokens), finish_reason="stop" if eos else "length",
                stop_reason=gen[-1] if eos else None, num_prompt_tokens=len(prompt)))
        outs.append(BeamSearchOutput(seqs))
    return outs


__all__ = ["BeamSearchParams", "BeamSearchSequence", "BeamSearchOutput", "BeamStatics", "BeamInputs", "BeamState",
           "beam_prefill", "beam_decode", "initial_state", "select", "run_beam_search", "beam_search_outputs"]
