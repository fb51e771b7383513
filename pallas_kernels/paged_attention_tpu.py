"""Paged attention, Mosaic (TPU) lowering. Wrapper, reference and design notes: paged_attention.py.

Legend: B sequences, K kv heads, R_pad query rows (T * G, padded), H head dim,
P pages, ps page size, C keys of one page tile, S split-K parts.

Grid (B, K, R_pad / block_rows, S, steps): the last axis walks this part's kv
blocks ("arbitrary"; m, l, acc live in VMEM scratch), the others are parallel.
The page table, kv_lens and q_lens are scalar-prefetched into SMEM so the K/V
BlockSpec index maps can follow the page table: the pipeline DMAs exactly the
page tiles a step needs and double-buffers them. Steps past the end of a part
clamp to its last block (same block index: no new DMA) and skip the compute.

A step covers block_k keys: one tile of a page (ps >= block_k), or block_k / ps
whole pages (ps < block_k), each page its own BlockSpec input (one DMA each),
folded into the softmax state one after another.

Interpret mode runs this variant correctly but slowly for large page pools (the CPU
interpreter carries every page-tile input, i.e. the pool once per input, through
its grid loop); on CPU the wrapper's 'auto' backend interprets the Triton variant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import attention_scores, finalize, init_state, online_softmax_step
from pallas_kernels.paged_attention import (Statics, dequant_tile, kv_block_range, row_positions,
                                            split_range, tile_mask)


def _step_block(b, rb, s, j, kv_lens_ref, q_lens_ref, st: Statics):
    """(kv block of step j, whether step j has work) for row tile rb, part s."""
    lo, hi = kv_block_range(rb, kv_lens_ref[b], q_lens_ref[b], st)
    s_lo, s_hi = split_range(lo, hi, s, st.num_splits)
    blk = s_lo + jnp.minimum(j, jnp.maximum(s_hi - s_lo - 1, 0))
    return jnp.clip(blk, 0, st.num_blocks - 1), s_lo + j < s_hi


def paged_attention_kernel_tpu(pt_ref, kv_lens_ref, q_lens_ref, q_ref, *refs, st: Statics,
                               num_kv_inputs: int):
    """Mosaic step j of row tile rb of (row b, kv head h), split part s.

    pt_ref:       [B * pp] int32 SMEM, flattened page table
    kv_lens_ref, q_lens_ref: [B] int32 SMEM
    q_ref:        [block_rows, H]
    refs[:n]:     per page tile i of the step (i < pages_per_block), in this order:
                  k [C, H or H/2], v [C, H or H/2], then k_scale, v_scale, k_zero,
                  v_zero [C/tg or 1, H/cg] for those present (n = num_kv_inputs)
    o_ref:        [block_rows, H]       written at the last step
    m_ref, l_ref: [block_rows, 1] f32   this part's running max (log2 units) and normalizer
    m_scr, l_scr: [block_rows, 1] f32 VMEM;  acc_scr: [block_rows, H] f32 VMEM
    """
    kv_refs = refs[:num_kv_inputs]
    o_ref, m_ref, l_ref, m_scr, l_scr, acc_scr = refs[num_kv_inputs:]
    b, rb, s, j = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    rows = q_ref.shape[0]
    kv_len, q_len = kv_lens_ref[b], q_lens_ref[b]
    blk, has_work = _step_block(b, rb, s, j, kv_lens_ref, q_lens_ref, st)
    per_tile = num_kv_inputs // st.pages_per_block

    @pl.when(j == 0)
    def _init():
        m0, l0, acc0 = init_state(rows, acc_scr.shape[1])
        m_scr[...], l_scr[...], acc_scr[...] = m0, l0, acc0

    @pl.when(has_work)
    def _step():
        q = q_ref[...]
        q_pos = row_positions(rb, kv_len, q_len, st, rows)
        state = (m_scr[...], l_scr[...], acc_scr[...])
        for i in range(st.pages_per_block):
            k_ref, v_ref, *extra = kv_refs[i * per_tile:(i + 1) * per_tile]
            ks, vs, kz, vz = _unpack_extra(extra, st)
            k = dequant_tile(k_ref[...], ks, kz, st, st.k_groups, st.k_asym, q.dtype)  # [C, H]
            v = dequant_tile(v_ref[...], vs, vz, st, st.v_groups, st.v_asym, q.dtype)
            scores = attention_scores(q, k, st.scale, st.soft_cap)  # [rows, C]
            mask = tile_mask(q_pos, blk * st.block_k + i * st.tile, kv_len, st, st.tile)
            state = online_softmax_step(scores, mask, v, *state)
        m_scr[...], l_scr[...], acc_scr[...] = state

    @pl.when(j == pl.num_programs(4) - 1)
    def _store():
        o_ref[...] = finalize(l_scr[...], acc_scr[...]).astype(o_ref.dtype)
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def _unpack_extra(extra, st: Statics):
    """Loaded (k_scale, v_scale, k_zero, v_zero) of one tile, None where absent."""
    it = iter(ref[...] for ref in extra)
    quant = st.kv_format is not None
    ks = next(it) if quant else None
    vs = next(it) if quant else None
    kz = next(it) if st.k_asym else None
    vz = next(it) if st.v_asym else None
    return ks, vs, kz, vz


def paged_mosaic(q, k_pages, v_pages, scales, page_table, kv_lens, q_lens, st: Statics, out_dtype,
                 interpret: bool):
    """pallas_call of the Mosaic kernel.

    q [B, K, R_pad, H] -> (o [S, B, K, R_pad, H], m [S, B, K, R_pad, 1], l [S, B, K, R_pad, 1]).
    """
    b, kh, r_pad, h = q.shape
    pp = page_table.shape[1]
    steps = -(-st.num_blocks // st.num_splits)
    per_page = max(st.page_size // st.block_k, 1)  # kv blocks per page (ps >= block_k)

    def tile_spec(x, i: int, tg: int):
        """BlockSpec of page tile i of a step for x [P, K, ps/tg, X] (tg = 1 for K/V data)."""
        if st.pages_per_block == 1:
            rows = max(st.block_k // tg, 1)
        else:
            rows = st.page_size // tg

        def index_map(bi, hd, rb, s, j, pt_ref, kv_lens_ref, q_lens_ref):
            blk, _ = _step_block(bi, rb, s, j, kv_lens_ref, q_lens_ref, st)
            if st.pages_per_block == 1:
                slot = lax.div(blk, per_page)
                first = lax.rem(blk, per_page) * st.block_k  # first token of the tile in its page
                row_block = lax.div(lax.div(first, tg), rows)
            else:
                slot, row_block = blk * st.pages_per_block + i, 0
            return pt_ref[bi * pp + slot], hd, row_block, 0

        return pl.BlockSpec((None, None, rows, x.shape[-1]), index_map)

    k_scale, v_scale, k_zero, v_zero = scales
    (ktg, _), (vtg, _) = st.k_groups, st.v_groups
    kv_inputs, kv_specs = [], []
    for i in range(st.pages_per_block):
        for x, tg in ((k_pages, 1), (v_pages, 1), (k_scale, ktg), (v_scale, vtg), (k_zero, ktg),
                      (v_zero, vtg)):
            if x is not None:
                kv_inputs.append(x)
                kv_specs.append(tile_spec(x, i, tg))

    row_map = lambda bi, hd, rb, s, j, *_: (s, bi, hd, rb, 0)  # noqa: E731
    part = (st.num_splits, b, kh, r_pad)
    kernel = functools.partial(paged_attention_kernel_tpu, st=st,
                               num_kv_inputs=len(kv_inputs))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kh, r_pad // st.block_rows, st.num_splits, steps),
            in_specs=[pl.BlockSpec((None, None, st.block_rows, h),
                                   lambda bi, hd, rb, s, j, *_: (bi, hd, rb, 0)),
                      *kv_specs],
            out_specs=[pl.BlockSpec((None, None, None, st.block_rows, h), row_map),
                       pl.BlockSpec((None, None, None, st.block_rows, 1), row_map),
                       pl.BlockSpec((None, None, None, st.block_rows, 1), row_map)],
            scratch_shapes=[pltpu.VMEM((st.block_rows, 1), jnp.float32),
                            pltpu.VMEM((st.block_rows, 1), jnp.float32),
                            pltpu.VMEM((st.block_rows, h), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((*part, h), out_dtype),
                   jax.ShapeDtypeStruct((*part, 1), jnp.float32),
                   jax.ShapeDtypeStruct((*part, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_attention_mosaic",
    )(page_table.reshape(-1), kv_lens, q_lens, q, *kv_inputs)
