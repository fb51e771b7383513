"""Paged attention kernels (Triton and Mosaic variants, compiled on their own
hardware, interpret mode elsewhere) against the jnp reference,
and the KV format helpers they share with KV quantization.

Stated tolerances (max abs error over valid query slots; outputs are O(1)):
  float32 q, float32 pages ........................ 2e-5
  bfloat16 q or pages ............................. 2e-2  (vs the f32 reference on the same inputs)
  quantized pages vs the reference on the dequantized pages: 2e-5 for f32 q, 2e-2 for bf16 q
  quantized pages vs full precision (quantization error itself, relative to max |out|):
    int8 0.02, fp8_e4m3 0.06, fp8_e5m2 0.12, int4 0.25, nvfp4 0.25
The sweep is pairwise, not Cartesian: every value of every axis appears at least once
(GQA 1/2/4/8, head_dim 64/128, page sizes 8/16/32/64/128, 1/2/5 query tokens, lengths on and
off block boundaries, every KV format and scale arrangement, causal, soft-cap, sliding
window, split-K 1/2/3, both kernel variants).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import kv_formats as kvf
from pallas_kernels import paged_attention as pa

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
QUANT_TOL = {"int8": 0.02, "fp8_e4m3": 0.06, "fp8_e5m2": 0.12, "int4": 0.25, "nvfp4": 0.25}
KIVI = ((None, 1), (1, None))  # (token_group, channel_group) for K per channel over a page, V per token

# variant, G, H, page size, T, dtype, kv format, groups, asym, causal, soft cap, window, splits, block_k
CASES = [
    ("triton", 1, 64, 8, 1, jnp.float32, None, None, False, True, None, None, 1, 16),
    ("mosaic", 2, 128, 16, 2, jnp.bfloat16, None, None, False, True, 30.0, None, 2, 16),
    ("triton", 4, 64, 32, 5, jnp.float32, None, None, False, False, None, None, 3, 16),
    ("mosaic", 8, 64, 128, 5, jnp.float32, None, None, False, True, None, 20, 1, 32),
    ("triton", 2, 64, 16, 2, jnp.float32, "int8", (1, None), False, True, None, None, 1, 16),
    ("mosaic", 4, 128, 16, 1, jnp.float32, "int8", (1, 32), False, True, None, None, 2, 16),
    ("triton", 1, 128, 16, 5, jnp.float32, "fp8_e4m3", KIVI, False, True, 20.0, None, 1, 16),
    ("mosaic", 2, 64, 32, 2, jnp.float32, "fp8_e5m2", (1, None), False, False, None, None, 1, 16),
    ("triton", 8, 64, 8, 2, jnp.float32, "int4", (1, 32), False, True, None, None, 2, 32),
    ("mosaic", 1, 64, 16, 5, jnp.float32, "int4", KIVI, True, True, None, None, 1, 16),
    ("triton", 4, 64, 16, 1, jnp.float32, "int4", (1, None), True, True, None, 12, 1, 16),
    ("mosaic", 2, 128, 16, 2, jnp.float32, "nvfp4", (1, None), False, True, None, None, 1, 16),
    ("triton", 2, 64, 64, 1, jnp.float32, "fp8_e4m3", (4, 16), False, True, None, None, 2, 32),
    ("mosaic", 4, 64, 8, 2, jnp.float32, "int8", KIVI, False, True, None, None, 1, 32),
    ("triton", 2, 128, 32, 2, jnp.bfloat16, "int8", (1, None), False, True, None, 40, 2, 16),
    # every format in the Triton variant too: on a GPU the Mosaic cases are deselected
    ("triton", 4, 128, 16, 2, jnp.float32, "nvfp4", (1, None), False, True, None, None, 2, 32),
    ("triton", 2, 64, 16, 1, jnp.bfloat16, "fp8_e5m2", (1, None), False, True, None, None, 1, 16),
]
IDS = [f"{c[0]}-G{c[1]}-H{c[2]}-ps{c[3]}-T{c[4]}-{jnp.dtype(c[5]).name}-{c[6]}" for c in CASES]
KV_HEADS, CONTEXT = 2, 128  # tokens per page-table row


def _problem(g, h, ps, t, dtype, seed):
    """Three rows: a full row, a row whose length is off every block boundary, and a padding row."""
    pp = CONTEXT // ps
    num_pages = 3 * pp + 2
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles in the test setup
    q = jnp.asarray(rng.standard_normal((3, t, KV_HEADS * g, h), np.float32)).astype(dtype)
    k = jnp.asarray(rng.standard_normal((num_pages, KV_HEADS, ps, h), np.float32))
    v = jnp.asarray(rng.standard_normal((num_pages, KV_HEADS, ps, h), np.float32))
    table = jnp.asarray(rng.permutation(num_pages)[:3 * pp].reshape(3, pp).astype(np.int32))
    kv_lens = jnp.array([CONTEXT, 37 + t, 0], jnp.int32)
    q_lens = jnp.array([t, t, 0], jnp.int32)
    return q, k, v, table, kv_lens, q_lens


def _quantized(k, v, fmt, groups, asym, ps):
    """Quantize the pages; returns (k data, v data, kernel keyword arguments)."""
    (ktg, vtg), (kcg, vcg) = [(x if isinstance(x, tuple) else (x, x)) for x in groups]
    ktg, vtg = ktg or ps, vtg or ps  # None token group: the whole page (KIVI keys)
    ts = 0.05 if fmt == "nvfp4" else None
    kd, ks, kz = kvf.quantize(k, fmt, ktg, kcg, asymmetric=asym, tensor_scale=ts)
    vd, vs, vz = kvf.quantize(v, fmt, vtg, vcg, asymmetric=asym, tensor_scale=ts)
    kw = dict(k_scale=ks, v_scale=vs, k_zero=kz, v_zero=vz, kv_format=fmt, token_group=(ktg, vtg),
              channel_group=(kcg, vcg))
    if ts is not None:
        kw.update(k_tensor_scale=jnp.float32(ts), v_tensor_scale=jnp.float32(ts))
    return kd, vd, kw


def _valid(x, q_lens):
    return jnp.where((jnp.arange(x.shape[1])[None, :] < q_lens[:, None])[:, :, None, None], x, 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_paged_kernel_matches_reference(case):
    variant, g, h, ps, t, dtype, fmt, groups, asym, causal, cap, window, splits, block_k = case
    q, k, v, table, kv_lens, q_lens = _problem(g, h, ps, t, dtype, seed=len(IDS[CASES.index(case)]))
    common = dict(causal=causal, soft_cap=cap, sliding_window=window)
    kw = {}
    if fmt is None:
        k, v = k.astype(dtype), v.astype(dtype)
    else:
        k_full, v_full = k, v
        k, v, kw = _quantized(k, v, fmt, groups, asym, ps)
    got = pa.paged_attention(q, k, v, table, kv_lens, q_lens, backend=variant, interpret=None,
                             block_sizes=pa.BlockSizes(block_rows=16, block_k=block_k, num_splits=splits),
                             **common, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(got))), "padding slots must stay finite"
    want = pa.paged_attention_reference(q, k, v, table, kv_lens, q_lens, **common, **kw)
    tol = TOL[jnp.bfloat16] if jnp.bfloat16 in (dtype, k.dtype) else TOL[jnp.float32]
    np.testing.assert_allclose(_valid(got, q_lens).astype(jnp.float32),
                               _valid(want, q_lens).astype(jnp.float32),
                               atol=tol, rtol=0)
    if fmt is not None:  # the quantization error itself, against full-precision pages
        full = pa.paged_attention_reference(q, k_full, v_full, table, kv_lens, q_lens, **common)
        err = jnp.max(jnp.abs(_valid(got - full, q_lens))) / jnp.max(jnp.abs(_valid(full, q_lens)))
        assert float(err) < QUANT_TOL[fmt], (fmt, float(err))


def test_contiguous_cache_is_one_page_per_row():
    """The model's contiguous cache [B, K, S, H] with the identity table: blocks inside one big page."""
    b, t, n, kh, h, s = 2, 3, 4, 2, 64, 192  # S = 192: the kernel blocks at gcd(192, 128) = 64
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, t, n, h))
    k = jax.random.normal(ks[1], (b, kh, s, h))
    v = jax.random.normal(ks[2], (b, kh, s, h))
    table = jnp.arange(b, dtype=jnp.int32)[:, None]
    kv_lens, q_lens = jnp.array([150, 3], jnp.int32), jnp.array([3, 3], jnp.int32)
    got = pa.paged_attention(q, k, v, table, kv_lens, q_lens, backend="triton", interpret=True)
    want = pa.paged_attention_reference(q, k, v, table, kv_lens, q_lens)
    np.testing.assert_allclose(got, want, atol=TOL[jnp.float32])


