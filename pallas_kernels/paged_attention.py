"""Paged attention (decode, speculative verification, chunked prefill): Triton kernel, wrapper, reference.

Legend: B sequences, T query tokens per sequence, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, P pages, ps page size, pp pages per
sequence, R = T * G query rows of one kv head, C keys of one tile, S split-K parts.

Inputs follow ARCHITECTURE.md ("KV layout", "Quantized pages"):
  q           [B, T, N, H]
  k/v pages   [P, K, ps, H]  (4-bit formats: uint8 [P, K, ps, H/2])
  scales      [P, K, ps/tg, H/cg]   (+ zero points of the same shape for asymmetric int4)
  page_table  [B, pp] int32;  kv_lens [B]: cached tokens INCLUDING this call's;  q_lens [B]
Query t of row b sits at position kv_lens[b] - q_lens[b] + t and sees keys at
positions < kv_lens[b], <= its own (causal) and > its own - window (sliding
window). Slots t >= q_lens[b] are padding: finite, meaningless output.

Design (both lowerings; the Mosaic one is in ``paged_attention_tpu.py``):
  * GQA natively: the G query heads of a kv head and the T query tokens fold into
    R = T * G rows (row r is token r // G, head r % G), so one K/V tile load serves
    every query that reads it. Decode (T = 1), verification (T = k + 1) and chunked
    prefill (T = chunk) are the same call.
  * Blocking within and across pages: a kv block is block_k keys. When ps >= block_k
    a block is a slice of one page (the contiguous cache is one huge page per row);
    when ps < block_k a block gathers block_k / ps pages through the page table.
  * Only the blocks a row tile can see are visited: [first key of the sliding window,
    causal diagonal of the tile's last row, kv_len).
  * Split-K (Flash-Decoding, Dao et al. 2023): that block range is cut into S
    parts (grid axis); each writes an unnormalized partial (o, m, l) and the wrapper
    merges them with a log-sum-exp rescale. S = 1 writes the final output directly.
  * FlashAttention algorithm 1 inside each part (``online_softmax_step``).
  * Quantized pages are dequantized in registers/VMEM after the load: codes
    (int8, fp8, unpacked 4-bit nibbles, e2m1) times the group scale broadcast over
    tg tokens x cg channels (+ zero point). NVFP4's per-tensor scale is folded into
    q (for K) and the output (for V) by the wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import kv_formats as kvf
from pallas_kernels.flash_attention import (FLOAT_DTYPES, attention_scores, div_const, finalize,
                                            init_state, online_softmax_step, resolve_backend)


MOSAIC_MAX_PAGES_PER_STEP = 16  # each page of a step is its own BlockSpec input (one DMA)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_rows query rows (T * G folded) per program, block_k keys per step.

    num_splits: split-K parts (None: chosen from the grid size; 1 in interpret
    mode). num_warps / num_stages are Triton launch parameters.
    """

    block_rows: int = 64
    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend: str) -> "BlockSizes":
        if backend == "mosaic":  # 256 keys per grid step amortize the per-step overhead
            return cls(block_rows=128, block_k=256)
        return cls()


@dataclasses.dataclass(frozen=True)
class Statics:
    """Everything the kernels specialize on (hashable)."""

    scale: float
    soft_cap: float | None
    causal: bool
    window: int | None
    group: int  # G
    head_dim: int  # H
    block_rows: int
    block_k: int  # keys per step
    page_size: int
    pages_per_block: int  # > 1 when a step gathers several small pages
    num_blocks: int  # kv blocks in a full page-table row
    num_splits: int
    kv_format: str | None
    k_groups: tuple[int, int]  # (tg, cg) of the K scales
    v_groups: tuple[int, int]
    k_asym: bool
    v_asym: bool

    @property
    def tile(self) -> int:
        """Keys per page tile: block_k, or ps when a block spans several pages."""
        return self.block_k // self.pages_per_block


# ------------------------------------------------------------------ shared kernel pieces

