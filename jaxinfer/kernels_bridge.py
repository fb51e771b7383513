"""Adapter from the model's attention interface (AttentionMeta + cache pages) to the Pallas kernels.

Legend: B rows, T query tokens, N query heads, K kv heads, H head dim, P pages,
ps page size, S cache slots.

``layers.attention(..., backend="pallas")`` lands here. The paged cache passes
its pages [P, K, ps, H] and page table; the contiguous cache [B, K, S, H] is the
special case of one page of S tokens per row with the identity page table [B, 1],
so prefill (T = prompt length), decode (T = 1), speculative verification and
chunked prefill all run the one paged kernel. The kernel variant follows the
platform: Triton on GPU, Mosaic on TPU, and the Triton variant in interpret mode
on CPU (correctness only; use backend="xla" for speed there).
"""

from __future__ import annotations

import jax

from jaxinfer.kv.cache import AttentionMeta
from pallas_kernels import paged_attention as pa


def _tensor_scales(tensor_scale):
    """None, one scalar for K and V, or a (K, V) pair -> (k_tensor_scale, v_tensor_scale)."""
    if tensor_scale is None:
        return None, None
    if isinstance(tensor_scale, (tuple, list)):
        if len(tensor_scale) != 2:
            raise ValueError(f"tensor_scale must be a scalar or a (K, V) pair; got {len(tensor_scale)} "
                             "values")
        return tensor_scale[0], tensor_scale[1]
    return tensor_scale, tensor_scale


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMeta, *,
                    scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
                    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                    k_zero: jax.Array | None = None, v_zero: jax.Array | None = None,
                    kv_format: str | None = None, token_group: int | tuple[int, int] = 1,
                    channel_group: int | None | tuple = None, tensor_scale=None,
                    backend: str = "auto", interpret: bool | None = None,
                    block_sizes: pa.BlockSizes | None = None) -> jax.Array:
    """Causal attention of q [B, T, N, H] over the cache described by ``meta``; returns [B, T, N, H].

    k_pages, v_pages: [P, K, ps, H] (4-bit formats: [P, K, ps, H/2]), or [B, K, S, H]
    when ``meta.contiguous``. Quantized pages take kv_format, k/v_scale
    [P, K, ps/tg, H/cg], optional k/v_zero (asymmetric int4), token_group and
    channel_group (ints or (K, V) pairs) and the NVFP4 tensor_scale (a scalar or a
    (K, V) pair), as laid out in ARCHITECTURE.md. backend 'auto' | 'triton' |
    'mosaic' and interpret=None (interpret exactly on CPU) pick the kernel.
    """
    k_ts, v_ts = _tensor_scales(tensor_scale)
    return pa.paged_attention(
        q, k_pages, v_pages, meta.page_table, meta.kv_lens, meta.q_lens, scale=scale, causal=True,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, k_zero=k_zero,
        v_zero=v_zero, kv_format=kv_format, token_group=token_group, channel_group=channel_group,
        k_tensor_scale=k_ts, v_tensor_scale=v_ts, block_sizes=block_sizes, backend=backend,
        interpret=interpret)
