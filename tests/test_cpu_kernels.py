"""jaxinfer's native CPU kernels (`cpu_kernels`): the bf16 and float32 matmuls and the paged
attention (bf16 and float32 caches) agree with plain XLA, never read past a row's length, and plug
into the model, the layouts and the engine. Each test is skipped where its kernels cannot be built
(the bf16 ones need AVX512-BF16, the float32 ones AVX512-BF16 or AVX2 with FMA, all a C++
compiler), except the checks of that fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels
from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, BitsPages
from jaxinfer.layers import (
    PanelWeight,
    TiedHead,
    TransposedWeight,
    attention,
    attention_reference,
    resolve_backend,
)
from jaxinfer.model import dense_layout, forward, init_weights, runtime_layout
from jaxinfer.wquant import weight_bytes

needs_bf16 = pytest.mark.skipif(not cpu_kernels.available(jnp.bfloat16),
                                reason=str(cpu_kernels.unavailable_reason(jnp.bfloat16)))
needs_f32 = pytest.mark.skipif(not cpu_kernels.available(jnp.float32),
                               reason=str(cpu_kernels.unavailable_reason(jnp.float32)))
BOTH_DTYPES = [pytest.param(jnp.bfloat16, marks=needs_bf16, id="bfloat16"),
               pytest.param(jnp.float32, marks=needs_f32, id="float32")]


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


@needs_bf16
@pytest.mark.parametrize("rows,k,n", [(1, 512, 1536), (2, 64, 4), (3, 100, 7), (4, 32, 17), (5, 48, 513),
                                      (9, 33, 1), (17, 96, 130), (64, 256, 64), (0, 64, 8), (3, 0, 5)])
def test_bf16_matmul_matches_a_float32_product(rows, k, n):
    """Every tile shape (4x4 tiles, 2- and 1-row remainders, 1-output remainders) and K tails that
    are not a multiple of 32: the products are exact in float32, only the summation order differs."""
    rng = np.random.default_rng(rows * 1000 + k + n)
    x, wt = _bf16(rng, (rows, k)), _bf16(rng, (n, k))
    got = np.asarray(jax.jit(cpu_kernels.bf16_matmul)(x, wt))
    want = np.asarray(x, np.float64) @ np.asarray(wt, np.float64).T
    assert got.shape == (rows, n) and got.dtype == np.float32
    bound = 1e-6 * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(wt, np.float64)).T) + 1e-30
    assert np.all(np.abs(got - want) <= bound * 8)


@needs_bf16
def test_bf16_matmul_rows_are_independent_and_batching_dims_work():
    """A row's result does not depend on its batch-mates (the same tile sums it in the same order
    whatever M is), leading dims are flattened, and vmap runs it row by row."""
    rng = np.random.default_rng(0)
    x, wt = _bf16(rng, (2, 3, 96)), _bf16(rng, (40, 96))
    whole = jax.jit(cpu_kernels.bf16_matmul)(x, wt)
    assert whole.shape == (2, 3, 40)
    one = jax.jit(cpu_kernels.bf16_matmul)(x[1, 2][None], wt)
    np.testing.assert_array_equal(np.asarray(whole[1, 2]), np.asarray(one[0]))
    mapped = jax.jit(jax.vmap(cpu_kernels.bf16_matmul, in_axes=(0, None)))(x, wt)
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(whole))
    with pytest.raises(ValueError, match="bfloat16 expected"):
        cpu_kernels.bf16_matmul(x.astype(jnp.float32), wt)


def _paged_case(rng, b, t, n, kh, h, ps, pp, num_pages, q_lens, kv_lens):
    """Queries and a paged bf16 cache whose slots past each row's length hold NaN: a kernel that
    read them (or weighted them by zero) would return NaN."""
    q = _bf16(rng, (b, t, n, h))
    k = np.asarray(_bf16(rng, (num_pages, kh, ps, h)), np.float32)
    v = np.asarray(_bf16(rng, (num_pages, kh, ps, h)), np.float32)
    table = rng.permutation(num_pages)[:b * pp].reshape(b, pp).astype(np.int32)
    for row in range(b):
        for slot in range(kv_lens[row], pp * ps):
            page, off = table[row, slot // ps], slot % ps
            k[page, :, off], v[page, :, off] = np.nan, np.nan
    meta = AttentionMeta(page_table=jnp.asarray(table), kv_lens=jnp.asarray(kv_lens, jnp.int32),
                         q_lens=jnp.asarray(q_lens, jnp.int32))
    return q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), meta


def _reference(q, k, v, meta, **kw):
    """attention_reference in float32 over the same values, NaN slots zeroed (it masks them, but
    a masked NaN still poisons its products)."""
    k32, v32 = (jnp.nan_to_num(x.astype(jnp.float32)) for x in (k, v))
    return np.asarray(attention_reference(q.astype(jnp.float32), k32, v32, meta, **kw))


def _assert_close_on_valid_queries(got, want, q_lens):
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got))
    for row, q_len in enumerate(q_lens):
        np.testing.assert_allclose(got[row, :q_len], want[row, :q_len], atol=2e-2, rtol=1e-2)  # bf16 output


@needs_f32
@pytest.mark.parametrize("rows,k,n", [(1, 384, 640), (2, 64, 4), (3, 100, 7), (5, 48, 513), (9, 33, 1),
                                      (12, 96, 64), (13, 96, 130), (40, 256, 96), (0, 64, 8), (3, 0, 5)])
def test_f32_matmul_matches_a_float64_product(rows, k, n):
    """Every row pass (1 to 12 rows, and a 13th in a second pass), panel tails (n not a multiple of
    32, a panel with no second vector), an empty batch and an empty contraction."""
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    panels = cpu_kernels.pack_f32(w)
    assert panels.shape == (-(-n // 32), k, 32)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.unpack_f32(panels, n)), np.asarray(w))
    got = np.asarray(jax.jit(cpu_kernels.f32_matmul, static_argnums=2)(x, panels, n))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert got.shape == (rows, n) and got.dtype == np.float32
    bound = 1e-6 * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))) + 1e-30
    assert np.all(np.abs(got - want) <= bound * max(k, 1) ** 0.5 * 4)


@needs_f32
def test_f32_matmul_rows_are_independent_of_batch_and_pass():
    """A row's float32 result is the same bits alone, in a batch of 4 to 13, of 30 or of 80 (the
    AVX2 build's prefill path), whichever pass over the panels takes it, across blocks of k (K =
    96): each output sums its products in order k = 0, 1, ...; leading dims are flattened, vmap
    runs it row by row, and a PanelWeight multiplies through `layers.matmul`."""
    from jaxinfer.layers import matmul
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((80, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 70)), jnp.float32)
    pw = PanelWeight.pack(w)
    assert pw.shape == (96, 70) and pw.dtype == jnp.float32
    mm = jax.jit(matmul)
    whole = np.asarray(mm(x, pw))
    np.testing.assert_array_equal(np.asarray(mm(x[17:18], pw))[0], whole[17])
    np.testing.assert_array_equal(np.asarray(mm(x[15:20], pw))[2], whole[17])
    for rows in (4, 7, 9, 11, 13):  # the AVX2 build's groups of passes: 4, 4+3, 5+4, 6+5, 5+5+3
        np.testing.assert_array_equal(np.asarray(mm(x[17 - rows + 1:18], pw))[-1], whole[17])
    np.testing.assert_array_equal(np.asarray(mm(x[:30], pw))[17], whole[17])
    np.testing.assert_array_equal(np.asarray(mm(x.reshape(5, 16, 96), pw)).reshape(80, 70), whole)
    mapped = jax.jit(jax.vmap(lambda r: matmul(r, pw)))(x)
    np.testing.assert_array_equal(np.asarray(mapped), whole)
    np.testing.assert_allclose(whole, np.asarray(x) @ np.asarray(w), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="float32 expected"):
        cpu_kernels.f32_matmul(x.astype(jnp.bfloat16), pw.panels, 70)


@pytest.mark.parametrize("dtype", BOTH_DTYPES)
@pytest.mark.parametrize("b,t,n,kh,h,ps,pp,window,cap", [
    (4, 1, 8, 8, 64, 16, 6, None, None),  # MHA decode
    (3, 5, 8, 2, 64, 16, 4, None, None),  # GQA, verification-sized steps with padding queries
    (3, 16, 4, 1, 128, 8, 7, None, None),  # MQA, head dim 128, pages smaller than a 16-slot block
    (3, 3, 6, 3, 32, 16, 5, 20, None),  # sliding window
    (2, 4, 12, 2, 96, 16, 3, None, None),  # six heads per kv head (two groups of up to four), head dim 96
    (3, 5, 8, 2, 64, 16, 4, 20, 1.5),  # Gemma 2: soft-capped scores (a cap that binds), sliding window
])
def test_attention_matches_the_reference_and_stops_at_each_rows_length(dtype, b, t, n, kh, h, ps, pp, window, cap):
    rng = np.random.default_rng(b * 100 + t)
    kv_lens = rng.integers(t, ps * pp + 1, b)
    q_lens = np.minimum(rng.integers(0, t + 1, b), kv_lens)
    q_lens[0] = t
    q, k, v, meta = _paged_case(rng, b, t, n, kh, h, ps, pp, b * pp + 3, q_lens, kv_lens)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    kw = {"scale": h ** -0.5, "sliding_window": window, "soft_cap": cap}
    assert cpu_kernels.attention_applies(q, k, v)
    want = _reference(q, k, v, meta, **kw)
    got = jax.jit(lambda q, k, v, m: cpu_kernels.attention(q, k, v, m, **kw))(q, k, v, meta)
    assert got.dtype == dtype
    if dtype == jnp.float32:
        got32 = np.asarray(got)
        assert np.all(np.isfinite(got32))
        for row, q_len in enumerate(q_lens):
            np.testing.assert_allclose(got32[row, :q_len], want[row, :q_len], atol=2e-5, rtol=1e-4)
        cache = (k, v)
    else:
        _assert_close_on_valid_queries(got, want, q_lens)
        cache = [BitsPages(jax.lax.bitcast_convert_type(x, jnp.uint16), jnp.dtype(jnp.bfloat16)) for x in (k, v)]
    via_dispatch = jax.jit(lambda q, k, v, m: attention(q, k, v, m, backend="native", **kw))(q, *cache, meta)
    np.testing.assert_array_equal(np.asarray(via_dispatch, np.float32), np.asarray(got, np.float32))


@pytest.mark.parametrize("dtype", BOTH_DTYPES)
def test_attention_gives_a_token_the_same_bits_whatever_the_call_width(dtype):
    """Verifying T tokens in one call gives each of them exactly what T one-token calls give
    (each query keeps its own softmax over the same blocks): speculative decoding's verify step
    and plain decoding agree bit for bit."""
    rng = np.random.default_rng(7)
    b, t, n, kh, h, ps, pp = 2, 6, 6, 2, 64, 16, 4
    kv_lens = np.array([40, 23], np.int32)
    q, k, v, meta = _paged_case(rng, b, t, n, kh, h, ps, pp, b * pp, [t, t], kv_lens)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    attend = jax.jit(lambda q, m: cpu_kernels.attention(q, k, v, m, scale=0.125))
    wide = np.asarray(attend(q, meta), np.float32)
    for i in range(t):  # token i alone, with the cache as long as it sees
        one = AttentionMeta(page_table=meta.page_table, kv_lens=jnp.asarray(kv_lens - t + 1 + i),
                            q_lens=jnp.ones((b,), jnp.int32))
        np.testing.assert_array_equal(np.asarray(attend(q[:, i:i + 1], one), np.float32), wide[:, i:i + 1])


@pytest.mark.parametrize("dtype", BOTH_DTYPES)
@pytest.mark.parametrize("n,kh", [(6, 2), (4, 4)])  # GQA (AVX2: transposed K blocks), MHA (dot products)
def test_prefill_attention_gives_each_token_its_one_token_bits_across_chunks(dtype, n, kh):
    """A prefill-wide call (70 tokens: three of the kernel's 32-token chunks, the last partial)
    matches the reference, on top of a cached prefix (prefix caching) and with a padded row, and
    gives each token exactly the bits a one-token call gives it: a prompt prefilled whole, in the
    engine's chunks or token by token attends alike."""
    rng = np.random.default_rng(11)
    b, t, h, ps, pp = 2, 70, 64, 16, 7
    kv_lens = np.array([100, 57], np.int32)  # row 0: 30 cached tokens before its 70
    q_lens = np.array([70, 57], np.int32)  # row 1: a 57-token prompt padded to 70
    q, k, v, meta = _paged_case(rng, b, t, n, kh, h, ps, pp, b * pp, q_lens, kv_lens)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    assert cpu_kernels.attention_applies(q, k, v)
    attend = jax.jit(lambda q, m: cpu_kernels.attention(q, k, v, m, scale=0.125))
    wide = np.asarray(attend(q, meta), np.float32)
    want = _reference(q, k, v, meta, scale=0.125)
    if dtype == jnp.float32:
        for row, q_len in enumerate(q_lens):
            np.testing.assert_allclose(wide[row, :q_len], want[row, :q_len], atol=2e-5, rtol=1e-4)
        assert np.all(wide[1, 57:] == 0)  # padding queries give zeros
    else:
        _assert_close_on_valid_queries(wide, want, q_lens)
    for i in (0, 31, 32, 56, 63, 64, 69):  # token i alone, with the cache as long as it sees
        one = AttentionMeta(page_table=meta.page_table, kv_lens=jnp.asarray(np.minimum(kv_lens - q_lens + 1 + i, kv_lens)),
                            q_lens=jnp.asarray((i < q_lens).astype(np.int32)))
        got = np.asarray(attend(q[:, i:i + 1], one), np.float32)
        for row in range(b):
            if i < q_lens[row]:
                np.testing.assert_array_equal(got[row, 0], wide[row, i])


@needs_bf16
def test_attention_reads_a_contiguous_cache_like_its_pages():
    """A contiguous [B, K, S, H] cache is one page of S slots per row: the same result as the same
    slots laid out in pages (bit for bit: the same blocks of 16 slots in the same order)."""
    rng = np.random.default_rng(3)
    b, kh, s, h = 3, 2, 48, 64
    q = _bf16(rng, (b, 1, 4, h))
    k, v = _bf16(rng, (b, kh, s, h)), _bf16(rng, (b, kh, s, h))
    lens = jnp.asarray([48, 17, 1], jnp.int32)
    ones = jnp.ones((b,), jnp.int32)
    contiguous = AttentionMeta(page_table=jnp.zeros((b, 1), jnp.int32), kv_lens=lens, q_lens=ones, contiguous=True)
    got = cpu_kernels.attention(q, k, v, contiguous, scale=0.125)
    want = _reference(q, k, v, contiguous, scale=0.125)
    _assert_close_on_valid_queries(got, want, [1] * b)
    ps = 16  # the same slots as pages [B * S / ps, K, ps, H]
    pages = [x.reshape(b, kh, s // ps, ps, h).transpose(0, 2, 1, 3, 4).reshape(-1, kh, ps, h) for x in (k, v)]
    table = jnp.arange(b * (s // ps), dtype=jnp.int32).reshape(b, s // ps)
    paged = cpu_kernels.attention(q, *pages, AttentionMeta(table, lens, ones), scale=0.125)
    np.testing.assert_array_equal(np.asarray(paged, np.float32), np.asarray(got, np.float32))


def test_native_attention_backend_falls_back_to_xla_where_the_kernel_does_not_apply():
    """Head dims that are not multiples of 32, queries whose dtype is not the cache's and caches
    of other dtypes take the "xla" path under backend "native" (same result as "xla"); prefill-wide
    calls take the kernel."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((5, 2, 8, 16)), jnp.float32) for _ in range(2))
    meta = AttentionMeta(jnp.asarray([[0, 1], [2, 3]], jnp.int32), jnp.asarray([9, 12], jnp.int32),
                         jnp.asarray([3, 2], jnp.int32))
    assert not cpu_kernels.attention_applies(q, k, v)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, meta, scale=0.25, backend="native")),
                                  np.asarray(attention(q, k, v, meta, scale=0.25, backend="xla")))
    q32, k32 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 3, 4, 32), (5, 2, 8, 32)))
    assert cpu_kernels.attention_applies(q32, k32, k32) == cpu_kernels.available(jnp.float32)
    assert not cpu_kernels.attention_applies(q32.astype(jnp.bfloat16), k32, k32)
    assert not cpu_kernels.attention_applies(q32.astype(jnp.float16), k32.astype(jnp.float16), k32.astype(jnp.float16))
    assert cpu_kernels.attention_applies(jnp.zeros((2, 200, 4, 32)), k32, k32) == cpu_kernels.available(jnp.float32)
    assert resolve_backend("xla") == "xla" and resolve_backend("pallas") == "pallas"
    for dtype in (jnp.bfloat16, jnp.float32):
        assert resolve_backend("auto", dtype) == ("native" if cpu_kernels.available(dtype) else "xla")
    assert resolve_backend("auto", jnp.float16) == "xla"


CFG = ModelConfig("LlamaForCausalLM", vocab_size=97, hidden_size=128, intermediate_size=192, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True)


def _logits(weights) -> np.ndarray:
    """CFG's logits for two fixed 7-token rows (no cache)."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    return np.asarray(jax.jit(forward, static_argnames=("cfg",))(weights, CFG, tokens, pos, None, None)[0])


@needs_bf16
def test_native_layout_reads_tied_embeddings_in_place_and_computes_the_same_logits():
    """weight_layout "native": TransposedWeights sent to the kernel, the tied embedding serving as
    the LM head without a copy (not counted twice, dropped by dense_layout); logits agree with
    "out_in" (XLA's dot) to bf16 precision, and the same holds with the native attention."""
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
    assert w.lm_head is None
    native = runtime_layout(w, "native")
    assert native.layers[0].wqkv.native and isinstance(native.lm_head, TransposedWeight)
    assert native.lm_head.tied and native.lm_head.wt is native.embed
    assert weight_bytes(native)["total"] == weight_bytes(w)["total"]
    back = dense_layout(native)
    assert back.lm_head is None
    np.testing.assert_array_equal(np.asarray(back.layers[1].w_down, np.float32), np.asarray(w.layers[1].w_down, np.float32))
    np.testing.assert_allclose(_logits(native), _logits(runtime_layout(w, "out_in")), atol=5e-2, rtol=5e-2)
    assert runtime_layout(w, "auto").layers[0].wqkv.native


@needs_f32
def test_native_f32_layout_packs_panels_and_computes_the_same_logits():
    """weight_layout "native" for float32: every projection a PanelWeight, the tied embedding a
    packed copy as the LM head (dropped by dense_layout, which gives the arrays back bit for bit);
    logits agree with "in_out" (XLA's dot) to float32 precision."""
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1)
    native = runtime_layout(w, "native")
    assert isinstance(native.layers[0].wqkv, PanelWeight) and native.lm_head.tied
    assert native.lm_head.shape == (CFG.hidden_size, CFG.vocab_size)
    assert isinstance(runtime_layout(w, "auto").layers[1].w_down, PanelWeight)
    back = dense_layout(native)
    assert back.lm_head is None
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(w), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(_logits(native), _logits(runtime_layout(w, "in_out")), atol=1e-4, rtol=1e-4)


def test_native_layout_refuses_what_the_kernel_cannot_run():
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.float16, std=0.1)
    with pytest.raises(ValueError, match="native.*bfloat16 or float32.*float16"):
        runtime_layout(w, "native")
    assert not isinstance(runtime_layout(w, "auto").layers[0].wqkv, (TransposedWeight, PanelWeight))


@pytest.fixture(scope="module")
def head32_dir(tmp_path_factory):
    """A tiny Llama whose heads the attention kernel takes (head_dim 32), tied embeddings."""
    from hf_models import write_tiny
    return write_tiny("llama", tmp_path_factory.mktemp("head32"), head_dim=32, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", BOTH_DTYPES)
def test_engine_and_static_generate_agree_on_the_native_paths(head32_dir, dtype):
    """Greedy decoding with the native matmul and attention: the engine (paged cache, batches that
    change every step) and generate_static (contiguous cache) give the same tokens."""
    from jaxinfer import LLM, SamplingParams
    llm = LLM(str(head32_dir), dtype=jnp.dtype(dtype).name, max_model_len=96)
    assert llm.engine_config.attention_backend == "native"
    if dtype == jnp.bfloat16:
        assert llm.weights.layers[0].wqkv.native and llm.weights.lm_head.tied
    else:
        assert isinstance(llm.weights.layers[0].wqkv, PanelWeight) and llm.weights.lm_head.tied
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    static = [o.outputs[0].token_ids for o in llm.generate_static(prompts, params)]
    assert engine == static


@needs_bf16
def test_native_bf16_prompt_logprobs_stay_within_the_bf16_tolerance(head32_dir):
    """Prefill in chunks of 8 tokens, so every chunk's attention runs in the kernel (causal queries
    over a cached prefix): prompt logprobs within 0.1 nats of float32 (the stated bf16 tolerance,
    test_parity), and close to bf16 on XLA's paths."""
    from jaxinfer import LLM, SamplingParams
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 128, size=n).tolist()} for n in (9, 26, 40)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def logprobs(**kw):
        outs = LLM(str(head32_dir), max_num_batched_tokens=8, **kw).generate(prompts, params)
        return [np.array([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]) for o in outs]
    f32 = logprobs(dtype="float32", attention_backend="xla")
    xla = logprobs(dtype="bfloat16", attention_backend="xla", weight_layout="out_in")
    native = logprobs(dtype="bfloat16", attention_backend="native", weight_layout="native")
    for a, b, c in zip(f32, xla, native, strict=True):
        assert np.max(np.abs(c - a)) < 0.1
        assert np.max(np.abs(c - b)) < 0.1


def test_unavailable_kernels_say_why_and_leave_xla_in_charge(monkeypatch, tmp_path):
    """No compiler: available() is False with the compiler's complaint, and "auto" picks XLA's
    paths. The loaded state is restored afterwards."""
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : avx512f avx512_bf16")
    cpu_kernels._load.cache_clear()
    try:
        assert not cpu_kernels.available()
        assert "no-such-compiler" in cpu_kernels.unavailable_reason()
        assert resolve_backend("auto") == "xla"
        w = init_weights(CFG, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
        assert not runtime_layout(w, "auto").layers[0].wqkv.native
        f32 = runtime_layout(init_weights(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1), "auto")
        assert isinstance(f32.layers[0].wqkv, jax.Array) and isinstance(f32.lm_head, TiedHead)  # in_out
        with pytest.raises(ValueError, match="no-such-compiler"):
            runtime_layout(w, "native")
    finally:
        cpu_kernels._load.cache_clear()
    monkeypatch.undo()
    cpu_kernels.available()  # loaded (and registered) again for the rest of the session



def test_the_build_serves_the_dtypes_this_cpu_runs():
    """AVX512-BF16 builds all four kernels; AVX2 with FMA alone builds the float32 two, and bf16
    weights then stay on XLA's paths, with the reason given where "native" is asked for."""
    if not cpu_kernels.available():
        pytest.skip(str(cpu_kernels.unavailable_reason()))
    flags = set(cpu_kernels._cpu_flags().split())
    assert cpu_kernels.available(jnp.float32) and resolve_backend("auto", jnp.float32) == "native"
    assert cpu_kernels.available(jnp.bfloat16) == ("avx512_bf16" in flags)
    if "avx512_bf16" in flags:
        return
    assert "AVX512-BF16" in cpu_kernels.unavailable_reason(jnp.bfloat16)
    assert cpu_kernels.unavailable_reason(jnp.float32) is None
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    w = init_weights(CFG, jax.random.PRNGKey(0), jnp.bfloat16, std=0.1)
    assert not runtime_layout(w, "auto").layers[0].wqkv.native
    with pytest.raises(ValueError, match="weight_layout='native'.*AVX512-BF16"):
        runtime_layout(w, "native")
    with pytest.raises(RuntimeError, match="bf16 kernel is unavailable.*AVX512-BF16"):
        cpu_kernels.bf16_matmul(w.embed[:2], w.embed)
