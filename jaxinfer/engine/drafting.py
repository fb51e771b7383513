"""Drafting on device inside the continuous-batching engine: a draft model, layer skip, EAGLE
and Medusa (n-gram drafts come from the host, runner.ngram_propose).

Legend: B rows, T tokens per row, P pages (in shapes), ps page size, D model dim, V vocab,
k drafts; in the text x_P is a row's last sampled token and P its position.

The runner's `spec_step` asks `propose` for k drafts per row and, after the target has
verified them, calls `commit`; `engine_step` calls `record` after every other target
forward (prefill chunks, plain decodes). Verification is the engine's, shared by every
method, so every method here is lossless. Each method's state lives in pages that mirror
the target's (same ids, same page tables): prefix caching, aborts, and preemption by
recompute or swap need nothing else.

- draft_model (also the model rounds of ngram_draft_model): its own paged K/V cache, fed
  every token the target computes. A round re-reads [x_{P-1}, x_P] (rewriting x_{P-1}'s K/V
  is idempotent, and it catches the cache up when all k drafts were accepted last time), then
  k - 1 single steps. After a round of prompt-lookup drafts (ngram_draft_model) it is fed the
  verified tokens instead, so its cache stays the target's position for position.
- layer_skip: the target's first `num_layers` layers, final norm and LM head. It keeps no
  state: drafting writes those layers' paged K/V at P..P+k-1, and the verify pass rewrites
  the same positions in every layer.
- EAGLE and Medusa draft from the target's features (`model.forward`'s hidden, before the
  final norm), kept in pages beside the target's K/V (`HeadCache`):
  - feature pages [P, 1, ps, D]: f_t for every position t the target computed (a verified
    position that was rejected is rewritten before anything reads it);
  - EAGLE's one-layer paged KV cache. Head position t holds the pair (f_t, x_{t+1}), so it
    can be written only once x_{t+1} exists: a call over positions s..e (which samples
    x_{e+1}) feeds the pairs at s-1..e-1, reading f_{s-1} back from the feature pages. The
    head thus trails the target by one position, and every call starts where the last
    stopped. A request admitted with prefix-cache hits writes the pair at the last cached
    position into a shared page, with its own next token: another request sharing that page
    may then draft from a pair that is not its own there (worse drafts, never a wrong token).
  - Medusa reads f_{P-1}, the feature whose LM head produced x_P, and its K heads propose
    x_{P+1}..x_{P+K} at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.kv.bits import storage_dtype, store_as_bits
from jaxinfer.kv.cache import (
    AttentionMeta,
    BitsPages,
    KVCache,
    init_paged,
    read_slots,
    write_pages,
    write_slots,
)
from jaxinfer.model import Weights, forward
from jaxinfer.spec.heads import eagle_forward, head_logits, medusa_logits


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """How the engine drafts on device (a static argument of the jitted steps)."""

    method: str  # "draft_model" (also for ngram_draft_model), "layer_skip", "eagle" or "medusa"
    cfg: ModelConfig  # the draft model's, EAGLE's one-layer, or the target's config
    num_layers: int = 0  # layer_skip: the target layers the draft runs

    @property
    def keeps_features(self) -> bool:
        return self.method in ("eagle", "medusa")

    def bytes_per_page(self, target: ModelConfig, page_size: int, itemsize: int) -> int:
        """The draft's K and V (draft model, EAGLE) and features (EAGLE, Medusa) for one page."""
        kv_layers = {"draft_model": self.cfg.num_layers, "eagle": 1}.get(self.method, 0)
        n = 2 * kv_layers * self.cfg.num_kv_heads * self.cfg.head_dim * itemsize * page_size
        return n + (page_size * target.hidden_size * itemsize if self.keeps_features else 0)


@struct.dataclass
class HeadCache:
    """Paged state of EAGLE / Medusa, indexed by the target's page ids."""

    features: jax.Array | BitsPages  # [P, 1, ps, D]
    kv: KVCache | None = None  # EAGLE's one-layer cache

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


def init_cache(draft: DraftSpec, target: ModelConfig, num_pages: int, page_size: int, dtype):
    """The draft's paged state: a KVCache (draft model), a HeadCache (EAGLE, Medusa) or None."""
    if draft.method == "draft_model":
        c = draft.cfg
        return init_paged(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim, dtype)
    if not draft.keeps_features:
        return None
    shape = (num_pages, 1, page_size, target.hidden_size)
    if store_as_bits(dtype):  # narrow floats are scattered as integers on CPU (kv/bits.py)
        features = BitsPages(jnp.zeros(shape, storage_dtype(dtype)), jnp.dtype(dtype))
    else:
        features = jnp.zeros(shape, dtype)
    kv = None
    if draft.method == "eagle":
        kv = init_paged(1, num_pages, page_size, draft.cfg.num_kv_heads, draft.cfg.head_dim, dtype)
    return HeadCache(features=features, kv=kv)


