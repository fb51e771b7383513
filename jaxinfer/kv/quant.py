"""Quantized KV pages: one data type for the contiguous cache, the paged cache and the kernel.

Legend: P pages, K kv heads, ps page size, H head dim, B rows, T new tokens,
cg channels per scale group.

`QuantPages` replaces a [P, K, ps, H] page array with codes + per-block scales in
the layout of ARCHITECTURE.md (reference codecs in pallas_kernels/kv_formats.py).
Tokens are quantized when written (prefill and decode) and dequantized when read,
by the XLA path here and inside the Pallas paged kernel. Scales are stored in
bfloat16 (NVFP4: e4m3, as the format defines), so the bytes per token are what
the format promises: int8 / fp8 with one scale per token and head cost
(H + 2) / 2H of a bf16 cache; int4 with 32-channel groups and NVFP4 cost
(H/2 + H/16) / 2H.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.kv.bits import from_storage, storage_dtype, to_storage
from pallas_kernels import kv_formats as kvf

# kv_cache_dtype -> (format, channels per scale group or None for the whole head)
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": ("fp8_e4m3", None),  # vLLM's name for e4m3
    "fp8_e4m3": ("fp8_e4m3", None),
    "fp8_e5m2": ("fp8_e5m2", None),
    "int8": ("int8", None),
    "int4": ("int4", 32),
    "nvfp4": ("nvfp4", 16),
    # KIVI: keys int4 per channel over 32-token groups with a full-precision residual (kv/kivi.py),
    # values int4 per token; both asymmetric (zero points).
    "int4_kivi": ("int4", None),
}
STORED_SCALE_DTYPE = jnp.bfloat16
NVFP4_TENSOR_SCALE = 1.0 / 8  # e4m3 block scales amax / (6 t) stay normal for block absmax in ~[0.012, 336]


@dataclasses.dataclass(frozen=True)
class KVQuantSpec:
    """How one cache quantizes: format and channel group (hashable; a static).

    asymmetric: codes with a zero point (int4 in [0, 15]); kivi: keys in the KIVI arrangement."""

    fmt: str
    channel_group: int
    asymmetric: bool = False
    kivi: bool = False

    @staticmethod
    def parse(kv_cache_dtype: str, head_dim: int) -> "KVQuantSpec | None":
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; choose one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        entry = KV_CACHE_DTYPES[kv_cache_dtype]
        if entry is None:
            return None
        fmt, cg = entry
        cg = min(cg or head_dim, head_dim)
        if head_dim % cg:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs head_dim divisible by {cg}; "
                             f"head_dim={head_dim}")
        kivi = kv_cache_dtype == "int4_kivi"
        return KVQuantSpec(fmt, cg, asymmetric=kivi, kivi=kivi)


@struct.dataclass
class QuantPages:
    """Quantized stand-in for a [P, K, ps, H] page array."""

    data: jax.Array  # [P, K, ps, H] (4-bit formats: uint8 [P, K, ps, H/2])
    scale: jax.Array  # [P, K, ps, H/cg] bfloat16 (nvfp4: float8_e4m3fn)
    zero: jax.Array | None  # [P, K, ps, H/cg] bfloat16 zero points (asymmetric int4), else None
    spec: KVQuantSpec = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)
    dtype: jnp.dtype = struct.field(pytree_node=False)  # compute dtype of dequantized values

    @property
    def shape(self) -> tuple[int, int, int, int]:
        p, k, ps, _ = self.data.shape
        return p, k, ps, self.head_dim

    @property
    def tensor_scale(self) -> float | None:
        return NVFP4_TENSOR_SCALE if self.spec.fmt == "nvfp4" else None

    def values(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(data, scale, zero) in their format's dtypes: on CPU, fp8 codes and bf16 / e4m3 scales
        are stored as unsigned integers of the same width (kv/bits.py) and viewed back here."""
        data_dt, scale_dt = quant_dtypes(self.spec)
        zero = None if self.zero is None else from_storage(self.zero, STORED_SCALE_DTYPE)
        return from_storage(self.data, data_dt), from_storage(self.scale, scale_dt), zero


def quant_dtypes(spec: KVQuantSpec) -> tuple[jnp.dtype, jnp.dtype]:
    """(codes dtype, scale dtype) of a format, as quantize_tokens returns them."""
    scale = kvf.SCALE_DTYPE[spec.fmt] if spec.fmt == "nvfp4" else STORED_SCALE_DTYPE
    return jnp.dtype(kvf.DATA_DTYPE[spec.fmt]), jnp.dtype(scale)


