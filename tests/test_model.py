"""The cache is exact: cached decode == full recomputation; paged == contiguous."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, init_contiguous, init_paged
from jaxinfer.layers import TiedHead, TransposedWeight, dense_dot
from jaxinfer.model import dense_layout, forward, init_weights, loop_layout, runtime_layout

CFG = ModelConfig("LlamaForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)


_forward = jax.jit(forward, static_argnames=("cfg",))


def _full_logits(w, tokens):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return _forward(w, CFG, tokens, pos, None, None)[0]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_cached_decode_equals_full_recompute(dtype, tol):
    w = init_weights(CFG, jax.random.PRNGKey(0), dtype, std=0.1)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CFG.vocab_size)
    full = _full_logits(w, tokens)  # [B, 12, V]
    kv, pt = init_contiguous(CFG.num_layers, 2, 32, CFG.num_kv_heads, CFG.head_dim, dtype)
    # prefill 5 tokens, then decode one at a time
    lens = jnp.array([5, 5])
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, _, kv = _forward(w, CFG, tokens[:, :5], pos, kv, AttentionMeta(pt, lens, lens, True))
    np.testing.assert_allclose(logits, full[:, :5], atol=tol, rtol=tol)
    for i in range(5, 12):
        meta = AttentionMeta(pt, jnp.array([i + 1, i + 1]), jnp.array([1, 1]), True)
        logits, _, kv = _forward(w, CFG, tokens[:, i:i + 1], jnp.full((2, 1), i), kv, meta)
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=tol, rtol=tol)


@pytest.mark.parametrize("tied,window", [(False, None), (True, 8)])
def test_flop_counts_follow_the_weight_shapes_and_the_window(tied, window):
    """matmul_flops_per_token is 2 x the projection matrices' sizes (plus the head's) as
    init_weights builds them; attention is linear in the context up to the sliding window."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, sliding_window=window)
    w = init_weights(cfg, jax.random.PRNGKey(0))
    mats = sum(x.size for layer in w.layers for x in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    head = (w.embed if w.lm_head is None else w.lm_head).size
    assert cfg.matmul_flops_per_token(lm_head=False) == 2 * mats
    assert cfg.matmul_flops_per_token() == 2 * (mats + head)
    one = cfg.attention_flops_per_token(1)
    assert one == 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    assert cfg.attention_flops_per_token(6) == 6 * one
    assert cfg.attention_flops_per_token(100) == (8 if window else 100) * one


def test_runtime_layout_transposes_bf16_projections_on_cpu_and_computes_the_same_logits():
    """bf16 weights on CPU run as TransposedWeights (an untied LM head too); the logits are the
    same dot products (float32 accumulation, another order); dense_layout gives back the exact
    arrays. float32 weights keep theirs under "in_out" (what "auto" gives them where the native
    kernels are unavailable; test_cpu_kernels covers "native")."""
    cfg = CFG  # untied: an lm_head of its own
    w = init_weights(cfg, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
    assert w.lm_head is not None
    laid = runtime_layout(w)
    for layer, orig in zip(laid.layers, w.layers, strict=True):
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            t, d = getattr(layer, name), getattr(orig, name)
            assert isinstance(t, TransposedWeight) and t.wt.shape == d.shape[::-1] and t.shape == d.shape
    assert isinstance(laid.lm_head, TransposedWeight)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    run = jax.jit(forward, static_argnames=("cfg",))
    for t in (9, 1):  # a prompt, and one-row steps (the padded two-row dot)
        a = run(w, cfg, tokens[:1, :t], pos[:1, :t], None, None)[0]
        b = run(laid, cfg, tokens[:1, :t], pos[:1, :t], None, None)[0]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-2, rtol=3e-2)
        assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.8
    back = dense_layout(laid)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(w), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    w32 = init_weights(cfg, jax.random.PRNGKey(0), jnp.float32)
    assert runtime_layout(w32, "in_out") is w32


def test_loop_layout_multiplies_transposed_weights_as_the_left_operand():
    """model.loop_layout (the static decode loop on CPU) writes products of three or more rows
    with a TransposedWeight, the tied head included, as wt @ x^T: the same products."""
    w = jax.random.normal(jax.random.PRNGKey(0), (24, 40))
    for rows in (1, 2, 3, 8):
        x = jax.random.normal(jax.random.PRNGKey(rows), (rows, 24))
        for t in (TransposedWeight(w.T), TransposedWeight(w.T, lhs=True)):
            np.testing.assert_allclose(np.asarray(dense_dot(x, t)), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    laid = runtime_layout(init_weights(cfg, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1))
    loop = loop_layout(laid)
    assert loop.lm_head.lhs and all(getattr(layer, n).lhs for layer in loop.layers for n in ("wqkv", "w_down"))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 9), 0, cfg.vocab_size)
    pos = jnp.arange(9)[None]
    a, b = (_forward(v, cfg, tokens, pos, None, None)[0] for v in (laid, loop))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-2, rtol=3e-2)


