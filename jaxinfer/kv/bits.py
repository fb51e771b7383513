"""Narrow floats stored as same-width unsigned integers on CPU.

XLA:CPU has no scatter for floats narrower than 32 bits: it wraps one in converts to float32
and back (float normalization), so writing one token into a bf16 or fp8 cache converts the whole
cache, per layer and step. In a decode loop over 12 caches of [32, 8, 128, 64] that is 14.2 vs
5.3 ms per step for bf16 and 27.4 vs 7.3 ms for float8_e4m3fn (scratch micro-benchmark). The
same bits scattered as integers are written in place. Readers view them as floats only after
gathering the rows they need: XLA:CPU may materialize a bitcast as a copy of its whole operand
(for bf16 pages `widen_from_storage` avoids even that). Other backends scatter narrow floats
natively and keep them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def store_as_bits(dtype) -> bool:
    """Whether cache arrays of this dtype are kept as unsigned integers (narrow floats, CPU)."""
    dtype = jnp.dtype(dtype)
    return jax.default_backend() == "cpu" and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a cache array of logical `dtype` is allocated with."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(f"uint{8 * dtype.itemsize}") if store_as_bits(dtype) else dtype


def to_storage(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values (already in their logical dtype) -> the stored dtype (a bitcast when they differ)."""
    return x if x.dtype == stored else jax.lax.bitcast_convert_type(x, stored)


def from_storage(x: jax.Array, logical) -> jax.Array:
    """A stored array -> its logical dtype (a bitcast when they differ)."""
    return x if x.dtype == jnp.dtype(logical) else jax.lax.bitcast_convert_type(x, logical)


def widen_from_storage(x: jax.Array, logical) -> jax.Array:
    """A stored array -> values for compute: bf16 bits become float32 directly (a bf16 is the high
    half of an f32, so this is exact), which XLA:CPU fuses into the attention's reductions where a
    bitcast to bf16 would be materialized as a copy of the whole cache (bf16 decode of the embedded
    target at 32 rows x 576 slots: ~10 vs ~12-15 ms per step in a micro-benchmark, f32 pages ~7.7).
    Other dtypes: as from_storage."""
    if jnp.dtype(logical) == jnp.bfloat16 and x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    return from_storage(x, logical)
