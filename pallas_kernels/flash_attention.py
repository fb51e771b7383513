"""Flash attention for prefill: Pallas kernels (Triton for GPU, Mosaic for TPU) and a jnp reference.

Legend: B batch, T query tokens, S key tokens, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, R query rows of one tile.

FlashAttention (Dao et al. 2022, algorithm 1; the FlashAttention-2 loop order):
a program owns a tile of queries and streams K/V tiles through on-chip memory,
keeping a running max m, a running normalizer l and an unnormalized output acc;
each new tile rescales the old state by exp(m_old - m_new), so the S x T score
matrix never exists in HBM. The output is divided by l once, at the end.

GQA/MQA natively: query head n reads kv head n // G through the BlockSpec index
map; K and V are never repeated in memory. Rows of different lengths in one batch
come from ``kv_lens [B]``: key s of row b is visible iff s < kv_lens[b] (and s <= t
when causal; causal is top-left aligned, query t at position t, as in
``jax.nn.dot_product_attention``). Query rows t >= kv_lens[b] are padding: their
output is finite and meaningless.

Two lowerings of the same algorithm:
  * Triton (GPU): grid (T / block_q, B, N); the K/V loop is a ``fori_loop`` inside
    the program that stops at the causal diagonal and at kv_lens[b].
  * Mosaic (TPU): grid (B, N, T / block_q, S / block_k); the K/V loop is the last
    ("arbitrary") grid axis with m, l, acc in VMEM scratch. kv_lens are scalar-
    prefetched so the K/V index map clamps to the last useful block: steps past the
    diagonal re-use the resident block (no DMA) and skip the compute.
On CPU both run in interpret mode (``interpret=True``), for correctness only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

BACKENDS = ("triton", "mosaic")
NATIVE_PLATFORM = {"triton": "gpu", "mosaic": "tpu"}  # where each variant compiles; elsewhere: interpret
# A large finite negative logit: fully masked tiles stay finite (exp underflows to 0).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: block_q query rows per program, block_k keys per inner step.

    num_warps / num_stages are Triton launch parameters (ignored by Mosaic).
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend: str, head_dim: int = 128) -> "BlockSizes":
        if backend == "triton":  # H100: 128 x 64 tiles, 8 warps for H = 128 (Triton tutorial defaults)
            return cls(block_q=128, block_k=64, num_warps=8 if head_dim > 64 else 4, num_stages=3)
        if backend == "mosaic":  # TPU: large tiles amortize the ~0.35 us per grid step
            return cls(block_q=256, block_k=512)
        return cls()


# ------------------------------------------------------------------ shared tile math

def resolve_backend(backend: str, interpret: bool | None) -> tuple[str, bool]:
    """('auto' | 'triton' | 'mosaic', interpret or None) -> (kernel variant, interpret).

    'auto' picks Triton on GPU, Mosaic on TPU, and the Triton variant in interpret
    mode on CPU: its in-kernel K/V loop interprets faster than a grid axis, and the
    paged kernel's whole-pool blocks are read in place, where the interpreter copies
    every BlockSpec'd page tile input of the Mosaic variant through its loop carry.
    interpret=None compiles a variant on its own platform (Triton on a GPU, Mosaic on a
    TPU) and interprets it anywhere else (Mosaic on a GPU, say).
    """
    platform = jax.default_backend()
    if backend == "auto":
        backend = "mosaic" if platform == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be 'auto' or one of {BACKENDS}")
    if interpret is None:
        interpret = platform != NATIVE_PLATFORM[backend]
    return backend, bool(interpret)


def div_const(x: jax.Array, d: int) -> jax.Array:
    """x // d for a non-negative int32 vector and a static d, with ops every lowering has.

    Powers of two shift; otherwise floor((x + 0.5) / d) in float32, exact for
    x < 2**20 (the error of one f32 multiply is far below the 0.5 / d margin).
    """
    if d == 1:
        return x
    if d & (d - 1) == 0:
        return x >> int(math.log2(d))
    return jnp.floor((x.astype(jnp.float32) + 0.5) * (1.0 / d)).astype(jnp.int32)


def dot_precision(dtype) -> lax.Precision | None:
    """float32 operands multiply in full float32 (IEEE); the default would let Triton and XLA:GPU
    use TF32 (10-bit mantissa, errors near 1e-3). bf16 / f16 operands keep the native rate."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def attention_scores(q: jax.Array, k: jax.Array, scale: float, soft_cap: float | None) -> jax.Array:
    """q [R, H] . k [C, H] -> float32 logits [R, C], scaled and optionally soft-capped (Gemma 2),
    in log2 units (times log2 e, folded into the scale) for the ``exp2`` softmax steps."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=dot_precision(q.dtype))
    if soft_cap is None:
        return s * (scale * LOG2E)
    return (soft_cap * LOG2E) * jnp.tanh(s * (scale / soft_cap))


def online_softmax_step(s, mask, v, m_prev, l_prev, acc_prev):
    """One K/V tile of FlashAttention algorithm 1 (lines 8-12), FlashAttention-2 form.

    s [R, C] f32 logits in log2 units (`attention_scores`), mask [R, C] bool or None (every key
    visible to every row: no selects, as for the tiles left of a causal diagonal), v [C, H];
    state m (log2 units), l [R, 1] f32 and acc [R, H] f32 (unnormalized). Masked entries get
    probability exactly 0, so a row that has seen no visible key keeps l = 0 and acc = 0 (finite).
    Base 2 because on GPUs Triton lowers a float32 exp to libdevice's accurate expf (several
    instructions) and exp2 to one ex2.approx, and the exponentials bound a flash kernel's
    throughput next to the matrix units.
    """
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [R, 1]
    alpha = jnp.exp2(m_prev - m_new)  # rescales the old state
    p = jnp.exp2(s - m_new)  # [R, C]
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=dot_precision(v.dtype))  # [R, H]
    return m_new, l_new, alpha * acc_prev + pv


def init_state(rows: int, head_dim: int):
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def finalize(l: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l, with rows that saw no key (l = 0) returning 0."""
    return acc / jnp.where(l > 0, l, 1.0)