def test_wrapper_errors_name_the_values():
    q = jnp.zeros((1, 1, 4, 64))
    k = jnp.zeros((4, 2, 16, 64))
    table, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        pa.paged_attention(q, jnp.zeros((4, 3, 16, 64)), jnp.zeros((4, 3, 16, 64)), table, lens, lens)
    with pytest.raises(ValueError, match="page head_dim=32"):
        pa.paged_attention(q, k[..., :32], k[..., :32], table, lens, lens)
    with pytest.raises(ValueError, match="page_size=24 must be a power of two"):
        pa.paged_attention(q, jnp.zeros((4, 2, 24, 64)), jnp.zeros((4, 2, 24, 64)), table, lens, lens,
                           backend="triton", interpret=False)
    with pytest.raises(ValueError, match="kv_format='int3'"):
        pa.paged_attention(q, k, k, table, lens, lens, kv_format="int3")
    with pytest.raises(ValueError, match=r"k_scale must be float32 or bfloat16 or float16 \(4, 2, 16, 1\)"):
        pa.paged_attention(q, k.astype(jnp.int8), k.astype(jnp.int8), table, lens, lens, kv_format="int8",
                           k_scale=jnp.ones((4, 2, 16, 2)), v_scale=jnp.ones((4, 2, 16, 1)))
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        pa.paged_attention(q, k, k, table, lens.astype(jnp.float32), lens)