def read_features(features, page_table: jax.Array, pos: jax.Array) -> jax.Array:
    """f at position pos[b] of each row -> [B, D] (float32 for bf16 pages on CPU)."""
    ps, pp = features.shape[2], page_table.shape[1]
    page = jnp.take_along_axis(page_table, jnp.clip(pos // ps, 0, pp - 1)[:, None], axis=1)[:, 0]
    return read_slots(features, page, pos % ps)[:, 0]


def _write_features(hc: HeadCache, hidden: jax.Array, meta: AttentionMeta) -> HeadCache:
    """Store hidden [B, T, D] at the call's query positions (padding slots dropped)."""
    page, offset = write_slots(meta, hidden.shape[1], hc.features.shape[2], hc.features.shape[0])
    return hc.replace(features=write_pages(hc.features, hidden[:, :, None, :], page, offset))


def _feed_model(draft: DraftSpec, params: Weights, kv: KVCache, tokens: jax.Array, meta: AttentionMeta,
                backend: str) -> KVCache:
    """The draft model's K/V for tokens [B, T] at the call's positions (no logits wanted)."""
    _, _, kv = forward(params, draft.cfg, tokens, meta.query_positions(tokens.shape[1]), kv, meta,
                       backend=backend, logits_at=jnp.zeros((tokens.shape[0], 1), jnp.int32))
    return kv


def _feed_eagle(draft: DraftSpec, params: dict, target: Weights, hc: HeadCache, features: jax.Array,
                tokens: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, meta: AttentionMeta,
                backend: str) -> tuple[jax.Array, HeadCache]:
    """EAGLE over pairs (features [B, T, D], tokens [B, T]) ending at head length kv_lens, q_lens
    valid per row; returns (predicted features [B, T, D], cache)."""
    hmeta = AttentionMeta(meta.page_table, kv_lens, q_lens, slots=meta.slots)
    positions = jnp.maximum(hmeta.query_positions(tokens.shape[1]), 0)
    pred, kv = eagle_forward(params, draft.cfg, target, features.astype(target.dtype), tokens, positions, hc.kv,
                             hmeta, backend)
    return pred, hc.replace(kv=kv)


def record(draft: DraftSpec, params, target: Weights, hc, hidden: jax.Array, tokens: jax.Array,
           meta: AttentionMeta, backend: str):
    """After a target forward over tokens [B, T] (its meta, its hidden [B, T, D]): the draft
    model reads the same tokens; EAGLE and Medusa keep the features, and EAGLE is fed the
    pairs at s-1..e-1 (s..e: each row's positions in this call)."""
    if draft.method == "draft_model":
        return _feed_model(draft, params, hc, tokens, meta, backend)
    if hc is None:
        return hc
    hc = _write_features(hc, hidden, meta)
    if draft.method != "eagle":
        return hc
    start = meta.kv_lens - meta.q_lens
    first = start == 0  # no position before the call: pairs s..e-1 only
    prev = read_features(hc.features, meta.page_table, jnp.maximum(start - 1, 0)).astype(hidden.dtype)
    feats = jnp.where(first[:, None, None], hidden, jnp.concatenate([prev[:, None], hidden[:, :-1]], axis=1))
    toks = jnp.where(first[:, None], jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))), tokens)
    q_lens = jnp.where(first, jnp.maximum(meta.q_lens - 1, 0), meta.q_lens)
    _, hc = _feed_eagle(draft, params, target, hc, feats, toks, jnp.maximum(meta.kv_lens - 1, 0), q_lens, meta,
                        backend)
    return hc


