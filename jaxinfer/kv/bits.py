"""Narrow floats stored as same-width unsigned integers on CPU.

XLA:CPU has no scatter for floats narrower than 32 bits: it wraps one in converts to float32
and back (float normalization), so writing one token into a bf16 or fp8 cache converts the whole
cache, per layer and step. In a decode loop over 12 caches of [32, 8, 128, 64] that is 14.2 vs
5.3 ms per step for bf16 and 27.4 vs 7.3 ms for float8_e4m3fn (scratch micro-benchmark). The
same bits scattered as integers are written in place, and a reader's bitcast back fuses into
the convert that reads them. Other backends scatter narrow floats natively and keep them.
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
