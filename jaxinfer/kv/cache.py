"""KV cache pytrees and attention metadata.

Legend: B sequences, T query tokens per sequence, P pages, S cache slots,
K kv heads, G query heads per kv head, H head dim, ps page size.

One layout serves the contiguous and the paged cache (see ARCHITECTURE.md):
every layer holds ``k`` and ``v`` pages of shape [P, K, ps, H]. A contiguous
cache is the special case P = B, ps = S_max with the identity page table; the
``contiguous`` flag lets the XLA attention read it without a gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.kv.bits import from_storage, store_as_bits, storage_dtype, to_storage, widen_from_storage
from jaxinfer.kv.kivi import KiviKeys, init_kivi_keys, read_kivi_keys, write_kivi_keys
from jaxinfer.kv.quant import KVQuantSpec, QuantPages, dequantize_pages, init_quant_pages, write_quant


@struct.dataclass
class KVCache:
    """Per-layer K and V pages: lists of [P, K, ps, H] arrays, QuantPages (quantized KV), or
    BitsPages (bf16 / f16 pages on CPU)."""

    k: list
    v: list

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


@struct.dataclass
class BitsPages:
    """A [P, K, ps, H] page array of bf16 / f16 values held as uint16 (see kv/bits.py: XLA:CPU
    would convert the whole cache to f32 and back for every write). Only used on CPU."""

    bits: jax.Array  # [P, K, ps, H] unsigned, same width as dtype
    dtype: jnp.dtype = struct.field(pytree_node=False)  # the float type the bits hold

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def values(self) -> jax.Array:
        return from_storage(self.bits, self.dtype)


def page_values(pages):
    """The page array as its float type (BitsPages viewed through a bitcast; others as they are)."""
    return pages.values() if isinstance(pages, BitsPages) else pages


@struct.dataclass
class AttentionMeta:
    """Where each row's new tokens go and what each row may attend to.

    Row b holds ``q_lens[b]`` valid query tokens (the rest of its T are padding);
    after this call's writes it has ``kv_lens[b]`` tokens in the cache, so its query
    token t sits at position ``kv_lens[b] - q_lens[b] + t``. Decode (T = 1),
    speculative verification (T = k + 1) and chunked prefill over a cached prefix
    (T = chunk) are the same call.
    """

    page_table: jax.Array  # [B, pages_per_seq] int32
    kv_lens: jax.Array  # [B] int32
    q_lens: jax.Array  # [B] int32
    contiguous: bool = struct.field(pytree_node=False, default=False)
    # a contiguous bf16 cache stored as bits may run `layers.contiguous_bits_loop` (False: read whole)
    bits_loop: bool = struct.field(pytree_node=False, default=True)
    slots: jax.Array | None = None  # [B] per-sequence slot (KIVI residual); None: the row index
    # a prompt into an empty contiguous cache: every row's queries sit at positions 0 .. T-1 and
    # see only the first T slots (`layers.attention` reads no others)
    fresh: bool = struct.field(pytree_node=False, default=False)

    def row_slots(self) -> jax.Array:
        if self.slots is not None:
            return self.slots
        return jnp.arange(self.kv_lens.shape[0], dtype=jnp.int32)

    def query_positions(self, num_tokens: int) -> jax.Array:
        """Absolute position of every query slot: [B, T] int32."""
        start = self.kv_lens - self.q_lens  # [B]
        return start[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]


def init_paged(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, dtype, quant: KVQuantSpec | None = None, num_slots: int | None = None) -> KVCache:
    """A zeroed paged cache: [P, K, ps, H] per layer (QuantPages when quant is given; KIVI
    keys with num_slots per-sequence residuals)."""
    def pages():
        if quant is not None:
            return init_quant_pages(num_pages, num_kv_heads, page_size, head_dim, quant, dtype)
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        if store_as_bits(dtype):
            return BitsPages(jnp.zeros(shape, storage_dtype(dtype)), jnp.dtype(dtype))
        return jnp.zeros(shape, dtype)

    def keys():
        if quant is not None and quant.kivi:
            return init_kivi_keys(num_pages, num_kv_heads, page_size, head_dim, num_slots or num_pages, dtype)
        return pages()

    return KVCache(k=[keys() for _ in range(num_layers)], v=[pages() for _ in range(num_layers)])


def init_contiguous(num_layers: int, batch: int, max_len: int, num_kv_heads: int,
                    head_dim: int, dtype, quant: KVQuantSpec | None = None) -> tuple[KVCache, jax.Array]:
    """A zeroed contiguous cache [B, K, S, H] per layer and its identity page table [B, 1]."""
    cache = init_paged(num_layers, batch, max_len, num_kv_heads, head_dim, dtype, quant)
    return cache, jnp.arange(batch, dtype=jnp.int32)[:, None]


def write_slots(meta: AttentionMeta, num_tokens: int, page_size: int, num_pages: int):
    """Page and in-page offset for every query slot; padding slots point past the end.

    Returns (page [B, T], offset [B, T]); a scatter with mode="drop" then ignores the
    padding slots, so rows with fewer valid tokens never touch another row's pages.
    """
    pos = meta.query_positions(num_tokens)  # [B, T]
    valid = jnp.arange(num_tokens)[None, :] < meta.q_lens[:, None]
    page_idx = jnp.clip(pos // page_size, 0, meta.page_table.shape[1] - 1)
    page = jnp.take_along_axis(meta.page_table, page_idx, axis=1)
    page = jnp.where(valid, page, num_pages)
    return page, pos % page_size


def write_pages(pages, new: jax.Array, page: jax.Array, offset: jax.Array, meta: AttentionMeta | None = None):
    """Scatter new tokens [B, T, K, H] into pages [P, K, ps, H] at (page, offset) [B, T].

    QuantPages quantize on write; KIVI keys append to each row's residual group (meta)."""
    if isinstance(pages, KiviKeys):
        return write_kivi_keys(pages, new, meta)
    if isinstance(pages, QuantPages):
        return write_quant(pages, new, page, offset)
    if isinstance(pages, BitsPages):
        new = to_storage(new.astype(pages.dtype), pages.bits.dtype)
        return pages.replace(bits=pages.bits.at[page, :, offset].set(new, mode="drop"))
    return pages.at[page, :, offset].set(new.astype(pages.dtype), mode="drop")