def test_runtime_layout_gives_a_tied_float32_head_its_own_copy_on_cpu():
    """float32 tied embeddings on CPU, "in_out", get a [D, V] copy as the LM head (TiedHead); the logits are
    the same float32 dot products; dense_layout drops the copy (the checkpoint stays tied)."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    w = init_weights(cfg, jax.random.PRNGKey(0), jnp.float32, std=0.1)
    assert w.lm_head is None
    laid = runtime_layout(w, "in_out")  # "auto" where the native kernels are unavailable
    assert isinstance(laid.lm_head, TiedHead) and laid.lm_head.shape == (cfg.hidden_size, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(laid.lm_head.w), np.asarray(w.embed).T)
    assert laid.layers is w.layers  # the projections as they were
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
    a = _forward(w, cfg, tokens, pos, None, None)[0]
    b = _forward(laid, cfg, tokens, pos, None, None)[0]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    back = dense_layout(laid)
    assert back.lm_head is None
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(w), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    w16 = init_weights(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    assert runtime_layout(w16, "in_out") is w16  # bf16: no copy (it gains nothing there)


def test_paged_cache_with_scattered_pages_equals_contiguous():
    """Chunked prefill (T=3 over a cached prefix) into shuffled pages of size 4."""
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, CFG.vocab_size)
    full = _full_logits(w, tokens)
    kv = init_paged(CFG.num_layers, num_pages=9, page_size=4, num_kv_heads=CFG.num_kv_heads,
                    head_dim=CFG.head_dim, dtype=jnp.float32)
    page_table = jnp.array([[7, 2, 5], [0, 8, 3]], jnp.int32)  # pages 1, 4, 6 unused
    for start in range(0, 12, 3):
        meta = AttentionMeta(page_table, jnp.array([start + 3] * 2), jnp.array([3, 3]))
        pos = jnp.broadcast_to(jnp.arange(start, start + 3), (2, 3))
        logits, _, kv = _forward(w, CFG, tokens[:, start:start + 3], pos, kv, meta)
        np.testing.assert_allclose(logits, full[:, start:start + 3], atol=1e-5, rtol=1e-5)
    for unused in (1, 4, 6):  # no row wrote outside its own pages
        assert not np.any(np.asarray(kv.k[0][unused]))


def test_padding_tokens_do_not_write_or_leak():
    """A row with fewer valid query tokens leaves its padding slots unwritten."""
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 6), 0, CFG.vocab_size)
    kv, pt = init_contiguous(CFG.num_layers, 2, 16, CFG.num_kv_heads, CFG.head_dim, jnp.float32)
    meta = AttentionMeta(pt, jnp.array([6, 2]), jnp.array([6, 2]), True)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits, _, kv = _forward(w, CFG, tokens, pos, kv, meta)
    assert not np.any(np.asarray(kv.k[0][1, :, 2:]))
    short = _full_logits(w, tokens[1:, :2])
    np.testing.assert_allclose(logits[1, :2], short[0], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the one-row padding is CPU-only")
def test_bf16_one_token_step_equals_the_first_row_of_a_wider_step():
    """A bf16 one-token step and a k+1-token verification step over the same cache give the same
    logits for their shared first token, bit for bit: one-row dots run as two rows on CPU, on the
    kernel the wider step uses (XLA:CPU's one-row bf16 path rounds differently, and greedy
    speculative decoding in bf16 then drifted from plain decoding at near-ties)."""
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 24), 0, CFG.vocab_size)
    kv, pt = init_contiguous(CFG.num_layers, 1, 32, CFG.num_kv_heads, CFG.head_dim, jnp.bfloat16)
    meta = AttentionMeta(pt, jnp.array([16]), jnp.array([16]), contiguous=True)
    _, _, kv = _forward(w, CFG, tokens[:, :16], jnp.arange(16)[None], kv, meta)
    first = {}
    for t in (1, 2, 5, 8):
        meta = AttentionMeta(pt, jnp.array([16 + t]), jnp.array([t]), contiguous=True)
        logits, hidden, _ = _forward(w, CFG, tokens[:, 16:16 + t], 16 + jnp.arange(t)[None], kv, meta)
        first[t] = np.asarray(logits[0, 0]), np.asarray(hidden[0, 0], np.float32)
    for t in (2, 5, 8):
        np.testing.assert_array_equal(first[t][1], first[1][1])
        np.testing.assert_array_equal(first[t][0], first[1][0])


def test_bf16_pages_on_cpu_are_stored_as_bits_and_read_back_exactly():
    """On CPU, bf16 pages are kept as uint16 bits (XLA:CPU would convert a bf16 cache to f32 and
    back for every scatter). Writes must store exactly what a plain bf16 page array stores, and
    the XLA read path returns exactly those values (as float32). Through the model, logits agree
    with a plain bf16 cache within bf16 tolerance (the bits are read as float32, so attention
    probabilities are not rounded to bf16 as they are over a bf16 array)."""
    from jaxinfer.kv.cache import BitsPages, KVCache, gather_pages, page_values, write_pages, write_slots

    bits = init_paged(1, num_pages=5, page_size=4, num_kv_heads=2, head_dim=16, dtype=jnp.bfloat16).k[0]
    if jax.default_backend() == "cpu":
        assert isinstance(bits, BitsPages) and bits.bits.dtype == jnp.uint16
    plain = page_values(bits)
    assert not isinstance(plain, BitsPages) and plain.dtype == jnp.bfloat16
    table = jnp.array([[3, 0], [4, 1]], jnp.int32)

    @functools.partial(jax.jit, static_argnums=3)  # a program per (storage, t), not one per op
    def write_and_read(pages, new, meta, t):
        page, offset = write_slots(meta, t, 4, 5)
        pages = write_pages(pages, new, page, offset)
        return pages, page_values(pages), gather_pages(pages, meta)

    for start, t, seed in [(0, 5, 0), (5, 1, 1), (6, 2, 2)]:  # 5 tokens across a page boundary, then more
        new = jax.random.normal(jax.random.PRNGKey(seed), (2, t, 2, 16))
        meta = AttentionMeta(table, jnp.array([start + t, start + t]), jnp.array([t, t - 1]))  # row 1: one pad
        bits, bits_values, got = write_and_read(bits, new, meta, t)
        plain, _, want = write_and_read(plain, new, meta, t)
        np.testing.assert_array_equal(np.asarray(bits_values, np.float32), np.asarray(plain, np.float32))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.any(np.asarray(plain, np.float32)) and not np.any(np.asarray(plain[2], np.float32))

    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, CFG.vocab_size)
    kv = init_paged(CFG.num_layers, num_pages=7, page_size=4, num_kv_heads=CFG.num_kv_heads,
                    head_dim=CFG.head_dim, dtype=jnp.bfloat16)
    kv_plain = KVCache(k=[page_values(x) for x in kv.k], v=[page_values(x) for x in kv.v])
    page_table = jnp.array([[6, 1, 4], [0, 3, 5]], jnp.int32)
    for start, t in [(0, 6)] + [(i, 1) for i in range(6, 10)]:  # prefill 6 tokens, then decode 4
        meta = AttentionMeta(page_table, jnp.array([start + t] * 2), jnp.array([t, t]))
        pos = jnp.broadcast_to(jnp.arange(start, start + t), (2, t))
        got, _, kv = _forward(w, CFG, tokens[:, start:start + t], pos, kv, meta)
        want, _, kv_plain = _forward(w, CFG, tokens[:, start:start + t], pos, kv_plain, meta)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("impl,t,window,cap", [("ragged", 1, None, None), ("ragged", 1, 50, None),
                                               ("ragged", 6, None, None), ("ragged", 6, 50, None),
                                               ("ragged", 6, 50, 1.5), ("loop", 6, None, None),
                                               ("loop", 6, 50, None), ("loop", 6, 50, 1.5)])
def test_paged_attention_equals_the_reference(impl, kind, t, window, cap):
    """The engine's XLA attention against `attention_reference` over the same pages:
    `attention_paged_loop` (a few pages per iteration, up to the longest row, online softmax) and
    `attention_paged_ragged` (work items of 16 pages, per row up to its own length, folded into
    the rows with segment operations; the engine's decode and verification path; the loop serves
    wider calls, so it is checked at 6 tokens). Rows span several iterations or items (pages of 4 slots),
    the table is wider than any row needs and its unused entries point at pages full of other
    rows' keys, one row is padding (no tokens), and one row's queries are partly padding. cap:
    Gemma 2's soft-capped scores (a cap below the scores' spread, so that it binds)."""
    from jaxinfer.kv.cache import write_pages, write_slots
    from jaxinfer.kv.quant import KVQuantSpec
    from jaxinfer.layers import attention_paged_loop, attention_paged_ragged, attention_reference

    paged = {"loop": attention_paged_loop, "ragged": attention_paged_ragged}[impl]

    ps, kh, g, h, num_pages = 4, 2, 3, 16, 200
    spec = KVQuantSpec.parse(kind, h) if kind == "int8" else None
    dtype = jnp.float32 if kind == "int8" else jnp.dtype(kind)
    kv = init_paged(1, num_pages, ps, kh, h, dtype, spec)
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.permutation(num_pages)[:4 * 50].reshape(4, 50), jnp.int32)
    fill = AttentionMeta(table, jnp.full((4,), 200), jnp.full((4,), 200))  # every page written
    kvals, vvals = (jnp.asarray(rng.normal(size=(4, 200, kh, h)), jnp.float32) for _ in range(2))
    page, offset = write_slots(fill, 200, ps, num_pages)
    k_pages, v_pages = write_pages(kv.k[0], kvals, page, offset), write_pages(kv.v[0], vvals, page, offset)
    kv_lens = jnp.array([173, 0, 40, 130], jnp.int32)  # row 1: padding; longest needs 44 of 50 pages
    q_lens = jnp.array([t, 0, max(1, t - 2), t], jnp.int32)
    meta = AttentionMeta(table, kv_lens, q_lens)
    q = jnp.asarray(rng.normal(size=(4, t, kh * g, h)), jnp.float32).astype(dtype)
    want = attention_reference(q, k_pages, v_pages, meta, scale=h ** -0.5, sliding_window=window, soft_cap=cap)
    loop = jax.jit(lambda q, k, v, m: paged(q, k, v, m, scale=h ** -0.5, sliding_window=window, soft_cap=cap))
    got = loop(q, k_pages, v_pages, meta)
    valid = (jnp.arange(t)[None, :] < q_lens[:, None])[:, :, None, None]
    err = jnp.max(jnp.where(valid, jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)), 0))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the two round their outputs to bf16 apart
    assert float(err) <= tol * float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    # the same keys behind a table only as wide as the longest row: same result
    narrow = loop(q, k_pages, v_pages, AttentionMeta(table[:, :44], kv_lens, q_lens))
    np.testing.assert_allclose(np.asarray(narrow, np.float32), np.asarray(got, np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("impl", ["ragged", "reference"])
def test_one_row_mqa_decode_over_pages_equals_a_plain_softmax(impl, g):
    """One row of an MQA model decoding over scattered pages, jitted: the case (one batch entry in
    the grouped-query products) that jax 0.10.2's XLA:CPU miscompiled as a fused page gather +
    multiply-reduce, every score taking key 0's value (the engine then decoded a single MQA
    request wrongly). Checked against attention written out in numpy."""
    from jaxinfer.kv.cache import write_pages, write_slots
    from jaxinfer.layers import attention_paged_ragged, attention_reference

    fn = {"ragged": attention_paged_ragged, "reference": attention_reference}[impl]
    ps, h, num_pages, length = 4, 16, 20, 13
    rng = np.random.default_rng(g)
    table = jnp.asarray([[3, 7, 1, 9]], jnp.int32)
    keys, values = (rng.normal(size=(1, length, 1, h)).astype(np.float32) for _ in range(2))
    kv = init_paged(1, num_pages, ps, 1, h, jnp.float32)
    page, offset = write_slots(AttentionMeta(table, jnp.array([length]), jnp.array([length])), length, ps, num_pages)
    k_pages, v_pages = (write_pages(kv.k[0], jnp.asarray(x), page, offset) for x in (keys, values))
    q = rng.normal(size=(1, 1, g, h)).astype(np.float32)
    got = jax.jit(lambda q, k, v, m: fn(q, k, v, m, scale=h ** -0.5))(
        jnp.asarray(q), k_pages, v_pages, AttentionMeta(table, jnp.array([length]), jnp.array([1])))
    scores = np.einsum("nh,sh->ns", q[0, 0], keys[0, :, 0]) * h ** -0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ values[0, :, 0]
    np.testing.assert_allclose(np.asarray(got[0, 0]), want, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_contiguous_bf16_bits_loop_equals_the_reference(t):
    """Static generation's bf16 cache on CPU (bits, [B, K, S, H]) runs `attention_paged_loop` over
    slot slices (S = 96: slices of 32, three iterations for the longest row) and must agree with
    `attention_reference` reading the whole cache; slots past a row's length hold other values."""
    from jaxinfer.kv.cache import BitsPages, init_contiguous
    from jaxinfer.layers import attention_paged_loop, attention_reference, contiguous_bits_loop

    kv, table = init_contiguous(1, 3, 96, 2, 16, jnp.bfloat16)
    if not isinstance(kv.k[0], BitsPages):
        pytest.skip("bf16 caches are stored as bits on CPU only")
    rng = np.random.default_rng(1)
    vals = [jnp.asarray(rng.normal(size=(3, 2, 96, 16)), jnp.bfloat16) for _ in range(2)]
    k, v = (kv.k[0].replace(bits=jax.lax.bitcast_convert_type(x, jnp.uint16)) for x in vals)
    meta = AttentionMeta(table, jnp.array([90, 7, 40], jnp.int32), jnp.array([t, 1, t], jnp.int32), True)
    q = jnp.asarray(rng.normal(size=(3, t, 6, 16)), jnp.bfloat16)
    assert contiguous_bits_loop(q, k, meta)
    want = attention_reference(q, k, v, meta, scale=0.25)
    got = jax.jit(lambda q, k, v, m: attention_paged_loop(q, k, v, m, scale=0.25))(q, k, v, meta)
    valid = (jnp.arange(t)[None, :] < meta.q_lens[:, None])[:, :, None, None]
    err = jnp.max(jnp.where(valid, jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)), 0))
    assert float(err) <= 1e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32))))