# ------------------------------------------------------------------ kv_formats

def test_nibble_packing_and_e2m1_codes():
    codes = jax.random.randint(jax.random.key(0), (5, 16), 0, 16)
    packed = kvf.pack_nibbles(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (5, 8)
    np.testing.assert_array_equal(packed[:, 0], (codes[:, 0] | (codes[:, 1] << 4)).astype(jnp.uint8))
    np.testing.assert_array_equal(kvf.unpack_nibbles(packed), codes)
    # e2m1 decode by bit arithmetic == ml_dtypes' float4_e2m1fn for every bit pattern
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(kvf.e2m1_decode(jnp.arange(16, dtype=jnp.int32)), ref)
    # encoding rounds to nearest, ties to the even code, as the float4 cast does; exactly at every
    # midpoint, a float either side of it, and over a wide random sample (jitted, as in quantize)
    mids = np.array([m for m, _ in kvf.E2M1_MIDPOINTS], np.float32)
    edges = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, 9)])
    sample = np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 3
    for vals in (edges, -edges, sample):
        got = kvf.e2m1_decode(jax.jit(kvf.e2m1_encode)(jnp.asarray(vals)).astype(jnp.int32))
        np.testing.assert_array_equal(got, np.clip(vals, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    x = jnp.linspace(-7.0, 7.0, 141)
    decoded = kvf.e2m1_decode(kvf.e2m1_encode(x).astype(jnp.int32))
    np.testing.assert_array_equal(decoded, jnp.clip(x, -6, 6).astype(jnp.float4_e2m1fn).astype(jnp.float32))


@pytest.mark.parametrize("fmt,tg,cg,asym,bound", [
    ("int8", 1, None, False, 0.01), ("int8", 16, 1, False, 0.01), ("fp8_e4m3", 1, 32, False, 0.04),
    ("fp8_e5m2", 4, 8, False, 0.08), ("int4", 1, None, False, 0.15), ("int4", 16, 1, True, 0.1),
    ("int4", 1, 32, True, 0.1), ("nvfp4", 1, None, False, 0.12)])
def test_quantize_dequantize_round_trip(fmt, tg, cg, asym, bound):
    """Relative L2 error of quantize -> dequantize on Gaussian data, with outliers that must not be NaN."""
    x = jax.random.normal(jax.random.key(2), (3, 2, 16, 64)) * 3.0
    x = x.at[0, 0, 0, 0].set(1e6)  # an outlier: e4m3 overflow would be NaN without the clip
    data, scale, zero = kvf.quantize(x, fmt, tg, cg, asymmetric=asym,
                                     tensor_scale=kvf.nvfp4_tensor_scale(3.0 * 4) if fmt == "nvfp4" else None)
    assert data.dtype == kvf.DATA_DTYPE[fmt] and scale.dtype == kvf.SCALE_DTYPE[fmt]
    cgv = cg or (16 if fmt == "nvfp4" else 64)
    assert scale.shape == (3, 2, 16 // tg, 64 // cgv)
    assert (zero is not None) == asym
    ts = kvf.nvfp4_tensor_scale(3.0 * 4) if fmt == "nvfp4" else None
    y = kvf.dequantize(data, scale, zero, fmt, tg, cg, tensor_scale=ts)
    assert bool(jnp.all(jnp.isfinite(y)))
    rest = (slice(1, None),)  # groups away from the outlier
    err = jnp.linalg.norm((y - x)[rest]) / jnp.linalg.norm(x[rest])
    assert float(err) < bound, float(err)
