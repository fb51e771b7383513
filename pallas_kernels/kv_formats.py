"""Quantized KV page formats: reference quantize / dequantize and 4-bit packing (pure jnp).

Legend: S tokens (a page's ps, or any token axis), H head dim (channels),
tg tokens per scale group, cg channels per scale group.

The layout is the one in ARCHITECTURE.md ("Quantized pages"), shared by the
paged KV cache, the KV-quantization module and the paged-attention kernel:

  format      data                       scale [.., S/tg, H/cg]       decode
  int8        int8 [.., S, H]            f32                           q * s
  fp8_e4m3    float8_e4m3fn [.., S, H]   f32                           f32(q) * s
  fp8_e5m2    float8_e5m2 [.., S, H]     f32                           f32(q) * s
  int4        uint8 [.., S, H/2]         f32 (+ f32 zero, same shape)  q * s  |  q * s + z
  nvfp4       uint8 [.., S, H/2]         float8_e4m3fn, cg = 16        e2m1(q) * f32(s) * t

Byte j of a token holds channel 2j in the low nibble and channel 2j + 1 in the
high nibble. Symmetric int4 nibbles are two's complement ([-8, 7]); asymmetric
int4 (with a zero point) nibbles are unsigned ([0, 15]). nvfp4 nibbles are e2m1
codes: sign (bit 3), exponent (bits 2-1), mantissa (bit 0), magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6 (NVFP4: 16-element blocks, e4m3 block scale, f32
tensor scale t).

The element-wise decoders here (``decode_values``, ``unpack_nibbles``) use only
shifts, masks, selects and casts, so the Pallas kernels call them on tiles too.
Values are clipped to a format's range before every narrowing cast (float8_e4m3fn
overflow is NaN, float -> int casts truncate: round first), see FACTS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "nvfp4")
PACKED = ("int4", "nvfp4")  # two 4-bit values per byte: data is [.., S, H/2]

DATA_DTYPE = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2,
              "int4": jnp.uint8, "nvfp4": jnp.uint8}
SCALE_DTYPE = {"int8": jnp.float32, "fp8_e4m3": jnp.float32, "fp8_e5m2": jnp.float32,
               "int4": jnp.float32, "nvfp4": jnp.float8_e4m3fn}
# Scales may also be stored narrower (the cache keeps bf16 scales so int8 / fp8 cost H + 2 bytes
# per token and head); kernels widen them to f32 after the load.
STORED_SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def allowed_scale_dtypes(fmt: str) -> tuple:
    return (jnp.float8_e4m3fn,) if fmt == "nvfp4" else STORED_SCALE_DTYPES


# Largest magnitude of the code (before scaling) that a group's absmax maps to.
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int4": 7.0, "nvfp4": 6.0}
NVFP4_GROUP = 16  # channels per e4m3 block scale (NVFP4 spec)
E4M3_MAX = 448.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"kv_format={fmt!r} is not one of {FORMATS}")


# ------------------------------------------------------------------ 4-bit packing

def pack_nibbles(codes: jax.Array) -> jax.Array:
    """4-bit codes [..., H] (integers in [0, 15]) -> uint8 [..., H/2], channel 2j in the low nibble."""
    c = codes.astype(jnp.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """uint8 [..., H/2] -> int32 codes [..., H] in [0, 15] (inverse of ``pack_nibbles``).

    Kernel-safe: a widening cast, shifts, masks, and a stack + reshape that
    interleaves the low (even channel) and high (odd channel) nibbles.
    """
    u = packed.astype(jnp.int32)
    lo, hi = u & 0xF, (u >> 4) & 0xF
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """e2m1 codes (int32 in [0, 15]) -> float32 values, by bit arithmetic (no table gather)."""
    sign = jnp.where((codes & 8) != 0, -1.0, 1.0)
    exp = (codes >> 1) & 3
    man = (codes & 1).astype(jnp.float32)
    # exponent 0 is subnormal (0 or 0.5); otherwise 2^(e-1) * (1 + m/2)
    pow2 = jnp.where(exp == 1, 1.0, jnp.where(exp == 2, 2.0, 4.0))
    mag = jnp.where(exp == 0, 0.5 * man, pow2 * (1.0 + 0.5 * man))
    return sign * mag


# Midpoints between neighbouring e2m1 magnitudes, and whether a tie rounds up: to the even code
# (mantissa bit 0), as a float4_e2m1fn conversion does.
E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
                  (5.0, False))


def e2m1_encode(x: jax.Array) -> jax.Array:
    """float values -> e2m1 codes (uint8 in [0, 15]); round to nearest even, saturate at 6.

    The magnitude's code counts the midpoints below it: compares and adds only, the same on every
    backend. The earlier form (cast to float4_e2m1fn, then an argmax over the eight magnitudes)
    gave an NVFP4 round-trip error of 0.89 inside jit on an H200 (jax 0.11.2) where the CPU gives
    0.09; an eager cast of the same kind of values matched ml_dtypes there, so which op went wrong
    was not isolated."""
    x = x.astype(jnp.float32)
    mag = jnp.abs(x)
    idx = sum(((mag >= t) if up else (mag > t)).astype(jnp.uint8) for t, up in E2M1_MIDPOINTS)
    return jnp.where((x < 0) & (idx > 0), idx | 8, idx).astype(jnp.uint8)


def decode_values(data: jax.Array, fmt: str, asymmetric: bool = False) -> jax.Array:
    """Stored data -> float32 code values [..., H] before scaling (unpacks 4-bit formats).

    int4 symmetric nibbles are sign-extended ([-8, 7]); with a zero point
    (asymmetric) they are unsigned ([0, 15]). Kernel-safe element-wise ops only.
    """
    if fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        return data.astype(jnp.float32)
    codes = unpack_nibbles(data)
    if fmt == "nvfp4":
        return e2m1_decode(codes)
    if asymmetric:
        return codes.astype(jnp.float32)
    return jnp.where(codes >= 8, codes - 16, codes).astype(jnp.float32)


# ------------------------------------------------------------------ scale groups

def expand_groups(s: jax.Array, tg: int, cg: int, num_tokens: int, num_channels: int) -> jax.Array:
    """Broadcast a group array [..., S/tg, H/cg] to [..., S, H] (each value over tg x cg)."""
    s = jnp.repeat(s, tg, axis=-2) if tg > 1 else s
    s = jnp.repeat(s, cg, axis=-1) if cg > 1 else s
    return jnp.broadcast_to(s, (*s.shape[:-2], num_tokens, num_channels))


def _group_reduce(x: jax.Array, tg: int, cg: int, fn) -> jax.Array:
    """Reduce x [..., S, H] over (tg, cg) groups -> [..., S/tg, H/cg]."""
    *lead, s, h = x.shape
    g = x.reshape(*lead, s // tg, tg, h // cg, cg)
    return fn(g, axis=(-3, -1))


def check_groups(num_tokens: int, head_dim: int, fmt: str, tg: int, cg: int) -> None:
    if tg < 1 or num_tokens % tg:
        raise ValueError(f"token_group={tg} must be >= 1 and divide the token axis ({num_tokens=})")
    if cg < 1 or head_dim % cg:
        raise ValueError(f"channel_group={cg} must be >= 1 and divide {head_dim=}")
    if fmt in PACKED and head_dim % 2:
        raise ValueError(f"{fmt} packs two channels per byte: {head_dim=} must be even")
    if fmt == "nvfp4" and (cg != NVFP4_GROUP or tg != 1):
        raise ValueError(f"nvfp4 uses 16-channel blocks per token: got token_group={tg}, channel_group={cg}")


def nvfp4_tensor_scale(amax: float | jax.Array) -> jax.Array:
    """NVFP4 per-tensor scale so that amax maps to the largest e4m3 x e2m1 product (448 * 6)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > 0, amax / (E4M3_MAX * 6.0), 1.0)