@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 30.0)])
def test_fresh_prompt_attention_equals_the_reference_over_the_whole_cache(window, cap):
    """A prompt into an empty cache (`AttentionMeta.fresh`) attends over its own slots alone: the
    valid queries of right-padded rows (lengths 13, 4, 0) get what `attention_reference` gives
    reading the whole 40-slot cache, whose later slots hold other values; and a fresh prompt through
    the model gives the logits of the same prompt without the flag."""
    from jaxinfer.layers import attention, attention_reference

    b, t, n, kh, h, s = 3, 13, 4, 2, 16, 40
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32) for _ in range(2))
    lens = jnp.array([13, 4, 0], jnp.int32)
    cache = [jnp.asarray(rng.normal(size=(b, kh, s, h)), jnp.float32) for _ in range(2)]
    kc, vc = (c.at[:, :, :t].set(x.transpose(0, 2, 1, 3)) for c, x in zip(cache, (k, v)))
    meta = AttentionMeta(jnp.zeros((b, 1), jnp.int32), lens, lens, True)
    want = attention_reference(q, kc, vc, meta, scale=0.25, sliding_window=window, soft_cap=cap)
    fresh = meta.replace(fresh=True)
    got = jax.jit(lambda q, k, v: attention(q, k, v, fresh, scale=0.25, sliding_window=window, soft_cap=cap))(q, kc, vc)
    valid = (jnp.arange(t)[None, :] < lens[:, None])[:, :, None, None]
    np.testing.assert_allclose(np.asarray(jnp.where(valid, got, 0)), np.asarray(jnp.where(valid, want, 0)),
                               atol=2e-6)

    cfg = dataclasses.replace(CFG, sliding_window=window)
    weights = init_weights(cfg, jax.random.PRNGKey(0), std=0.1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 9)), jnp.int32)
    plens = jnp.array([9, 6], jnp.int32)

    def logits(fresh):
        kv, table = init_contiguous(cfg.num_layers, 2, 32, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        m = AttentionMeta(table, plens, plens, True, fresh=fresh)
        return forward(weights, cfg, tokens, jnp.broadcast_to(jnp.arange(9), (2, 9)), kv, m, backend="xla",
                             logits_at=(plens - 1)[:, None])[0]
    np.testing.assert_allclose(np.asarray(logits(True)), np.asarray(logits(False)), atol=1e-5)
