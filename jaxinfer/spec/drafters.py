"""Drafters: who proposes the k tokens that the target verifies. One small protocol, five kinds.

Legend: B rows, k drafted tokens, S cache / history slots, T prompt tokens, D model dim,
V vocab.

Positions. At the start of a round, row b's target cache holds positions 0..P-1
(P = kv_lens[b]) and its last emitted token x_P, not yet run through the target, sits at
position P (history[b, P]). The drafter proposes d_1..d_k for positions P+1..P+k; the
target then runs [x_P, d_1..d_k] at P..P+k and keeps what verification accepts.

A drafter is a frozen, hashable dataclass (a jit static) with pure methods over its own
state pytree and params (arrays):

    init(params, batch, max_len, dtype) -> state
    prefill(params, target, state, tokens [B, T], prompt_lens [B], hidden [B, T, D],
            first [B]) -> state                      (after the target's prompt pass)
    propose(params, target, kv, state, ctx) -> (draft [B, k], draft_logits [B, k, V] or None,
                                                state, kv)
    commit(params, target, state, ctx, hidden [B, k+1, D], emitted [B, k+1], n_emit [B]) -> state

`target` is the target's Weights, `kv` the target's cache (only layer-skip writes it),
`ctx` a DraftContext. draft_logits are the shaped logits the drafts were drawn from
(`verify.draft_sample`); None means deterministic drafts (one-hot q). commit runs after
verification with the target's features of the round ([x_P, d_1..d_k] at P..P+k), the
emitted tokens and how many were emitted (rows emit n_emit tokens; P advances by it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, KVCache, init_contiguous
from jaxinfer.model import Weights, forward
from jaxinfer.sampling import Penalties, RowLimits, SamplingTensors
from jaxinfer.spec.heads import eagle_forward, head_logits, medusa_logits
from jaxinfer.spec.verify import draft_sample


@struct.dataclass
class DraftContext:
    """What every drafter may read at the start of a round."""

    tokens: jax.Array  # [B] last emitted token x_P
    kv_lens: jax.Array  # [B] P: target cache length = position of x_P
    active: jax.Array  # [B] bool: row still generating
    history: jax.Array  # [B, S] prompt + output tokens; history[b, P] = x_P
    num_generated: jax.Array  # [B] output tokens so far (x_P is output number num_generated - 1)
    st: SamplingTensors
    limits: RowLimits
    pen: Penalties | None = None  # penalties and biases, counts of the output so far (None: no row has any)
    greedy: bool = struct.field(pytree_node=False, default=False)  # every row greedy (static)

    def sample(self, logits: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
        """The draft token for output index num_generated + offset from logits [B, V]."""
        return draft_sample(logits, self.st, self.limits, self.num_generated + offset, self.greedy, self.pen)


def _meta(b: int, kv_lens, q_lens) -> AttentionMeta:
    return AttentionMeta(page_table=jnp.arange(b, dtype=jnp.int32)[:, None], kv_lens=kv_lens,
                         q_lens=q_lens, contiguous=True)


def _autoregress(step, k: int, first_token, first_q, carry, ctx: DraftContext):
    """Draft d_1 (given) then d_2..d_k with `step(carry, i, d_i, ctx_i) -> (d_{i+1}, q_{i+1}, carry)`,
    where ctx_i's penalties count d_1..d_i as generated (ctx_i.sample draws as plain decoding
    would after them).

    Returns (draft [B, k], q [B, k, V], carry); a lax.scan keeps one copy of the step."""
    if k == 1:
        return first_token[:, None], first_q[:, None], carry

    def body(c, i):
        carry, tok, pen = c
        pen = None if pen is None else pen.record(tok, ctx.active)
        nxt, q, carry = step(carry, i, tok, ctx.replace(pen=pen))
        return (carry, nxt, pen), (nxt, q)

    (carry, _, _), (toks, qs) = jax.lax.scan(body, (carry, first_token, ctx.pen), jnp.arange(1, k, dtype=jnp.int32))
    draft = jnp.concatenate([first_token[:, None], toks.T], axis=1)  # [B, k]
    q = jnp.concatenate([first_q[:, None], qs.transpose(1, 0, 2)], axis=1)  # [B, k, V]
    return draft, q, carry


# ----------------------------------------------------------------------------- draft model

@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    """A smaller model with the same vocabulary and its own contiguous KV cache.

    Each round feeds it the last `catch_up` tokens (positions P-1 and P by default;
    rewriting what it already holds is idempotent), so its cache catches up whatever was
    accepted, including d_k when all k were (the draft never ran d_k), then k-1
    single-token steps.
    """

    k: int
    cfg: ModelConfig  # the draft model's config
    backend: str = "xla"
    catch_up: int = 2  # trailing tokens fed at the start of a round (>= 2)

    def init(self, params: Weights, batch: int, max_len: int, dtype):
        kv, _ = init_contiguous(self.cfg.num_layers, batch, max_len, self.cfg.num_kv_heads,
                                self.cfg.head_dim, params.dtype)
        return {"kv": kv}

    def prefill(self, params: Weights, target, state, tokens, prompt_lens, hidden, first):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        last = jnp.maximum(prompt_lens - 1, 0)[:, None]  # logits of one position: the LM head is not free
        _, _, kv = forward(params, self.cfg, tokens, positions, state["kv"], _meta(b, prompt_lens, prompt_lens),
                           backend=self.backend, logits_at=last)
        return {"kv": kv}

    def propose(self, params: Weights, target, kv, state, ctx: DraftContext):
        b = ctx.tokens.shape[0]
        p = ctx.kv_lens
        act = ctx.active.astype(jnp.int32)
        w = self.catch_up
        start = jnp.maximum(p - w + 1, 0)  # [B] the window start..P (history[P] = x_P)
        n = p - start + 1  # [B] valid tokens in the window
        positions = start[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, w]
        window = jnp.take_along_axis(ctx.history, jnp.minimum(positions, ctx.history.shape[1] - 1), axis=1)
        logits, _, dkv = forward(params, self.cfg, window, positions, state["kv"], _meta(b, p + 1, n * act),
                                 backend=self.backend, logits_at=(n - 1)[:, None])
        d1, q1 = ctx.sample(logits[:, 0], 0)

        def step(dkv, i, tok, ctx_i):  # feed d_i at position P + i -> d_{i+1}
            lg, _, dkv = forward(params, self.cfg, tok[:, None], (p + i)[:, None], dkv,
                                 _meta(b, p + i + 1, act), backend=self.backend)
            nxt, q = ctx_i.sample(lg[:, 0], i)
            return nxt, q, dkv

        draft, q, dkv = _autoregress(step, self.k, d1, q1, dkv, ctx)
        return draft, q, {"kv": dkv}, kv

    def commit(self, params, target, state, ctx, hidden, emitted, n_emit):
        return state


# ----------------------------------------------------------------------------- layer skip

@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter:
    """Self-speculation: the target's first `num_layers` layers, then its final norm and LM head.

    Shares the target's weights and its KV cache for those layers: drafting writes K/V of
    x_P, d_1..d_{k-1} at P..P+k-1 into the first layers, and the verify pass rewrites the
    same positions in every layer, so the cache stays the target's own.
    """

    k: int
    cfg: ModelConfig  # the target's config
    num_layers: int
    backend: str = "xla"

    def init(self, params, batch, max_len, dtype):
        return {}

    def prefill(self, params, target, state, tokens, prompt_lens, hidden, first):
        return state

    def propose(self, params, target: Weights, kv, state, ctx: DraftContext):
        b = ctx.tokens.shape[0]
        p = ctx.kv_lens
        act = ctx.active.astype(jnp.int32)

        def step(kv, i, tok, ctx_i):  # feed the token at position P + i (x_P, then d_i) -> d_{i+1}
            lg, _, kv = forward(target, self.cfg, tok[:, None], (p + i)[:, None], kv, _meta(b, p + i + 1, act),
                                backend=self.backend, num_layers=self.num_layers)
            nxt, q = ctx_i.sample(lg[:, 0], i)
            return nxt, q, kv

        d1, q1, kv = step(kv, 0, ctx.tokens, ctx)
        draft, q, kv = _autoregress(step, self.k, d1, q1, kv, ctx)
        return draft, q, state, kv

    def commit(self, params, target, state, ctx, hidden, emitted, n_emit):
        return state


# ----------------------------------------------------------------------------- n-gram

def ngram_lookup(history: jax.Array, last_pos: jax.Array, k: int, n_max: int, n_min: int,
                 lengths: tuple[int, ...] | None = None) -> jax.Array:
    """Prompt lookup (Saxena 2023), on device. history [B, S], last_pos [B] -> draft [B, k].

    For n from n_max down to n_min: find the most recent earlier occurrence of the last n
    tokens (history[P-n+1..P]) and propose what followed it. A match that ends δ tokens
    before P is continued periodically (period δ), the only continuation the context
    supports past P. No match: -1 (no proposal; the loop may then run a plain step).

    lengths: with it, a match of n tokens proposes only the first lengths[n] tokens (the
    rest -1); None proposes k for every n (vLLM's prompt lookup).
    """
    b, s = history.shape
    p = last_pos[:, None]  # [B, 1]
    j = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S] candidate start of a match
    draft = jnp.full((b, k), -1, history.dtype)
    found = jnp.zeros((b,), bool)
    padded = jnp.concatenate([history, jnp.full((b, n_max), -1, history.dtype)], axis=1)  # [B, S + n_max]
    for n in range(n_max, n_min - 1, -1):
        match = (j + n - 1 < p) & (p - n + 1 >= 0)  # ends strictly before P; the suffix exists
        for t in range(n):
            pattern_t = jnp.take_along_axis(history, jnp.maximum(p - n + 1 + t, 0), axis=1)  # [B, 1]
            match = match & (padded[:, t:t + s] == pattern_t)  # history[j + t] == suffix[t]
        has = jnp.any(match, axis=1)  # [B]
        start = s - 1 - jnp.argmax(match[:, ::-1], axis=1)  # most recent match
        after = start + n  # first token after the match (<= P)
        period = last_pos - after + 1  # [B] >= 1 when has
        idx = after[:, None] + jnp.arange(k)[None, :] % jnp.maximum(period, 1)[:, None]  # [B, k]
        proposal = jnp.take_along_axis(history, jnp.clip(idx, 0, s - 1), axis=1)
        if lengths is not None:
            proposal = jnp.where(jnp.arange(k)[None, :] < lengths[n], proposal, -1)
        draft = jnp.where((has & ~found)[:, None], proposal, draft)
        found = found | has
    return draft.astype(jnp.int32)


@functools.cache
def lookup_lengths(k: int, n_max: int, scale: int) -> tuple[int, ...]:
    """Draft lengths by matched suffix length n (index n, 0..n_max) for `prompt_lookup_scale`:
    min(k, scale * n) rounded up to the next of the loop's verify widths (`draft_widths`), since
    a round pays for its widest draft anyway."""
    widths = draft_widths(k)
    return tuple(min(w for w in widths if w >= min(k, scale * n)) if n else 0 for n in range(n_max + 1))


@functools.cache
def draft_widths(k: int) -> tuple[int, ...]:
    """The draft lengths a round of adaptive prompt lookup verifies at: powers of two below k, and k
    (k = 8: 1, 2, 4, 8; one compiled forward each, so at most log2(k) + 1 of them)."""
    return tuple(sorted({min(k, 1 << i) for i in range(k.bit_length() + 1)}))


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
    """Prompt lookup over the row's own tokens; no model cost, deterministic drafts (one-hot q).
    Rows without a match propose nothing (-1), as vLLM's n-gram proposer does.

    scale (`prompt_lookup_scale`): a match of n tokens proposes min(k, scale * n) tokens, rounded
    up to a power of two (`lookup_lengths`), and each round verifies only as wide as its longest
    proposal (`widths`). A short match is a weak prediction: on the embedded target a 1-token match
    is right far less often than a 4-token one, and a (k+1)-token forward for it costs more than it
    returns. None: always k (vLLM's behaviour).
    """

    k: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    scale: int | None = None
    abstains = True  # class constant: may propose -1 (commit ignores the round's width)

    @property
    def widths(self) -> tuple[int, ...]:
        """Draft lengths the loop verifies at (the smallest that holds every row's proposal)."""
        return (self.k,) if self.scale is None else draft_widths(self.k)

    def init(self, params, batch, max_len, dtype):
        return {}

    def prefill(self, params, target, state, tokens, prompt_lens, hidden, first):
        return state

    def propose(self, params, target, kv, state, ctx: DraftContext):
        lengths = None if self.scale is None else lookup_lengths(self.k, self.prompt_lookup_max, self.scale)
        draft = ngram_lookup(ctx.history, ctx.kv_lens, self.k, self.prompt_lookup_max, self.prompt_lookup_min,
                             lengths)
        return draft, None, state, kv

    def commit(self, params, target, state, ctx, hidden, emitted, n_emit):
        return state


# ----------------------------------------------------------------------------- n-gram, then draft model

@dataclasses.dataclass(frozen=True)
class LookupDraftModelDrafter:
    """Prompt lookup where it finds a match, a draft model where it does not.

    Lookup proposals cost nothing but exist in only part of the rounds (about half on the
    embedded target's held-out prompts); a plain step in the others emits one token. Here
    those rounds draft with the model instead. The loop (`loop._round`) asks `lookup` first
    and, when every running row has a match, verifies its drafts (one-hot q); otherwise it
    runs `propose` (the draft model's k tokens and their q) for all rows. Both are verified
    losslessly, so the mix is lossless too.

    Lookup rounds leave the draft model alone; a model round first feeds it the last
    `catch_up` tokens (default 2(k+1), rewriting what it holds), which covers the tokens
    kept since its last round unless lookup rounds emitted more than that in between. A
    longer gap leaves a hole in its cache: worse drafts there, never a wrong output.
    """

    k: int
    cfg: ModelConfig  # the draft model's config
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    backend: str = "xla"
    catch_up: int | None = None  # tokens fed before the model drafts; None: 2(k+1)
    hybrid = True  # class constant: the loop picks lookup or propose per round

    @property
    def model(self) -> DraftModelDrafter:
        return DraftModelDrafter(self.k, self.cfg, self.backend, self.catch_up or 2 * (self.k + 1))

    def init(self, params, batch, max_len, dtype):
        return self.model.init(params, batch, max_len, dtype)

    def prefill(self, params, target, state, tokens, prompt_lens, hidden, first):
        return self.model.prefill(params, target, state, tokens, prompt_lens, hidden, first)

    def lookup(self, ctx: DraftContext) -> jax.Array:
        """Prompt-lookup drafts [B, k]; -1 where a row has no match."""
        return ngram_lookup(ctx.history, ctx.kv_lens, self.k, self.prompt_lookup_max, self.prompt_lookup_min)

    def propose(self, params, target, kv, state, ctx: DraftContext):
        return self.model.propose(params, target, kv, state, ctx)

    def commit(self, params, target, state, ctx, hidden, emitted, n_emit):
        return state


# ----------------------------------------------------------------------------- EAGLE

@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """EAGLE head (heads.py) with its own one-layer KV cache, position for position with the target.

    Head position t reads (f_t, x_{t+1}) and predicts f_{t+1}. After each verification the
    accepted pairs are fed (commit), which leaves f_hat_P, hence d_1 = LM(f_hat_P); then
    d_{i+1} comes from feeding (f_hat_{P+i-1}, d_i) at position P+i-1.
    """

    k: int
    cfg: ModelConfig  # the head's config (eagle_config of the target)
    target_cfg: ModelConfig  # its final norm and LM head are the target's
    backend: str = "xla"

    def init(self, params, batch, max_len, dtype):
        kv, _ = init_contiguous(1, batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim, dtype)
        return {"kv": kv, "feature": jnp.zeros((batch, self.cfg.hidden_size), dtype)}

    def _feed(self, params, target, state, features, tokens, start, q_lens):
        """Head over features/tokens [B, T(, D)] at positions start..start+T-1; keeps f_hat of the
        last valid one (rows with q_lens 0 keep theirs)."""
        b, t = tokens.shape
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        pred, kv = eagle_forward(params, self.cfg, target, features, tokens, positions, state["kv"],
                                 _meta(b, start + q_lens, q_lens), self.backend)
        last = jnp.take_along_axis(pred, jnp.maximum(q_lens - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
        feature = jnp.where((q_lens > 0)[:, None], last, state["feature"])
        return {"kv": kv, "feature": feature}

    def prefill(self, params, target, state, tokens, prompt_lens, hidden, first):
        # Pairs (f_t, x_{t+1}) for t < L: the next tokens are the prompt shifted left, then `first`.
        b, t = tokens.shape
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # [B, T]
        nxt = jnp.where(jnp.arange(t)[None, :] == (prompt_lens - 1)[:, None], first[:, None], nxt)
        return self._feed(params, target, state, hidden, nxt, jnp.zeros_like(prompt_lens), prompt_lens)

    def propose(self, params, target: Weights, kv, state, ctx: DraftContext):
        b = ctx.tokens.shape[0]
        p = ctx.kv_lens
        act = ctx.active.astype(jnp.int32)
        d1, q1 = ctx.sample(head_logits(params, target, state["feature"], self.target_cfg), 0)

        def step(carry, i, tok, ctx_i):  # head position P+i-1 reads (f_hat_{P+i-1}, d_i) -> f_hat_{P+i} -> d_{i+1}
            hkv, feat = carry
            pos = (p + i - 1)[:, None]
            pred, hkv = eagle_forward(params, self.cfg, target, feat[:, None], tok[:, None], pos, hkv,
                                      _meta(b, p + i, act), self.backend)
            nxt, q = ctx_i.sample(head_logits(params, target, pred[:, 0], self.target_cfg), i)
            return nxt, q, (hkv, pred[:, 0])

        draft, q, (hkv, _) = _autoregress(step, self.k, d1, q1, (state["kv"], state["feature"]), ctx)
        return draft, q, {"kv": hkv, "feature": state["feature"]}, kv

    def commit(self, params, target, state, ctx: DraftContext, hidden, emitted, n_emit):
        # Positions P_old..P_old+n_emit-1 hold the target's true features of the round and the
        # tokens that followed them (the emitted ones); they overwrite the drafting entries.
        return self._feed(params, target, state, hidden.astype(state["feature"].dtype), emitted,
                          ctx.kv_lens, n_emit)


# ----------------------------------------------------------------------------- Medusa

@dataclasses.dataclass(frozen=True)
class MedusaDrafter:
    """Medusa heads on the target's feature at the last verified position: k independent proposals.

    The feature f_{P-1} comes out of the verify pass itself (the position whose LM head
    produced x_P), so drafting costs k small residual blocks and LM heads, no model pass.
    """

    k: int
    cfg: ModelConfig  # the target's config

    def init(self, params, batch, max_len, dtype):
        return {"hidden": jnp.zeros((batch, self.cfg.hidden_size), dtype)}

    def prefill(self, params, target, state, tokens, prompt_lens, hidden, first):
        last = jnp.take_along_axis(hidden, jnp.maximum(prompt_lens - 1, 0)[:, None, None], axis=1)[:, 0]
        return {"hidden": last.astype(state["hidden"].dtype)}

    def propose(self, params, target: Weights, kv, state, ctx: DraftContext):
        logits = medusa_logits(params, target, state["hidden"], self.cfg)[:, :self.k]  # [B, k, V]
        toks, qs = [], []
        for i in range(self.k):  # head i proposes x_{P+i+1}
            tok, q = ctx.sample(logits[:, i], i)
            toks.append(tok)
            qs.append(q)
            if ctx.pen is not None:  # the next head's draw counts this draft as generated
                ctx = ctx.replace(pen=ctx.pen.record(tok, ctx.active))
        return jnp.stack(toks, axis=1), jnp.stack(qs, axis=1), state, kv

    def commit(self, params, target, state, ctx: DraftContext, hidden, emitted, n_emit):
        last = jnp.take_along_axis(hidden, jnp.maximum(n_emit - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
        return {"hidden": jnp.where((n_emit > 0)[:, None], last.astype(state["hidden"].dtype), state["hidden"])}