def kv_block_range(rb, kv_len, q_len, st: Statics):
    """Blocks [lo, hi) that row tile rb can see (hi == lo when the tile is all padding)."""
    r0 = rb * st.block_rows
    t_min = lax.div(r0, st.group)
    t_max = jnp.minimum(lax.div(r0 + st.block_rows - 1, st.group), q_len - 1)
    start = kv_len - q_len  # position of query token 0
    hi_tok = jnp.minimum(kv_len, start + t_max + 1) if st.causal else kv_len
    lo_tok = 0 if st.window is None else jnp.maximum(start + t_min - st.window + 1, 0)
    lo = lax.div(lo_tok, st.block_k)
    hi = jnp.where(t_min < q_len, lax.div(hi_tok + st.block_k - 1, st.block_k), lo)
    return lo, jnp.maximum(hi, lo)


def split_range(lo, hi, s, num_splits: int):
    """Part s of [lo, hi) when cut into num_splits near-equal parts."""
    per = lax.div(hi - lo + num_splits - 1, num_splits)
    s_lo = lo + s * per
    return s_lo, jnp.maximum(jnp.minimum(hi, s_lo + per), s_lo)


def row_positions(rb, kv_len, q_len, st: Statics, rows: int):
    """Absolute position of every query row of tile rb: [rows, 1] int32."""
    r = rb * st.block_rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    return kv_len - q_len + div_const(r, st.group)


def tile_mask(q_pos, first_key, kv_len, st: Statics, num_keys: int):
    """Visibility [rows, num_keys] of keys first_key + c for queries at q_pos [rows, 1]."""
    k_pos = first_key + lax.broadcasted_iota(jnp.int32, (q_pos.shape[0], num_keys), 1)
    mask = k_pos < kv_len
    if st.causal:
        mask = mask & (k_pos <= q_pos)
    if st.window is not None:
        mask = mask & (k_pos > q_pos - st.window)
    return mask


def _expand_tile(s, tg: int, cg: int, num_keys: int, head_dim: int):
    """Group values [a, H/cg] of one tile -> something broadcastable against [num_keys, H]."""
    a, hc = s.shape
    if cg > 1 and hc > 1:  # per channel group: repeat each value over cg channels
        s = jnp.broadcast_to(s[:, :, None], (a, hc, cg)).reshape(a, head_dim)
    if a not in (1, num_keys):  # per token group: repeat each row over tg tokens
        s = jnp.broadcast_to(s[:, None, :], (a, tg, s.shape[1])).reshape(num_keys, s.shape[1])
    return s


def dequant_tile(data, scale, zero, st: Statics, groups: tuple[int, int], asym: bool, dtype):
    """A loaded tile -> [C, H] in the compute dtype; unquantized tiles are only cast.

    data [C, H] (or [C, H/2] uint8 for 4-bit formats), scale and zero [C/tg or 1, H/cg].
    """
    if st.kv_format is None:
        return data.astype(dtype)
    vals = kvf.decode_values(data, st.kv_format, asymmetric=asym)  # [C, H] f32
    c = vals.shape[0]
    out = vals * _expand_tile(scale.astype(jnp.float32), *groups, c, st.head_dim)
    if zero is not None:
        out = out + _expand_tile(zero.astype(jnp.float32), *groups, c, st.head_dim)
    return out.astype(dtype)


# ------------------------------------------------------------------ Triton (GPU)

