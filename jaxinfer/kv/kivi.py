"""KIVI keys: int4 per channel over groups of G tokens, with a full-precision residual.

Legend: P pages, K kv heads, ps page size, H head dim, G tokens per key group,
R residual slots (one per sequence), B rows, T new tokens, S cache slots.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache") quantizes keys per channel (outlier channels get their own range) and
values per token, both asymmetric with zero points, and keeps the most recent
tokens in full precision until a group fills. Here a key group is G tokens of one
page (ps % G == 0; scales and zero points [P, K, ps/G, H] are the kernel's
token_group = G, channel_group = 1 arrangement). The keys of each sequence's last,
partial group live in `resid` [R, K, G, H], indexed by the sequence's slot
(`AttentionMeta.slots`; the row itself in a contiguous cache). A write appends the
new keys after the residual's; every group that fills is quantized into the pages
and the new partial group becomes the residual. A read dequantizes the pages and
overlays each row's residual on its partial group. Values use `QuantPages` with an
asymmetric int4 spec (kv/quant.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import kv_formats as kvf

KIVI_KEY_GROUP = 32  # tokens per key scale group


@struct.dataclass
class KiviKeys:
    data: jax.Array  # [P, K, ps, H/2] uint8, unsigned nibbles
    scale: jax.Array  # [P, K, ps/G, H] bfloat16
    zero: jax.Array  # [P, K, ps/G, H] bfloat16
    resid: jax.Array  # [R, K, G, H] full precision: each sequence's partial group
    group: int = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)
    dtype: jnp.dtype = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        p, k, ps, _ = self.data.shape
        return p, k, ps, self.head_dim


def init_kivi_keys(num_pages: int, num_kv_heads: int, page_size: int, head_dim: int, num_slots: int,
                   dtype, group: int = KIVI_KEY_GROUP) -> KiviKeys:
    if page_size % group:
        raise ValueError(f"kv_cache_dtype='int4_kivi' groups keys by {group} tokens: block_size={page_size} "
                         f"must be a multiple of {group}")
    g = (num_pages, num_kv_heads, page_size // group, head_dim)
    return KiviKeys(data=jnp.zeros((num_pages, num_kv_heads, page_size, head_dim // 2), jnp.uint8),
                    scale=jnp.zeros(g, jnp.bfloat16), zero=jnp.zeros(g, jnp.bfloat16),
                    resid=jnp.zeros((num_slots, num_kv_heads, group, head_dim), dtype),
                    group=group, head_dim=head_dim, dtype=jnp.dtype(dtype))


def quantize_groups(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel asymmetric int4 over axis -3 (a group's tokens): x [..., G, K, H] ->
    (packed codes [..., G, K, H/2], scale [..., K, H], zero [..., K, H]), scale/zero in bf16."""
    x32 = x.astype(jnp.float32)
    lo, hi = jnp.min(x32, axis=-3), jnp.max(x32, axis=-3)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(jnp.bfloat16)
    zero = lo.astype(jnp.bfloat16)
    q = jnp.round((x32 - zero.astype(jnp.float32)[..., None, :, :]) / scale.astype(jnp.float32)[..., None, :, :])
    return kvf.pack_nibbles(jnp.clip(q, 0, 15).astype(jnp.int32)), scale, zero


