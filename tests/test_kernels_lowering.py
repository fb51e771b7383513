"""Both lowerings of every kernel lower on a CPU-only host with jax.export.

cuda: the Triton lowering (the kernels ask for it with Triton compiler params; in jax 0.11 the
default GPU lowering is Mosaic GPU). tpu: the Mosaic lowering. Only host-side passes run:
this catches tracing and Pallas lowering errors, not device compile (PTX, VMEM, layout) errors.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention as fa
from pallas_kernels import kv_formats as kvf
from pallas_kernels import paged_attention as pa

PLATFORMS = {"triton": ("cuda", "__gpu$xla.gpu.triton"), "mosaic": ("tpu", "tpu_custom_call")}
sds = jax.ShapeDtypeStruct


def _export(fn, backend, *args):
    platform, target = PLATFORMS[backend]
    exp = jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert target in exp.mlir_module(), f"no {target} custom call in the {platform} export"
    pytest.importorskip("flatbuffers")
    assert exp.serialize()


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("b,t,n,kh,h,dtype,causal,cap", [
    (2, 1024, 8, 2, 128, jnp.bfloat16, True, None),
    (1, 512, 4, 4, 64, jnp.float32, False, 30.0),
    (2, 300, 8, 1, 64, jnp.bfloat16, True, None),  # T not a multiple of the blocks: padded
])
def test_flash_attention_lowers(backend, b, t, n, kh, h, dtype, causal, cap):
    fn = functools.partial(fa.flash_attention, causal=causal, soft_cap=cap, backend=backend, interpret=False)
    _export(fn, backend, sds((b, t, n, h), dtype), sds((b, t, kh, h), dtype), sds((b, t, kh, h), dtype),
            sds((b,), jnp.int32))


# format, page size, T, (token_group, channel_group) as ints or (K, V) pairs, asymmetric, num_splits
PAGED = [
    (None, 16, 1, (1, None), False, 4),
    (None, 8, 2, (1, None), False, 1),  # small pages: a kv block gathers several
    (None, 512, 5, (1, None), False, 1),  # contiguous-cache style: blocks inside one big page
    ("int8", 16, 2, (1, None), False, 2),
    ("fp8_e4m3", 32, 1, (1, 32), False, 1),
    ("fp8_e5m2", 16, 4, (1, None), False, 2),
    ("int4", 16, 1, ((16, 1), (1, None)), False, 2),  # KIVI: K per channel over a page, V per token
    ("int4", 64, 2, (1, 32), True, 1),  # asymmetric, zero points
    ("nvfp4", 16, 1, (1, None), False, 2),
]


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("fmt,ps,t,groups,asym,splits", PAGED,
                         ids=[f"{p[0]}-ps{p[1]}-T{p[2]}" for p in PAGED])
def test_paged_attention_lowers(backend, fmt, ps, t, groups, asym, splits):
    b, n, kh, h, pages = 4, 16, 2, 128, 64
    pp = 1024 // ps
    (ktg, vtg), (kcg, vcg) = [(x if isinstance(x, tuple) else (x, x)) for x in groups]
    hd = h // 2 if fmt in kvf.PACKED else h
    page_dtype = kvf.DATA_DTYPE[fmt] if fmt else jnp.bfloat16
    args = [sds((b, t, n, h), jnp.bfloat16), sds((pages, kh, ps, hd), page_dtype),
            sds((pages, kh, ps, hd), page_dtype), sds((b, pp), jnp.int32), sds((b,), jnp.int32),
            sds((b,), jnp.int32)]
    names = []
    if fmt is not None:
        default_cg = kvf.NVFP4_GROUP if fmt == "nvfp4" else h
        for name, tg, cg in (("k_scale", ktg, kcg), ("v_scale", vtg, vcg)):
            args.append(sds((pages, kh, ps // tg, h // (cg or default_cg)), kvf.SCALE_DTYPE[fmt]))
            names.append(name)
        if asym:
            args += args[-2:]
            names += ["k_zero", "v_zero"]

    def fn(q, k, v, table, kv_lens, q_lens, *quant):
        kw = dict(zip(names, quant))
        if fmt is not None:
            kw.update(kv_format=fmt, token_group=(ktg, vtg), channel_group=(kcg, vcg))
        return pa.paged_attention(q, k, v, table, kv_lens, q_lens, sliding_window=256, soft_cap=50.0,
                                  backend=backend, interpret=False,
                                  block_sizes=dataclasses.replace(pa.BlockSizes.default(backend),
                                                                  num_splits=splits), **kw)

    _export(fn, backend, *args)

