"""Quantized KV: round-trip bounds, 4-bit packing, no NaN/Inf, attention tolerance, real bytes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import write_tiny
from jaxinfer import LLM, SamplingParams
from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, init_paged, write_pages, write_slots
from jaxinfer.kv.memory import load_model_config, memory_report
from jaxinfer.kv.quant import KVQuantSpec, dequantize_pages, page_bytes_per_token, quantize_tokens
from jaxinfer.layers import attention
from pallas_kernels import kv_formats as kvf

FORMATS = ["fp8_e4m3", "fp8_e5m2", "int8", "int4", "nvfp4"]
# Worst-case error of one value, relative to its group's absmax (format step + bf16 scale rounding).
BOUND = {"int8": 0.5 / 127 + 2 ** -8, "int4": 0.5 / 7 + 2 ** -8, "fp8_e4m3": 2 ** -4 + 2 ** -8,
         "fp8_e5m2": 2 ** -3 + 2 ** -8, "nvfp4": 1 / 6 + 2 ** -4}


def _data(kind, shape=(4, 3, 64)):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    if kind == "outliers":  # a few channels 100x larger, as in real keys
        x = x.at[..., 5].mul(100.0).at[..., 40].mul(-60.0)
    return x


@pytest.mark.parametrize("kind", ["normal", "outliers"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_bound(fmt, kind):
    spec = KVQuantSpec.parse(fmt, 64)
    x = _data(kind)
    data, scale, _ = quantize_tokens(x, spec)
    y = dequantize_pages(data[..., None, :], scale[..., None, :], spec, 64, jnp.float32)[..., 0, :]
    cg = spec.channel_group
    amax = jnp.repeat(jnp.max(jnp.abs(x).reshape(*x.shape[:-1], -1, cg), axis=-1), cg, axis=-1)
    err = jnp.abs(y - x) / amax
    assert float(err.max()) <= BOUND[fmt], (fmt, float(err.max()))
    assert float(jnp.mean(jnp.abs(y - x))) < 0.5 * BOUND[fmt] * float(jnp.mean(amax))


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_beyond_range_clip_and_never_nan(fmt):
    spec = KVQuantSpec.parse(fmt, 64)
    x = jnp.concatenate([jnp.full((1, 32), 1e30), jnp.full((1, 32), -3e38)], axis=-1)
    x = jnp.concatenate([x, jnp.zeros((1, 64)), jnp.full((1, 64), 1e-30)], axis=0)
    data, scale, _ = quantize_tokens(x, spec)
    y = dequantize_pages(data[:, None], scale[:, None], spec, 64, jnp.float32)[:, 0]
    assert bool(jnp.all(jnp.isfinite(y))), fmt
    assert bool(jnp.all(y[1] == 0)) and bool(jnp.all(jnp.abs(y[2]) <= 2e-30))


def test_nibble_packing_round_trip_and_order():
    codes = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 16
    packed = kvf.pack_nibbles(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 4)
    assert int(packed[0, 0]) == 0x10  # channel 0 in the low nibble, channel 1 in the high
    np.testing.assert_array_equal(kvf.unpack_nibbles(packed), codes)
    all_codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(kvf.e2m1_encode(kvf.e2m1_decode(all_codes)) & 0xF,
                                  jnp.where(all_codes == 8, 0, all_codes))  # -0 encodes as +0


def test_cache_bytes_are_real():
    """The arrays shrink: bytes per token vs a bfloat16 cache, scales counted."""
    for h in (64, 128):
        bf16 = page_bytes_per_token(None, h, 2)
        for fmt, limit in (("fp8_e4m3", 0.53), ("fp8_e5m2", 0.53), ("int8", 0.53), ("int4", 0.3), ("nvfp4", 0.3),
                           ("int4_kivi", 0.3)):
            spec = KVQuantSpec.parse(fmt, h)
            kv = init_paged(1, 3, 32, 2, h, jnp.bfloat16, spec, num_slots=1)
            resid = kv.k[0].resid.nbytes if spec.kivi else 0  # per sequence, not per token
            per_token = (kv.nbytes() - resid) / (2 * 3 * 32 * 2)
            assert per_token == page_bytes_per_token(spec, h, 2)
            assert per_token / bf16 <= limit, (fmt, h, per_token / bf16)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))  # one program per format and backend, not one per op
def _attend(fmt, backend, q, k, v, meta, ps):
    spec = KVQuantSpec.parse(fmt, q.shape[-1]) if fmt != "auto" else None
    kv = init_paged(1, 6, ps, k.shape[2], k.shape[3], jnp.float32, spec)
    page, offset = write_slots(meta, k.shape[1], ps, 6)
    kp, vp = write_pages(kv.k[0], k, page, offset), write_pages(kv.v[0], v, page, offset)
    return attention(q, kp, vp, meta, scale=q.shape[-1] ** -0.5, backend=backend)


@pytest.mark.parametrize("fmt,tol", [("fp8_e4m3", 0.06), ("fp8_e5m2", 0.12), ("int8", 0.02), ("int4", 0.2),
                                     ("nvfp4", 0.25)])
def test_attention_over_quantized_cache(fmt, tol):
    """Max error within tol x max |output| of full precision (per format); xla == pallas."""
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    b, t, kh, g, h, ps = 2, 12, 2, 2, 64, 8
    q = jax.random.normal(ks[0], (b, t, kh * g, h))
    k = jax.random.normal(ks[1], (b, t, kh, h))
    v = jax.random.normal(ks[2], (b, t, kh, h))
    meta = AttentionMeta(jnp.array([[0, 2], [5, 1]], jnp.int32), jnp.array([12, 9]), jnp.array([12, 9]))
    ref = _attend("auto", "xla", q, k, v, meta, ps)
    got = _attend(fmt, "xla", q, k, v, meta, ps)
    valid = (jnp.arange(t)[None, :] < meta.q_lens[:, None])[:, :, None, None]
    assert float(jnp.max(jnp.where(valid, jnp.abs(got - ref), 0))) < tol * float(jnp.max(jnp.abs(ref)))
    pallas = _attend(fmt, "pallas", q, k, v, meta, ps)
    assert float(jnp.max(jnp.where(valid, jnp.abs(pallas - got), 0))) < 1e-4


@pytest.mark.parametrize("fmt", ["int8", "nvfp4", "int4_kivi"])
def test_engine_quantized_cache_same_with_and_without_prefix_caching(fmt, tmp_path):
    d = write_tiny("llama", tmp_path / "m", vocab_size=300, max_position_embeddings=160)
    rng = np.random.default_rng(0)
    system = rng.integers(3, 300, size=40).tolist()
    prompts = [{"prompt_token_ids": system + rng.integers(3, 300, size=int(n)).tolist()} for n in (3, 9, 5, 12)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bs = 32 if fmt == "int4_kivi" else 8
    on = LLM(str(d), shape_buckets="slots", kv_cache_dtype=fmt, enable_prefix_caching=True, block_size=bs)
    off = LLM(str(d), shape_buckets="slots", kv_cache_dtype=fmt, enable_prefix_caching=False, block_size=bs)
    a = [o.outputs[0].token_ids for o in on.generate(prompts, params)]
    a2 = [o.outputs[0].token_ids for o in on.generate(prompts, params)]  # all hits the second time
    b = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    # fused decode steps write the quantized pages (and KIVI's residual keys) step by step too
    fused = LLM(str(d), shape_buckets="slots", kv_cache_dtype=fmt, enable_prefix_caching=False, block_size=bs,
                num_scheduler_steps=5)
    c = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    assert a == b == a2 == c
    assert fused.get_stats().num_fused_steps > 0
    assert on.get_stats().prefix_cache_hits >= 4 * (40 // bs)


def test_calculator_llama2_70b():
    name, cfg = load_model_config("llama-2-70b")
    r = memory_report(cfg, batch=32, seq=4096, kv_cache_dtype="auto", weights_dtype="float16")
    assert r.kv_bytes == 2 * 80 * 32 * 4096 * 8 * 128 * 2
    assert r.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert abs(r.num_params - 68.98e9) < 0.05e9
    q = memory_report(cfg, batch=32, seq=4096, kv_cache_dtype="fp8_e4m3", weights_dtype="float16")
    assert q.kv_bytes == 2 * 80 * 32 * 4096 * 8 * (128 + 2)  # one bf16 scale per token and head


def test_unknown_kv_cache_dtype_is_refused():
    cfg = ModelConfig("LlamaForCausalLM", 10, 64, 64, 1, 4, 2, 16, 64)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp4'"):
        memory_report(cfg, 1, 1, kv_cache_dtype="fp4")


@pytest.mark.parametrize("chunks", [[45], [5, 30, 10], [1] * 12 + [33]])
def test_kivi_keys_quantize_full_groups_and_keep_the_residual_exact(chunks):
    """After any chunking, full 32-token groups read back as their per-channel int4 codes and
    the partial group's keys read back exactly (full precision)."""
    from jaxinfer.kv.kivi import quantize_groups
    h, kh, ps = 16, 2, 32
    spec = KVQuantSpec.parse("int4_kivi", h)
    kv = init_paged(1, 4, ps, kh, h, jnp.float32, spec, num_slots=2)
    keys = jax.random.normal(jax.random.PRNGKey(0), (1, 45, kh, h)) * jnp.arange(1, h + 1)  # per-channel ranges
    table = jnp.array([[2, 0]], jnp.int32)

    @functools.partial(jax.jit, static_argnums=3)  # one program per chunk length, not one per op
    def write(kp, keys, done, n):
        meta = AttentionMeta(table, (done + n)[None], jnp.array([n]), slots=jnp.array([1]))
        page, offset = write_slots(meta, n, ps, 4)
        return write_pages(kp, jax.lax.dynamic_slice_in_dim(keys, done, n, axis=1), page, offset, meta)

    kp, done = kv.k[0], 0
    for n in chunks:
        kp = write(kp, keys, jnp.int32(done), n)
        done += n
    from jaxinfer.kv.cache import gather_pages
    got = gather_pages(kp, AttentionMeta(table, jnp.array([45]), jnp.array([0]), slots=jnp.array([1])))
    got = got.transpose(0, 2, 1, 3)[0, :45]  # [45, K, H]
    codes, scale, zero = quantize_groups(keys[0, :32][None])
    want_group = (kvf.unpack_nibbles(codes[0]).astype(jnp.float32) * scale[0].astype(jnp.float32)
                  + zero[0].astype(jnp.float32))
    np.testing.assert_allclose(got[:32], want_group, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[32:], keys[0, 32:])  # the residual is exact
    err = jnp.abs(got[:32] - keys[0, :32]) / (jnp.max(keys[0, :32], 0) - jnp.min(keys[0, :32], 0))
    assert float(err.max()) <= 0.5 / 15 + 2 ** -7  # half a step of the channel's range (+ bf16 scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_written_pages_hold_exactly_the_quantized_tokens(fmt):
    """What write_pages stores reads back (QuantPages.values) as exactly quantize_tokens' codes and
    scales, in the format's dtypes, whatever the storage: on CPU, fp8 codes and bf16 / e4m3 scales
    are kept as same-width unsigned ints (XLA:CPU cannot scatter narrow floats in place)."""
    spec = KVQuantSpec.parse(fmt, 64)
    kv = init_paged(1, 3, 8, 2, 64, jnp.bfloat16, spec)
    if jax.default_backend() == "cpu":
        assert not any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
                       for x in jax.tree_util.tree_leaves(kv))
    new = jax.random.normal(jax.random.PRNGKey(5), (1, 5, 2, 64))
    meta = AttentionMeta(jnp.array([[2]], jnp.int32), jnp.array([7]), jnp.array([5]))
    page, offset = write_slots(meta, 5, 8, 3)
    data, scale, zero = write_pages(kv.k[0], new, page, offset).values()
    want_data, want_scale, want_zero = quantize_tokens(new[0].transpose(1, 0, 2), spec)  # [K, 5, ...]
    assert data.dtype == want_data.dtype and scale.dtype == want_scale.dtype
    np.testing.assert_array_equal(np.asarray(data[2, :, 2:7], np.float32), np.asarray(want_data, np.float32))
    np.testing.assert_array_equal(np.asarray(scale[2, :, 2:7], np.float32), np.asarray(want_scale, np.float32))
    assert not np.any(np.asarray(data[:2], np.float32)) and not np.any(np.asarray(data[2, :, :2], np.float32))
    if want_zero is not None:
        np.testing.assert_array_equal(np.asarray(zero[2, :, 2:7], np.float32), np.asarray(want_zero, np.float32))