def propose(draft: DraftSpec, params, target: Weights, target_cfg: ModelConfig, kv: KVCache, hc,
            inp, prev: jax.Array, k: int, pen, backend: str, greedy: bool = False):
    """k drafts for rows [B, k+1] = [x_P, ...] (inp: the runner's StepInputs; prev [B]: x_{P-1},
    read by the draft model).

    The first draft is computed on its own (the draft model reads two tokens there), the other
    k - 1 by a `lax.scan` over one copy of the drafting step, so a program's size does not grow
    with k. greedy: every row is greedy (static; no draw is compiled). Returns (drafts [B, k], shaped
    draft logits [B, k, V] (q for verification), kv, hc)."""
    from jaxinfer.spec.verify import draft_sample

    p = inp.kv_lens - (k + 1)  # position of x_P
    active = inp.q_lens > 0
    act = active.astype(jnp.int32)

    def take(logits, i, pen):  # draft i from logits [B, V]; later drafts count it as generated
        d, sh = draft_sample(logits, inp.st, inp.limits, inp.counters + i, greedy, pen)
        return d, sh, (None if pen is None else pen.record(d, active))

    if draft.method == "medusa":  # every head reads the same feature: no autoregressive step
        f = read_features(hc.features, inp.page_table, jnp.maximum(p - 1, 0)).astype(target.dtype)
        logits = medusa_logits(params, target, f, target_cfg)  # [B, heads, V]; head i: x_{P+i+1}
        drafts, shaped = [], []
        for i in range(k):
            d, sh, pen = take(logits[:, i], i, pen)
            drafts.append(d)
            shaped.append(sh)
        return jnp.stack(drafts, axis=1), jnp.stack(shaped, axis=1), kv, hc

    # step(state, tok, i) -> (logits [B, V] for draft i + 1, state): feed d_i (x_P for i = 0) at P + i
    if draft.method == "draft_model":  # the first step feeds [x_{P-1}, x_P] at P-1, P
        def step(state, tok, i):
            toks = tok[:, None]
            q_lens = act
            if i is None:  # the first step
                toks, q_lens, i = jnp.stack([prev, tok], axis=1), jnp.where(active, 2, 0), 0
            meta = AttentionMeta(inp.page_table, p + 1 + i, q_lens, slots=inp.slots)
            logits, _, state = forward(params, draft.cfg, toks, meta.query_positions(toks.shape[1]), state, meta,
                                       backend=backend, logits_at=(q_lens - 1)[:, None])
            return logits[:, 0], state
        state = hc
    elif draft.method == "layer_skip":
        def step(state, tok, i):
            i = 0 if i is None else i
            meta = AttentionMeta(inp.page_table, p + i + 1, act, slots=inp.slots)
            logits, _, state = forward(target, target_cfg, tok[:, None], jnp.maximum(p + i, 0)[:, None], state,
                                       meta, backend=backend, num_layers=draft.num_layers)
            return logits[:, 0], state
        state = kv
    else:  # eagle: the pair (f_{P-1}, x_P) at P-1 gives f_hat_P, hence d_1; then (f_hat_{P+i-1}, d_i) at P+i-1
        def step(state, tok, i):
            i = 0 if i is None else i
            feat, cache = state
            pred, cache = _feed_eagle(draft, params, target, cache, feat[:, None], tok[:, None],
                                      jnp.maximum(p + i, 0), act, inp.meta(), backend)
            return head_logits(params, target, pred[:, 0], target_cfg), (pred[:, 0].astype(feat.dtype), cache)
        state = (read_features(hc.features, inp.page_table, jnp.maximum(p - 1, 0)), hc)

    logits, state = step(state, inp.tokens[:, 0], None)
    d1, q1, pen = take(logits, 0, pen)

    def body(carry, i):
        state, tok, pen = carry
        logits, state = step(state, tok, i)
        d, sh, pen = take(logits, i, pen)
        return (state, d, pen), (d, sh)

    drafts, shaped = d1[:, None], q1[:, None]
    if k > 1:
        (state, _, _), (ds, shs) = jax.lax.scan(body, (state, d1, pen), jnp.arange(1, k, dtype=jnp.int32))
        drafts = jnp.concatenate([drafts, ds.T], axis=1)
        shaped = jnp.concatenate([shaped, shs.transpose(1, 0, 2)], axis=1)
    if draft.method == "draft_model":
        hc = state
    elif draft.method == "layer_skip":
        kv = state
    else:
        hc = state[1]
    return drafts, shaped, kv, hc


def commit(draft: DraftSpec, params, target: Weights, hc, hidden: jax.Array, tokens: jax.Array,
           n_acc: jax.Array, inp, lookup: bool, backend: str):
    """After verification over tokens [B, k+1] = [x_P, d_1..d_k] (hidden [B, k+1, D]). The draft model, after
    prompt-lookup drafts (lookup), reads the verified tokens (rejected positions are rewritten
    before they are read); EAGLE and Medusa keep the features, and EAGLE is fed the true pairs
    (f_{P+j}, d_{j+1}) at P+j for the n_acc accepted drafts (the pair at P+n_acc needs the token
    sampled there, and the next call feeds it)."""
    meta = inp.meta()
    if draft.method == "draft_model":
        return _feed_model(draft, params, hc, tokens, meta, backend) if lookup else hc
    if hc is None:
        return hc
    hc = _write_features(hc, hidden, meta)
    if draft.method != "eagle":
        return hc
    drafts = tokens[:, 1:]
    k = drafts.shape[1]
    p = inp.kv_lens - (k + 1)
    n = jnp.where(inp.q_lens > 0, n_acc, 0)
    _, hc = _feed_eagle(draft, params, target, hc, hidden[:, :k], drafts, jnp.maximum(p + n, 0), n, meta, backend)
    return hc