def _load_block(ref, pt_ref, b, h, blk, st: Statics, tg: int):
    """Rows of kv block blk of kv head h from ref [P, K, ps/tg, X] -> [block_k/tg or 1, X]."""
    if st.pages_per_block == 1:  # a slice of one page
        per_page = st.page_size // st.block_k
        page = pt_ref[b, lax.div(blk, per_page)]
        off = lax.rem(blk, per_page) * st.block_k  # first token of the block inside its page
        rows = max(st.block_k // tg, 1)
        return ref[page, h, pl.ds(lax.div(off, tg), rows), :]
    pages = pt_ref[b, pl.ds(blk * st.pages_per_block, st.pages_per_block)]  # [ppb]
    x = ref[pages, h]  # [ppb, ps/tg, X] gathered through the page table
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def paged_attention_kernel(pt_ref, kv_lens_ref, q_lens_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, kz_ref,
                           vz_ref, o_ref, m_ref, l_ref, *, st: Statics):
    """Triton program: row tile rb of (row b, kv head h), split part s, looping over its kv blocks.

    pt_ref:       [B, pp] int32 page table;  kv_lens_ref, q_lens_ref: [B] int32
    q_ref:        [block_rows, H]        rows (t, g) of kv head h
    k_ref, v_ref: [P, K, ps, H or H/2]   the whole page pool (the kernel reads kv head h)
    ks/vs_ref:    [P, K, ps/tg, H/cg]    scales (None when unquantized)
    kz/vz_ref:    [P, K, ps/tg, H/cg]    zero points (None unless asymmetric int4)
    o_ref:        [block_rows, H]        this part's output, normalized by its own l
    m_ref, l_ref: [block_rows, 1] f32    this part's running max (log2 units) and normalizer (for the
                                         split-K merge)
    """
    b, h, rb, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    rows, head_dim = q_ref.shape
    kv_len, q_len = kv_lens_ref[b], q_lens_ref[b]
    lo, hi = kv_block_range(rb, kv_len, q_len, st)
    s_lo, s_hi = split_range(lo, hi, s, st.num_splits)
    q = q_ref[...]
    q_pos = row_positions(rb, kv_len, q_len, st, rows)

    def load(ref, blk, tg):
        return None if ref is None else _load_block(ref, pt_ref, b, h, blk, st, tg)

    def body(blk, state):
        (ktg, _), (vtg, _) = st.k_groups, st.v_groups
        k = dequant_tile(load(k_ref, blk, 1), load(ks_ref, blk, ktg), load(kz_ref, blk, ktg), st,
                         st.k_groups, st.k_asym, q.dtype)  # [block_k, H]
        v = dequant_tile(load(v_ref, blk, 1), load(vs_ref, blk, vtg), load(vz_ref, blk, vtg), st,
                         st.v_groups, st.v_asym, q.dtype)
        scores = attention_scores(q, k, st.scale, st.soft_cap)  # [rows, block_k], log2 units
        mask = tile_mask(q_pos, blk * st.block_k, kv_len, st, st.block_k)
        return online_softmax_step(scores, mask, v, *state)

    m, l, acc = lax.fori_loop(s_lo, s_hi, body, init_state(rows, head_dim))
    o_ref[...] = finalize(l, acc).astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l


def _paged_triton(q, k_pages, v_pages, scales, page_table, kv_lens, q_lens, st: Statics, bs: BlockSizes,
                  out_dtype, interpret: bool):
    from jax.experimental.pallas import triton as pltriton

    b, kh, r_pad, h = q.shape
    grid = (b, kh, r_pad // st.block_rows, st.num_splits)

    def whole(x):
        """The whole pool: the kernel indexes pages and the kv head itself. (A per-head block
        would be a copy of the pool per grid step in interpret mode; a whole-array block is not.)"""
        return pl.BlockSpec(x.shape, lambda *_: (0, 0, 0, 0))

    scale_specs = [None if x is None else whole(x) for x in scales]
    row_spec = pl.BlockSpec((None, None, None, st.block_rows, h), lambda bi, hd, rb, s: (s, bi, hd, rb, 0))
    ml_spec = pl.BlockSpec((None, None, None, st.block_rows, 1), lambda bi, hd, rb, s: (s, bi, hd, rb, 0))
    part = (st.num_splits, b, kh, r_pad)
    return pl.pallas_call(
        functools.partial(paged_attention_kernel, st=st),
        grid=grid,
        in_specs=[pl.BlockSpec(page_table.shape, lambda *_: (0, 0)),
                  pl.BlockSpec((b,), lambda *_: (0,)), pl.BlockSpec((b,), lambda *_: (0,)),
                  pl.BlockSpec((None, None, st.block_rows, h), lambda bi, hd, rb, s: (bi, hd, rb, 0)),
                  whole(k_pages), whole(v_pages), *scale_specs],
        out_specs=[row_spec, ml_spec, ml_spec],
        out_shape=[jax.ShapeDtypeStruct((*part, h), out_dtype),
                   jax.ShapeDtypeStruct((*part, 1), jnp.float32),
                   jax.ShapeDtypeStruct((*part, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="paged_attention_triton",
    )(page_table, kv_lens, q_lens, q, k_pages, v_pages, *scales)


# ------------------------------------------------------------------ wrapper

def combine_splits(o, m, l):
    """Merge split-K partials o [S, ..., H] (each normalized by its own l), m (log2 units, as the
    kernels' exp2 softmax keeps it), l [S, ..., 1]."""
    m_all = jnp.max(m, axis=0)
    w = l * jnp.exp2(m - m_all)  # [S, ..., 1] each part's share of the softmax mass
    total = jnp.sum(w, axis=0)
    return jnp.sum(w * o.astype(jnp.float32), axis=0) / jnp.where(total > 0, total, 1.0)


def _pair(x, name):
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{name}={x} must be an int or a (K, V) pair")
        return x
    return (x, x)


def _check_and_plan(q, k_pages, v_pages, page_table, kv_lens, q_lens, scales, kv_format, token_group,
                    channel_group, scale, causal, sliding_window, soft_cap, bs: BlockSizes, backend: str,
                    interpret: bool):
    """Validate every input (errors name the values) and derive the kernel statics."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H]; got {q.shape=}")
    b, t, n, h = q.shape
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype={q.dtype} must be float32, bfloat16 or float16")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must be [P, K, ps, H] of one dtype; got {k_pages.shape=} "
                         f"{k_pages.dtype=}, {v_pages.shape=} {v_pages.dtype=}")
    num_pages, kh, page_size, hd = k_pages.shape
    if n % kh:
        raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={kh}")
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B={b}, pages_per_seq]; got {page_table.shape=} "
                         f"{page_table.dtype=}")
    for name, x in (("kv_lens", kv_lens), ("q_lens", q_lens)):
        if x.shape != (b,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [B={b}]; got {x.shape=} {x.dtype=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 or None")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap} must be positive or None")

    k_scale, v_scale, k_zero, v_zero = scales
    tgs, cgs = _pair(token_group, "token_group"), _pair(channel_group, "channel_group")
    if kv_format is None:
        if k_pages.dtype not in FLOAT_DTYPES:
            raise ValueError(f"k_pages.dtype={k_pages.dtype} needs a kv_format (one of {kvf.FORMATS})")
        if any(x is not None for x in scales):
            raise ValueError("k_scale / v_scale / k_zero / v_zero given but kv_format=None")
        if hd != h:
            raise ValueError(f"page head_dim={hd} must equal q's head_dim={h}")
        groups = ((1, h), (1, h))
    else:
        kvf.check_format(kv_format)
        want = kvf.DATA_DTYPE[kv_format]
        if k_pages.dtype != want:
            raise ValueError(f"kv_format={kv_format!r} stores {jnp.dtype(want).name} pages; got "
                             f"k_pages.dtype={k_pages.dtype}")
        want_hd = h // 2 if kv_format in kvf.PACKED else h
        if hd != want_hd:
            raise ValueError(f"kv_format={kv_format!r} pages must have last dim {want_hd} for {h=} "
                             f"(got {hd})")
        groups = []
        for name, tg, cg in (("k", tgs[0], cgs[0]), ("v", tgs[1], cgs[1])):
            cg = (kvf.NVFP4_GROUP if kv_format == "nvfp4" else h) if cg is None else cg
            kvf.check_groups(page_size, h, kv_format, tg, cg)
            groups.append((tg, cg))
            shape = (num_pages, kh, page_size // tg, h // cg)
            sc, zr = (k_scale, k_zero) if name == "k" else (v_scale, v_zero)
            allowed = kvf.allowed_scale_dtypes(kv_format)
            if sc is None or sc.shape != shape or sc.dtype not in allowed:
                got = None if sc is None else (sc.shape, sc.dtype)
                names = " or ".join(jnp.dtype(d).name for d in allowed)
                raise ValueError(f"{name}_scale must be {names} {shape} (token_group={tg}, "
                                 f"channel_group={cg}); got {got}")
            if zr is not None and (kv_format != "int4" or zr.shape != shape):
                raise ValueError(f"{name}_zero is only for asymmetric int4, shaped like {name}_scale "
                                 f"{shape}; got {zr.shape} for kv_format={kv_format!r}")
        groups = tuple(groups)

    # Keys per step: a slice of one page, or several whole pages (Mosaic: one DMA each, <= 16).
    if page_size >= bs.block_k:
        block_k, per_block = math.gcd(page_size, bs.block_k), 1
    else:
        per_block = bs.block_k // page_size
        if backend == "mosaic":
            per_block = min(per_block, MOSAIC_MAX_PAGES_PER_STEP)
        block_k = per_block * page_size
    for tg, _ in groups:
        if not (block_k % tg == 0 or tg % block_k == 0):
            raise ValueError(f"token_group={tg} and the kv block ({block_k} keys for {page_size=}, "
                             f"block_k={bs.block_k}) must divide one another")
    rows = t * (n // kh)
    block_rows = min(bs.block_rows, max(16, 1 << (rows - 1).bit_length()))  # a power of two >= 16
    if block_rows < 1:
        raise ValueError(f"block_rows={bs.block_rows} must be positive")
    if backend == "triton" and not interpret:  # Triton tensors are powers of two; tl.dot needs >= 16
        for name, val in (("page_size", page_size), *[(f"group {g}", g) for g in sum(groups, ())]):
            if val & (val - 1):
                raise ValueError(f"{name}={val} must be a power of two for Triton")
        for name, val in (("head_dim", h), ("block_rows", block_rows), ("kv block", block_k)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name}={val} must be a power of two >= 16 for Triton")
    if backend == "mosaic" and not interpret:
        if block_rows % 8 or (block_k // per_block) % 8:
            raise ValueError(f"block_rows={block_rows} and the page tile ({block_k // per_block} keys) "
                             "must be multiples of 8 for Mosaic")

    pages_per_seq = -(-page_table.shape[1] // per_block) * per_block
    num_blocks = pages_per_seq * page_size // block_k
    r_pad = -(-rows // block_rows) * block_rows
    num_splits = bs.num_splits
    if num_splits is None:  # enough programs to fill a GPU / both TPU cores; never in interpret mode
        programs = b * kh * (r_pad // block_rows)
        num_splits = 1 if interpret else max(1, min(256 // programs, num_blocks // 4))
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    st = Statics(
        scale=float(h ** -0.5 if scale is None else scale), soft_cap=soft_cap, causal=causal,
        window=sliding_window, group=n // kh, head_dim=h,
        block_rows=block_rows, block_k=block_k, page_size=page_size, pages_per_block=per_block,
        num_blocks=num_blocks, num_splits=num_splits, kv_format=kv_format, k_groups=groups[0],
        v_groups=groups[1], k_asym=k_zero is not None, v_asym=v_zero is not None)
    return st, pages_per_seq, r_pad


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "sliding_window", "soft_cap", "kv_format", "token_group", "channel_group",
    "block_sizes", "backend", "interpret"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    kv_lens: jax.Array, q_lens: jax.Array, *, scale: float | None = None, causal: bool = True,
                    sliding_window: int | None = None, soft_cap: float | None = None,
                    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                    k_zero: jax.Array | None = None, v_zero: jax.Array | None = None,
                    kv_format: str | None = None, token_group: int | tuple[int, int] = 1,
                    channel_group: int | None | tuple = None, k_tensor_scale: jax.Array | None = None,
                    v_tensor_scale: jax.Array | None = None, block_sizes: BlockSizes | None = None,
                    backend: str = "auto", interpret: bool | None = None) -> jax.Array:
    """Attention of q [B, T, N, H] against paged K/V (layout in the module docstring).

    Quantized pages: kv_format in kv_formats.FORMATS with k_scale / v_scale
    [P, K, ps/tg, H/cg] (+ k_zero / v_zero for asymmetric int4); token_group and
    channel_group are ints or (K, V) pairs (KIVI: keys (ps, 1), values (1, H));
    channel_group None means H (nvfp4: 16). k/v_tensor_scale: NVFP4 per-tensor f32
    scales. backend 'auto' | 'triton' | 'mosaic'; interpret None: on CPU only.
    Returns [B, T, N, H] in q's dtype.
    """
    backend, interpret = resolve_backend(backend, interpret)
    bs = block_sizes or BlockSizes.default(backend)
    scales = (k_scale, v_scale, k_zero, v_zero)
    st, pages_per_seq, r_pad = _check_and_plan(
        q, k_pages, v_pages, page_table, kv_lens, q_lens, scales, kv_format, token_group, channel_group,
        scale, causal, sliding_window, soft_cap, bs, backend, interpret)
    b, t, n, h = q.shape
    kh = k_pages.shape[1]

    if k_tensor_scale is not None:  # NVFP4: q . (t * k) == (t * q) . k
        q = (q.astype(jnp.float32) * k_tensor_scale).astype(q.dtype)
    rows = t * st.group
    qr = q.reshape(b, t, kh, st.group, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)  # [B, K, R, H]
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, r_pad - rows), (0, 0)))
    pt = jnp.clip(page_table, 0, k_pages.shape[0] - 1)  # never read outside the pool
    pt = jnp.pad(pt, ((0, 0), (0, pages_per_seq - pt.shape[1])))
    out_dtype = q.dtype if st.num_splits == 1 and v_tensor_scale is None else jnp.float32

    if backend == "triton":
        o, m, l = _paged_triton(qr, k_pages, v_pages, scales, pt, kv_lens, q_lens, st, bs, out_dtype,
                                interpret)
    else:
        from pallas_kernels.paged_attention_tpu import paged_mosaic
        o, m, l = paged_mosaic(qr, k_pages, v_pages, scales, pt, kv_lens, q_lens, st, out_dtype, interpret)
    out = o[0] if st.num_splits == 1 else combine_splits(o, m, l)  # [B, K, R_pad, H]
    if v_tensor_scale is not None:
        out = out.astype(jnp.float32) * v_tensor_scale
    out = out[:, :, :rows].reshape(b, kh, t, st.group, h).transpose(0, 2, 1, 3, 4)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "sliding_window", "soft_cap", "kv_format", "token_group", "channel_group"))
def paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale=None, causal=True,
                              sliding_window=None, soft_cap=None, k_scale=None, v_scale=None, k_zero=None,
                              v_zero=None, kv_format=None, token_group=1, channel_group=None,
                              k_tensor_scale=None, v_tensor_scale=None) -> jax.Array:
    """Plain jnp: dequantize every page (kv_formats.dequantize), gather rows, masked softmax in f32."""
    b, t, n, h = q.shape
    tgs, cgs = _pair(token_group, "token_group"), _pair(channel_group, "channel_group")

    def full(pages, sc, zr, tg, cg, ts):
        if kv_format is None:
            return pages.astype(jnp.float32)
        return kvf.dequantize(pages, sc, zr, kv_format, tg, cg, tensor_scale=ts)

    k = full(k_pages, k_scale, k_zero, tgs[0], cgs[0], k_tensor_scale)  # [P, K, ps, H]
    v = full(v_pages, v_scale, v_zero, tgs[1], cgs[1], v_tensor_scale)
    num_pages, kh, ps, _ = k.shape
    pt = jnp.clip(page_table, 0, num_pages - 1)
    k = k[pt].transpose(0, 2, 1, 3, 4).reshape(b, kh, -1, h)  # [B, K, S, H]
    v = v[pt].transpose(0, 2, 1, 3, 4).reshape(b, kh, -1, h)
    scale = h ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    highest = lax.Precision.HIGHEST  # a float32 reference, also on GPUs (whose default is TF32)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, precision=highest) * scale  # [B, K, G, T, S]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(t)[None, :]  # [B, T]
    k_pos = jnp.arange(k.shape[2])[None, None, :]
    mask = k_pos < kv_lens[:, None, None]  # [B, 1, S]
    if causal:
        mask = mask & (k_pos <= q_pos[:, :, None])
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos[:, :, None] - sliding_window)
    mask = jnp.broadcast_to(mask, (b, t, k.shape[2]))
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    logits = jnp.where(jnp.any(mask, -1)[:, None, None, :, None], logits, 0.0)  # padding rows: finite
    out = jnp.einsum("bkgts,bksh->btkgh", jax.nn.softmax(logits, axis=-1), v, precision=highest)
    return out.reshape(b, t, n, h).astype(q.dtype)