def init_quant_pages(num_pages: int, num_kv_heads: int, page_size: int, head_dim: int, spec: KVQuantSpec,
                     dtype) -> QuantPages:
    width = head_dim // 2 if spec.fmt in kvf.PACKED else head_dim
    data_dtype, scale_dtype = quant_dtypes(spec)
    groups = (num_pages, num_kv_heads, page_size, head_dim // spec.channel_group)
    return QuantPages(
        data=jnp.zeros((num_pages, num_kv_heads, page_size, width), storage_dtype(data_dtype)),
        scale=jnp.zeros(groups, storage_dtype(scale_dtype)),
        zero=jnp.zeros(groups, storage_dtype(STORED_SCALE_DTYPE)) if spec.asymmetric else None,
        spec=spec, head_dim=head_dim, dtype=jnp.dtype(dtype))


def quantize_tokens(x: jax.Array, spec: KVQuantSpec) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Tokens [..., H] -> (codes [..., H or H/2], scales [..., H/cg]) in storage dtypes.

    One scale per token and group of cg channels (tg = 1), so a token's codes never
    change once written: prefix-cached pages equal recomputed ones bit for bit. The
    scale is rounded to its storage dtype first and the codes are computed against the
    rounded value, so codes and stored scale agree exactly.
    """
    if spec.fmt == "nvfp4":
        data, scale, _ = kvf.quantize(x[..., None, :], "nvfp4", 1, spec.channel_group,
                                      tensor_scale=NVFP4_TENSOR_SCALE)
        return data[..., 0, :], scale[..., 0, :], None
    h, cg = x.shape[-1], spec.channel_group
    x32 = x.astype(jnp.float32)
    if spec.asymmetric:  # int4 with a zero point: codes in [0, 15] over [min, max] of the group
        g = x32.reshape(*x.shape[:-1], h // cg, cg)
        lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(STORED_SCALE_DTYPE)
        zero = lo.astype(STORED_SCALE_DTYPE)
        q = (x32 - jnp.repeat(zero.astype(jnp.float32), cg, axis=-1)) / jnp.repeat(
            scale.astype(jnp.float32), cg, axis=-1)
        return kvf.pack_nibbles(jnp.clip(jnp.round(q), 0, 15).astype(jnp.int32)), scale, zero
    amax = jnp.max(jnp.abs(x32).reshape(*x.shape[:-1], h // cg, cg), axis=-1)  # [..., H/cg]
    scale = jnp.where(amax > 0, amax / kvf.QMAX[spec.fmt], 1.0).astype(STORED_SCALE_DTYPE)
    q = x32 / jnp.repeat(scale.astype(jnp.float32), cg, axis=-1)
    if spec.fmt == "int8":
        codes = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
    elif spec.fmt == "int4":
        codes = kvf.pack_nibbles(jnp.clip(jnp.round(q), -8, 7).astype(jnp.int32) & 0xF)
    else:  # fp8: clip first, an e4m3 overflow would become NaN
        qmax = kvf.QMAX[spec.fmt]
        codes = jnp.clip(q, -qmax, qmax).astype(kvf.DATA_DTYPE[spec.fmt])
    return codes, scale, None


def dequantize_pages(data: jax.Array, scale: jax.Array, spec: KVQuantSpec, head_dim: int, dtype,
                     zero: jax.Array | None = None) -> jax.Array:
    """Codes [..., S, H(/2)] and scales (+ zero points) [..., S, H/cg] -> values [..., S, H] in dtype."""
    return kvf.dequantize(data, scale, zero, spec.fmt, 1, spec.channel_group,
                          tensor_scale=NVFP4_TENSOR_SCALE if spec.fmt == "nvfp4" else None, dtype=dtype)


def write_quant(pages: QuantPages, new: jax.Array, page: jax.Array, offset: jax.Array) -> QuantPages:
    """Quantize new tokens [B, T, K, H] and scatter them at (page, offset) [B, T]."""
    data, scale, zero = quantize_tokens(new, pages.spec)
    def put(stored, values):  # narrow floats go in as their bits where the pages hold bits
        return stored.at[page, :, offset].set(to_storage(values, stored.dtype), mode="drop")

    return pages.replace(data=put(pages.data, data), scale=put(pages.scale, scale),
                         zero=None if zero is None else put(pages.zero, zero))


def page_bytes_per_token(spec: KVQuantSpec | None, head_dim: int, itemsize: int) -> float:
    """Bytes one token costs in one K and one V page of one kv head, halved (the mean of the
    two), scales and zero points included (KIVI's per-sequence residual is not per token)."""
    if spec is None:
        return head_dim * itemsize
    data = head_dim // 2 if spec.fmt in kvf.PACKED else head_dim
    scale_itemsize = 1 if spec.fmt == "nvfp4" else jnp.dtype(STORED_SCALE_DTYPE).itemsize
    per_group = scale_itemsize * (2 if spec.asymmetric else 1)
    v = data + (head_dim // spec.channel_group) * per_group
    if spec.kivi:
        from jaxinfer.kv.kivi import kivi_key_bytes_per_token
        return (kivi_key_bytes_per_token(head_dim) + v) / 2
    return v