def _num_kv_blocks(kv_len, q_block, *, block_q: int, block_k: int, causal: bool):
    """Key blocks a query tile needs: up to the causal diagonal and kv_len."""
    hi = kv_len
    if causal:
        hi = jnp.minimum(hi, (q_block + 1) * block_q)
    return lax.div(hi + block_k - 1, block_k)


def _num_full_kv_blocks(kv_len, q_block, *, block_q: int, block_k: int, causal: bool):
    """Leading key blocks that every row of the query tile sees whole (no mask needed): keys
    below kv_len and, when causal, at or before the tile's first query."""
    hi = kv_len
    if causal:
        hi = jnp.minimum(hi, q_block * block_q + 1)
    return lax.div(hi, block_k)


def _tile_mask(q_block, k_block, kv_len, *, block_q: int, block_k: int, causal: bool):
    q_pos = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = k_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos)
    return mask


# ------------------------------------------------------------------ Triton (GPU)

def _query_tile(causal: bool):
    """The query tile of this program. Causal tiles run longest-first (grid axis 0 reversed): the
    programs that launch last, and set the kernel's tail, are the short ones near the top."""
    if not causal:
        return pl.program_id(0)
    return pl.num_programs(0) - 1 - pl.program_id(0)


def flash_attention_kernel(kv_lens_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float,
                           soft_cap: float | None, causal: bool, block_k: int):
    """Triton program: one query tile of one (row b, head n) against all its keys.

    kv_lens_ref: [B] int32
    q_ref:       [block_q, H]   queries t in [i * block_q, (i + 1) * block_q)
    k_ref:       [S_pad, H]     kv head n // G of row b
    v_ref:       [S_pad, H]
    o_ref:       [block_q, H]
    """
    i, b = _query_tile(causal), pl.program_id(1)
    block_q, head_dim = q_ref.shape
    kv_len = kv_lens_ref[b]
    q = q_ref[...]

    def body(j, state, masked: bool):  # masked: the diagonal and the kv_len edge
        k = k_ref[pl.ds(j * block_k, block_k), :]  # [block_k, H]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = attention_scores(q, k, scale, soft_cap)  # [block_q, block_k]
        mask = _tile_mask(i, j, kv_len, block_q=block_q, block_k=block_k, causal=causal) if masked else None
        return online_softmax_step(s, mask, v, *state)

    sizes = {"block_q": block_q, "block_k": block_k, "causal": causal}
    n = _num_kv_blocks(kv_len, i, **sizes)
    n_full = jnp.minimum(_num_full_kv_blocks(kv_len, i, **sizes), n)
    # blocks left of the diagonal and inside kv_len need no mask
    state = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init_state(block_q, head_dim))
    _, l, acc = lax.fori_loop(n_full, n, functools.partial(body, masked=True), state)
    o_ref[...] = finalize(l, acc).astype(o_ref.dtype)