def write_kivi_keys(pages: KiviKeys, new: jax.Array, meta) -> KiviKeys:
    """Append new keys [B, T, K, H]; quantize the groups they fill, keep the rest as residual."""
    b, t, kh, h = new.shape
    g, ps, num_pages = pages.group, pages.data.shape[2], pages.data.shape[0]
    num_slots = pages.resid.shape[0]
    start = meta.kv_lens - meta.q_lens  # [B] position of the first new token
    base = (start // g) * g  # [B] first position of the partial group
    r = start - base  # [B] keys already in the residual
    end = r + meta.q_lens  # [B] keys in the buffer after the append
    n_groups = (t + g - 1) // g + 1
    slots = meta.row_slots()
    valid = meta.q_lens > 0
    # Buffer of whole groups: the residual, then the new keys.  [B, n_groups * G, K, H]
    buf = jnp.zeros((b, n_groups * g, kh, h), pages.dtype)
    resid = pages.resid[jnp.clip(slots, 0, num_slots - 1)].transpose(0, 2, 1, 3)  # [B, G, K, H]
    buf = buf.at[:, :g].set(jnp.where(jnp.arange(g)[None, :, None, None] < r[:, None, None, None], resid, 0))
    tt = jnp.arange(t)[None, :]
    dest = jnp.where(tt < meta.q_lens[:, None], r[:, None] + tt, n_groups * g)  # [B, T]
    buf = buf.at[jnp.arange(b)[:, None], dest].set(new.astype(pages.dtype), mode="drop")
    groups = buf.reshape(b, n_groups, g, kh, h)
    codes, scale, zero = quantize_groups(groups)  # [B, n, G, K, H/2], [B, n, K, H]
    # Full groups go to their page; the rest are dropped (index num_pages).
    j = jnp.arange(n_groups)[None, :]
    gpos = base[:, None] + j * g  # [B, n] first position of group j
    full = ((j + 1) * g <= end[:, None]) & valid[:, None]
    page_idx = jnp.clip(gpos // ps, 0, meta.page_table.shape[1] - 1)
    page = jnp.where(full, jnp.take_along_axis(meta.page_table, page_idx, axis=1), num_pages)  # [B, n]
    off = gpos % ps  # [B, n], a multiple of G
    tok_page = jnp.broadcast_to(page[:, :, None], (b, n_groups, g))
    tok_off = off[:, :, None] + jnp.arange(g)[None, None, :]
    data = pages.data.at[tok_page, :, tok_off].set(codes, mode="drop")
    sc = pages.scale.at[page, :, off // g].set(scale, mode="drop")
    zr = pages.zero.at[page, :, off // g].set(zero, mode="drop")
    # The new partial group (if any) becomes the residual of the row's slot.
    jp = end // g  # [B]
    partial = jnp.take_along_axis(groups, jp[:, None, None, None, None], axis=1)[:, 0]  # [B, G, K, H]
    has_partial = valid & (end % g != 0)
    dst = jnp.where(has_partial, slots, num_slots)
    res = pages.resid.at[dst].set(partial.transpose(0, 2, 1, 3), mode="drop")
    return pages.replace(data=data, scale=sc, zero=zr, resid=res)


def read_kivi_keys(pages: KiviKeys, meta, gather) -> jax.Array:
    """Each row's keys [B, K, S, H]: dequantized pages with the residual over the partial group."""
    g = pages.group
    codes = kvf.unpack_nibbles(gather(pages.data, meta)).astype(jnp.float32)  # [B, K, S, H]
    s = codes.shape[2]
    scale = jnp.repeat(gather(pages.scale, meta).astype(jnp.float32), g, axis=2)
    zero = jnp.repeat(gather(pages.zero, meta).astype(jnp.float32), g, axis=2)
    keys = (codes * scale + zero).astype(pages.dtype)
    slots = jnp.clip(meta.row_slots(), 0, pages.resid.shape[0] - 1)
    resid = pages.resid[slots]  # [B, K, G, H]
    pbase = jnp.clip((meta.kv_lens // g) * g, 0, s - g)
    over = jax.vmap(lambda kk, rr, p0: jax.lax.dynamic_update_slice(kk, rr, (0, p0, 0)))(keys, resid, pbase)
    has_partial = (meta.kv_lens % g != 0)[:, None, None, None]
    return jnp.where(has_partial, over, keys)


def kivi_key_bytes_per_token(head_dim: int, group: int = KIVI_KEY_GROUP) -> float:
    """Packed codes + bf16 scale and zero per channel, amortized over the group (residual excluded)."""
    return head_dim / 2 + 2 * 2 * head_dim / group
