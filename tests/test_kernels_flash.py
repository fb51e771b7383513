"""Flash attention kernels (Triton and Mosaic variants, compiled on their own
hardware, interpret mode elsewhere) against the jnp reference.

Stated tolerances (max abs error over valid query rows; outputs are O(1)):
  float32 ... 2e-5      bfloat16 ... 2e-2 (kernel on bf16 inputs vs the f32 reference on the same inputs)
Pairwise sweep: GQA 1/2/4/8, head_dim 64/128, lengths on and off block boundaries (T != S
too), ragged kv_lens, causal on/off, soft-cap on/off, float32/bfloat16, both variants.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
KV_HEADS = 2

# variant, G, H, T, S, dtype, causal, soft cap, ragged kv_lens, (block_q, block_k)
CASES = [
    ("triton", 1, 64, 32, 32, jnp.float32, True, None, False, (16, 16)),
    ("mosaic", 2, 128, 40, 40, jnp.bfloat16, True, 30.0, True, (16, 16)),
    ("mosaic", 4, 64, 24, 40, jnp.float32, False, 20.0, True, (16, 32)),
    ("triton", 8, 128, 33, 33, jnp.bfloat16, False, None, True, (32, 16)),
    ("triton", 4, 128, 48, 48, jnp.float32, True, 50.0, True, (16, 32)),
    ("mosaic", 8, 64, 17, 17, jnp.float32, True, None, False, (16, 16)),
]
IDS = [f"{c[0]}-G{c[1]}-H{c[2]}-T{c[3]}-S{c[4]}-{jnp.dtype(c[5]).name}-causal{int(c[6])}-cap{c[7]}"
       for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flash_kernel_matches_reference(case):
    variant, g, h, t, s, dtype, causal, cap, ragged, (bq, bk) = case
    rng = np.random.default_rng(t * s + g)
    q = jnp.asarray(rng.standard_normal((2, t, KV_HEADS * g, h), np.float32)).astype(dtype)
    k = jnp.asarray(rng.standard_normal((2, s, KV_HEADS, h), np.float32)).astype(dtype)
    v = jnp.asarray(rng.standard_normal((2, s, KV_HEADS, h), np.float32)).astype(dtype)
    kv_lens = jnp.array([s, s - 7], jnp.int32) if ragged else None
    got = fa.flash_attention(q, k, v, kv_lens, causal=causal, soft_cap=cap, backend=variant, interpret=None,
                             block_sizes=fa.BlockSizes(block_q=bq, block_k=bk))
    assert got.shape == q.shape and got.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(got)))
    want = fa.flash_attention_reference(q, k, v, kv_lens, causal=causal, soft_cap=cap)
    # Rows t >= kv_lens[b] are padding by contract, but both sides define them the same way.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOL[dtype],
                               rtol=0)


def test_flash_errors_name_the_values():
    q = jnp.zeros((1, 16, 6, 64))
    k = jnp.zeros((1, 16, 4, 64))
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        fa.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim=48 must be a power of two"):
        fa.flash_attention(q[..., :48], k[:, :, :2, :48], k[:, :, :2, :48], backend="triton", interpret=False)
    with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
        fa.flash_attention(q, k[:, :, :2], k[:, :, :2], backend="triton", block_sizes=fa.BlockSizes(24, 16))
    with pytest.raises(ValueError, match="q.dtype=int8"):
        fa.flash_attention(q.astype(jnp.int8), k[:, :, :2], k[:, :, :2])


def test_interpret_none_compiles_only_on_the_variants_own_platform(monkeypatch):
    """interpret=None: Triton compiles on a GPU, Mosaic on a TPU; every other pairing interprets."""
    for platform, want in (("cpu", {"triton": True, "mosaic": True}),
                           ("gpu", {"triton": False, "mosaic": True}),
                           ("tpu", {"triton": True, "mosaic": False})):
        monkeypatch.setattr(fa.jax, "default_backend", lambda platform=platform: platform)
        for variant, interpret in want.items():
            assert fa.resolve_backend(variant, None) == (variant, interpret), (platform, variant)
        assert fa.resolve_backend("auto", None) == ({"tpu": "mosaic"}.get(platform, "triton"), platform == "cpu")
        assert fa.resolve_backend("mosaic", True) == ("mosaic", True)