def _flash_triton(q, k, v, kv_lens, *, scale, soft_cap, causal, bs: BlockSizes, interpret):
    from jax.experimental.pallas import triton as pltriton

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    group = n // kh
    kernel = functools.partial(flash_attention_kernel, scale=scale, soft_cap=soft_cap, causal=causal,
                               block_k=bs.block_k)
    num_q = t // bs.block_q

    def q_map(i, j, hd):  # the same tile order as _query_tile
        return j, (num_q - 1 - i) if causal else i, hd, 0

    return pl.pallas_call(
        kernel,
        grid=(num_q, b, n),
        in_specs=[
            pl.BlockSpec((b,), lambda i, j, hd: (0,)),  # kv_lens
            pl.BlockSpec((None, bs.block_q, None, h), q_map),  # q
            pl.BlockSpec((None, s, None, h), lambda i, j, hd: (j, 0, lax.div(hd, group), 0)),  # k
            pl.BlockSpec((None, s, None, h), lambda i, j, hd: (j, 0, lax.div(hd, group), 0)),  # v
        ],
        out_specs=pl.BlockSpec((None, bs.block_q, None, h), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="flash_attention_triton",
    )(kv_lens, q, k, v)


# ------------------------------------------------------------------ Mosaic (TPU)

def flash_attention_kernel_tpu(kv_lens_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *,
                               scale: float, soft_cap: float | None, causal: bool):
    """Mosaic program step: query tile i of (row b, head n) against key tile j (last grid axis).

    kv_lens_ref: [B] int32 in SMEM (scalar prefetch)
    q_ref:       [block_q, H]
    k_ref:       [block_k, H]   key tile j (clamped to the last useful tile)
    v_ref:       [block_k, H]
    o_ref:       [block_q, H]   written at the last step
    m_scr, l_scr: [block_q, 1] f32 VMEM;  acc_scr: [block_q, H] f32 VMEM
    """
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    kv_len = kv_lens_ref[b]

    @pl.when(j == 0)
    def _init():
        m0, l0, acc0 = init_state(block_q, acc_scr.shape[1])
        m_scr[...], l_scr[...], acc_scr[...] = m0, l0, acc0

    @pl.when(j < _num_kv_blocks(kv_len, i, block_q=block_q, block_k=block_k, causal=causal))
    def _step():
        s = attention_scores(q_ref[...], k_ref[...], scale, soft_cap)
        mask = _tile_mask(i, j, kv_len, block_q=block_q, block_k=block_k, causal=causal)
        m, l, acc = online_softmax_step(s, mask, v_ref[...], m_scr[...], l_scr[...], acc_scr[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        o_ref[...] = finalize(l_scr[...], acc_scr[...]).astype(o_ref.dtype)


def _flash_mosaic(q, k, v, kv_lens, *, scale, soft_cap, causal, bs: BlockSizes, interpret):
    from jax.experimental.pallas import tpu as pltpu

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    group = n // kh
    # Mosaic tiles the last two dims of a block, so heads go before tokens: [B, N, T, H].
    qt, kt, vt = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def kv_map(bi, hd, i, j, kv_lens_ref):
        last = _num_kv_blocks(kv_lens_ref[bi], i, block_q=bs.block_q, block_k=bs.block_k,
                              causal=causal) - 1
        return bi, lax.div(hd, group), jnp.maximum(jnp.minimum(j, last), 0), 0

    q_spec = pl.BlockSpec((None, None, bs.block_q, h), lambda bi, hd, i, j, _: (bi, hd, i, 0))
    kernel = functools.partial(flash_attention_kernel_tpu, scale=scale, soft_cap=soft_cap, causal=causal)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, n, t // bs.block_q, s // bs.block_k),
            in_specs=[q_spec, pl.BlockSpec((None, None, bs.block_k, h), kv_map),
                      pl.BlockSpec((None, None, bs.block_k, h), kv_map)],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bs.block_q, 1), jnp.float32),
                            pltpu.VMEM((bs.block_q, 1), jnp.float32),
                            pltpu.VMEM((bs.block_q, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_mosaic",
    )(kv_lens, qt, kt, vt)
    return out.transpose(0, 2, 1, 3)


# ------------------------------------------------------------------ wrapper

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_inputs(q, k, v, kv_lens, bs: BlockSizes, backend: str, soft_cap):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] and [B, S, K, H]; got {q.shape=}, {k.shape=}, "
                         f"{v.shape=}")
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=} and {v.shape=}")
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k's batch and head_dim must match q's: {k.shape=} vs {q.shape=}")
    num_kv_heads = k.shape[2]
    if n % num_kv_heads:
        raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={num_kv_heads}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32, bfloat16 or float16")
    if kv_lens is not None and (kv_lens.shape != (b,) or kv_lens.dtype != jnp.int32):
        raise ValueError(f"kv_lens must be int32 [B={b}]; got {kv_lens.shape=} {kv_lens.dtype=}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap} must be positive or None")
    for name in ("block_q", "block_k"):
        val = getattr(bs, name)
        if val < 1:
            raise ValueError(f"{name}={val} must be positive")
        if backend == "triton" and (val < 16 or val & (val - 1)):
            raise ValueError(f"{name}={val} must be a power of two >= 16 for Triton")
        if backend == "mosaic" and val % 8:
            raise ValueError(f"{name}={val} must be a multiple of 8 for Mosaic")
    if backend == "triton" and (h < 16 or h & (h - 1)):
        raise ValueError(f"head_dim={h} must be a power of two >= 16 for Triton")