def _gather(x: jax.Array, meta: AttentionMeta) -> jax.Array:
    if meta.contiguous:
        return x  # already [B, K, S, W]
    # One (page, kv head) block per index, taken straight into [B, K, pp, ps, W] order: gathering
    # x[page_table] and transposing pp and K after cost a copy per layer and chunk (engine decode
    # at one running request: 10% of the step). Each block is taken as one row of ps * W values:
    # XLA:CPU copies a [1, ps * W] slice about twice as fast as a [1, ps, W] one (the engine's decode
    # attention at 48 rows, pages of 16 x 64 floats: the K and V gathers 1.87 -> 0.81 ms a layer).
    n, k, ps, w = x.shape
    b, pp = meta.page_table.shape
    idx = meta.page_table[:, None, :] * k + jnp.arange(k, dtype=meta.page_table.dtype)[None, :, None]
    return x.reshape(n * k, ps * w)[idx].reshape(b, k, pp * ps, w)


def _read(pages, take):
    """`take` (a selection of slots, [P or B, K, ps, W] -> [B, K, S', W]) applied to every stored
    array of non-KIVI pages, then viewed as floats: QuantPages' codes and scales are selected, then
    dequantized; bf16 BitsPages come back as float32 (exact; attention computes in f32 anyway)."""
    if isinstance(pages, QuantPages):
        rows = pages.replace(data=take(pages.data), scale=take(pages.scale),
                             zero=None if pages.zero is None else take(pages.zero))
        data, scale, zero = rows.values()
        return dequantize_pages(data, scale, pages.spec, pages.head_dim, pages.dtype, zero)
    if isinstance(pages, BitsPages):
        return widen_from_storage(take(pages.bits), pages.dtype)
    return take(pages)


def gather_pages(pages, meta: AttentionMeta) -> jax.Array:
    """Each row's cache as one contiguous run: [B, K, S, H], S = pages_per_seq * ps, read as
    `_read` says (QuantPages dequantized, bf16 BitsPages as float32)."""
    if isinstance(pages, KiviKeys):
        return read_kivi_keys(pages, meta, _gather)
    return _read(pages, lambda x: _gather(x, meta))


def read_slots(pages, page: jax.Array, offset: jax.Array) -> jax.Array:
    """One slot per row of a (non-quantized) page array [P, K, ps, W]: slot offset[b] of page
    page[b] -> [B, K, W], read as `_read` says (bf16 BitsPages as float32)."""
    return _read(pages, lambda x: x[page, :, offset])


def slice_slots(pages, start: jax.Array, width: int) -> jax.Array:
    """Slots [start, start + width) of every row of a contiguous cache [B, K, S, H], read as
    `gather_pages` reads whole rows. start + width <= S."""
    return _read(pages, lambda x: jax.lax.dynamic_slice_in_dim(x, start, width, axis=2))


def grow_contiguous(cache: KVCache, new_len: int) -> KVCache:
    """A contiguous cache [B, K, S, H] per layer extended to new_len slots (zero-filled).

    Static generation starts with a short cache and grows it between decode segments, so
    each step's attention reads about as many slots as the sequences hold, not S_max."""
    def pad(x, slots):
        return jnp.pad(x, [(0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0)])

    def grow(pages):
        if isinstance(pages, KiviKeys):
            g = pages.group
            return pages.replace(data=pad(pages.data, new_len), scale=pad(pages.scale, new_len // g),
                                 zero=pad(pages.zero, new_len // g))
        if isinstance(pages, QuantPages):
            return pages.replace(data=pad(pages.data, new_len), scale=pad(pages.scale, new_len),
                                 zero=None if pages.zero is None else pad(pages.zero, new_len))
        if isinstance(pages, BitsPages):
            return pages.replace(bits=pad(pages.bits, new_len))
        return pad(pages, new_len)

    return KVCache(k=[grow(x) for x in cache.k], v=[grow(x) for x in cache.v])