@functools.partial(jax.jit, static_argnames=("fmt", "tg", "cg", "asymmetric"))
def quantize(x: jax.Array, fmt: str, tg: int = 1, cg: int | None = None, *, asymmetric: bool = False,
             tensor_scale: float | jax.Array | None = None):
    """Quantize x [..., S, H] (tokens, channels last) in groups of tg tokens x cg channels.

    Returns (data, scale, zero): data as in the format table, scale [..., S/tg, H/cg]
    (f32; float8_e4m3fn for nvfp4), zero [..., S/tg, H/cg] f32 for asymmetric int4,
    else None. cg=None means the whole head (cg = H; nvfp4: 16). nvfp4 takes the
    f32 per-tensor scale (default 1.0; see ``nvfp4_tensor_scale``), which the
    caller keeps and passes to ``dequantize`` and the kernels.
    """
    check_format(fmt)
    num_tokens, h = x.shape[-2], x.shape[-1]
    cg = (NVFP4_GROUP if fmt == "nvfp4" else h) if cg is None else cg
    check_groups(num_tokens, h, fmt, tg, cg)
    if asymmetric and fmt != "int4":
        raise ValueError(f"asymmetric (zero-point) quantization is only defined for int4, not {fmt}")
    x = x.astype(jnp.float32)

    if fmt == "int4" and asymmetric:
        lo = _group_reduce(x, tg, cg, jnp.min)
        hi = _group_reduce(x, tg, cg, jnp.max)
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
        q = jnp.round((x - expand_groups(lo, tg, cg, num_tokens, h))
                      / expand_groups(scale, tg, cg, num_tokens, h))
        return pack_nibbles(jnp.clip(q, 0, 15).astype(jnp.int32)), scale, lo

    amax = _group_reduce(jnp.abs(x), tg, cg, jnp.max)
    if fmt == "nvfp4":
        t = jnp.asarray(1.0 if tensor_scale is None else tensor_scale, jnp.float32)
        block = jnp.clip(amax / (6.0 * t), 0.0, E4M3_MAX).astype(jnp.float8_e4m3fn)
        denom = expand_groups(block.astype(jnp.float32), tg, cg, num_tokens, h) * t
        q = jnp.where(denom > 0, x / jnp.where(denom > 0, denom, 1.0), 0.0)
        return pack_nibbles(e2m1_encode(q)), block, None

    qmax = QMAX[fmt]
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    q = x / expand_groups(scale, tg, cg, num_tokens, h)
    if fmt == "int8":
        data = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
    elif fmt == "int4":
        data = pack_nibbles(jnp.clip(jnp.round(q), -8, 7).astype(jnp.int32) & 0xF)
    else:  # fp8: clip first, an e4m3 overflow would become NaN
        data = jnp.clip(q, -qmax, qmax).astype(DATA_DTYPE[fmt])
    return data, scale, None


@functools.partial(jax.jit, static_argnames=("fmt", "tg", "cg", "dtype"))
def dequantize(data: jax.Array, scale: jax.Array, zero: jax.Array | None, fmt: str, tg: int = 1,
               cg: int | None = None, *, tensor_scale: float | jax.Array | None = None,
               dtype=jnp.float32) -> jax.Array:
    """Inverse of ``quantize``: [..., S, H(/2)] data and [..., S/tg, H/cg] scales -> [..., S, H]."""
    check_format(fmt)
    vals = decode_values(data, fmt, asymmetric=zero is not None)
    num_tokens, h = vals.shape[-2], vals.shape[-1]
    cg = (NVFP4_GROUP if fmt == "nvfp4" else h) if cg is None else cg
    check_groups(num_tokens, h, fmt, tg, cg)
    out = vals * expand_groups(scale.astype(jnp.float32), tg, cg, num_tokens, h)
    if zero is not None:
        out = out + expand_groups(zero.astype(jnp.float32), tg, cg, num_tokens, h)
    if fmt == "nvfp4":
        out = out * jnp.asarray(1.0 if tensor_scale is None else tensor_scale, jnp.float32)
    return out.astype(dtype)