@functools.partial(jax.jit, static_argnames=("scale", "causal", "soft_cap", "block_sizes", "backend",
                                             "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lens: jax.Array | None = None, *,
                    scale: float | None = None, causal: bool = True, soft_cap: float | None = None,
                    block_sizes: BlockSizes | None = None, backend: str = "auto",
                    interpret: bool | None = None) -> jax.Array:
    """Multi-head attention of q [B, T, N, H] over k, v [B, S, K, H] (N a multiple of K).

    kv_lens [B] int32 (optional): keys s >= kv_lens[b] are masked. scale defaults to
    H**-0.5. backend 'auto' | 'triton' | 'mosaic'; interpret=None means interpret mode
    exactly when running on CPU. T and S that are not multiples of the (clamped)
    blocks are padded here (a copy of q, k, v): pass multiples for speed.
    Returns [B, T, N, H] in q's dtype.
    """
    backend, interpret = resolve_backend(backend, interpret)
    bs = block_sizes or BlockSizes.default(backend, q.shape[-1])
    _check_inputs(q, k, v, kv_lens, bs, backend, soft_cap)
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = float(h ** -0.5 if scale is None else scale)
    # Clamp blocks to the (16-aligned) problem so tiny inputs are not padded to a full block.
    bs = dataclasses.replace(bs, block_q=min(bs.block_q, _round_up(t, 16)),
                             block_k=min(bs.block_k, _round_up(s, 16)))
    kv_lens = jnp.full((b,), s, jnp.int32) if kv_lens is None else jnp.minimum(kv_lens, s)
    t_pad, s_pad = _round_up(t, bs.block_q), _round_up(s, bs.block_k)
    if t_pad != t:
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    if s_pad != s:
        k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    impl = _flash_triton if backend == "triton" else _flash_mosaic
    out = impl(q, k, v, kv_lens, scale=scale, soft_cap=soft_cap, causal=causal, bs=bs, interpret=interpret)
    return out[:, :t]


@functools.partial(jax.jit, static_argnames=("scale", "causal", "soft_cap"))
def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, kv_lens: jax.Array | None = None,
                              *, scale: float | None = None, causal: bool = True,
                              soft_cap: float | None = None) -> jax.Array:
    """Plain-jnp attention with the kernel's semantics, in float32. Returns [B, T, N, H] in q's dtype."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * scale  # [B, K, G, T, S]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    k_pos = jnp.arange(s)
    lens = jnp.full((b,), s) if kv_lens is None else kv_lens
    mask = jnp.broadcast_to(k_pos[None, None, :] < lens[:, None, None], (b, t, s))  # [B, T, S]
    if causal:
        mask = mask & (k_pos[None, None, :] <= jnp.arange(t)[None, :, None])
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    logits = jnp.where(jnp.any(mask, -1)[:, None, None, :, None], logits, 0.0)  # padding rows: finite
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return out.reshape(b, t, n, h).astype(q.dtype)
