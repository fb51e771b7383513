"""Building blocks of the Llama family: RMSNorm, RoPE, SwiGLU MLP, attention.

Legend: B batch, T query tokens, S cache slots, D model dim, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, F ffn dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import cpu_kernels
from jaxinfer.kv.cache import AttentionMeta, BitsPages, gather_pages, page_values, slice_slots
from jaxinfer.kv.kivi import KiviKeys
from jaxinfer.kv.quant import QuantPages
from jaxinfer.lora import LoraWeight
from jaxinfer.wquant import InputObserver, QuantWeight, quantized_matmul

ATTENTION_BACKENDS = ("auto", "xla", "pallas", "native")  # "auto": `resolve_backend`


def resolve_backend(backend: str, dtype=jnp.bfloat16) -> str:
    """"auto" as `LLM` resolves it for a model of this dtype: "native" for bfloat16 and float32 on
    CPU where jaxinfer's CPU kernels are available (`cpu_kernels`; calls they do not take run the
    "xla" path), "xla" otherwise."""
    if backend != "auto":
        return backend
    return "native" if cpu_kernels.chosen_by_default(dtype) else "xla"


@struct.dataclass
class TransposedWeight:
    """A dense projection w [Din, Dout] held as its transpose wt [Dout, Din] (row n holds output
    n's weights: Hugging Face's Linear layout). `matmul` contracts Din against wt's second axis.

    On CPU, XLA's bf16 dot streams the weights faster in this layout when x has one or two rows.
    Greedy decode of the 24.6M-parameter bench model, this layout over [Din, Dout], median of
    paired runs: bf16 batch 1 1.20x (1.14-1.29), batch 8 0.94x, 16 0.97x, 32 1.02x; float32
    batch 1 0.94x, batch 8 0.87x. So `model.runtime_layout` ("auto") uses it for bf16 on CPU
    only. `dense()` gives w back.

    lhs: multiply products of three or more rows as wt @ x^T (wt the left operand, then the small
    result transposed) instead of x @ wt^T. Inside a decode loop XLA:CPU copies every weight that
    is the right operand of such a product into [Din, Dout] order, once per call before the loop
    (loop-invariant, so hoisted): the whole model's bytes per call, 0.87 ms a step of the
    bench_decode model's bf16 128-token generation at batch 8. As the left operand it is read in
    place. Outside loops (an engine step) there is no copy and the usual form measured faster,
    so `model.loop_layout` sets lhs for the static and beam decode loops only.

    native: bf16 products of up to `cpu_kernels.MAX_ROWS` rows go to jaxinfer's own AVX512-BF16
    kernel (`cpu_kernels.bf16_matmul`; 2.3x XLA's dot at one row, 2.1x at eight), which reads wt
    as it is; lhs then matters only for the larger products left to XLA. tied: wt is the
    embedding itself, serving as the LM head (`model.runtime_layout` "native"); `model.dense_layout`
    drops it, as it drops a `TiedHead`."""
    wt: jax.Array  # [Dout, Din]
    lhs: bool = struct.field(pytree_node=False, default=False)
    native: bool = struct.field(pytree_node=False, default=False)
    tied: bool = struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.wt.shape[::-1]

    @property
    def dtype(self):
        return self.wt.dtype

    @property
    def nbytes(self) -> int:
        return self.wt.nbytes

    def dense(self) -> jax.Array:
        return self.wt.T


@struct.dataclass
class TiedHead:
    """A tied LM head held as its own copy w [D, V] of the embedding's transpose (the embedding
    stays [V, D] for the lookup). `dense_dot` contracts x with w like any [Din, Dout] projection.

    On CPU, XLA's float32 dot contracts against the [V, D] embedding ~1.6x slower than against a
    [D, V] copy once x has several rows (vocab 8192 x 512, weights out of cache: 8 rows 1.76 vs
    1.07 ms, 32 rows 2.63 vs 2.02 ms; one row: equal); greedy decode of that model, paired runs
    with and without the copy: 1.06x at batch 1, 1.03x at 8, 1.02x at 32. `model.runtime_layout`
    ("in_out" on CPU, float32) makes the copy, at the cost of the embedding's bytes once more;
    `model.dense_layout` drops it."""
    w: jax.Array  # [D, V]

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape

    @property
    def nbytes(self) -> int:  # wquant.weight_bytes
        return self.w.nbytes


@struct.dataclass
class PanelWeight:
    """A float32 projection w [Din, Dout] packed in panels of 32 outputs, [ceil(Dout / 32), Din, 32]
    (`cpu_kernels.pack_f32`), which jaxinfer's float32 CPU kernel (`cpu_kernels.f32_matmul`) streams
    at every row count. tied: a packed copy of a tied embedding serving as the LM head
    (`model.runtime_layout` "native"); `model.dense_layout` drops it, as it drops a `TiedHead`.

    The 25 projections of one decode step of bench_decode's model (98 MB), XLA's dot on [Din, Dout]
    over the kernel (`cpu_kernels_speed.md`, stop 35): 1 row 1.35x, 2 rows 1.89x, 9 rows 2.27x,
    32 rows 1.59x, 64 rows 1.36x, 128 rows 1.14x, 512 rows 1.03x. Each output sums its products in
    order, so a row's result depends neither on its batch-mates nor on how a prompt was chunked."""
    panels: jax.Array  # [ceil(Dout / 32), Din, 32]
    n: int = struct.field(pytree_node=False)  # Dout
    tied: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def pack(cls, w: jax.Array, tied: bool = False) -> PanelWeight:
        return cls(cpu_kernels.pack_f32(w), w.shape[1], tied)

    @property
    def shape(self) -> tuple[int, int]:
        return self.panels.shape[1], self.n

    @property
    def dtype(self):
        return self.panels.dtype

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes

    def dense(self) -> jax.Array:
        return cpu_kernels.unpack_f32(self.panels, self.n)


def matmul(x: jax.Array, w) -> jax.Array:
    """x [..., Din] @ w [Din, Dout] accumulated in float32, returned in x's dtype.

    The float32 accumulator is also the fast path on CPU: a bf16 x bf16 -> bf16 dot
    runs ~9x slower there than the same dot with a float32 result. w may also be a
    quantized matrix (`wquant.QuantWeight`), a `TransposedWeight`, a `lora.LoraWeight`, or, while GPTQ / AWQ
    calibrate, an observer that records x before multiplying by its dense weight.
    """
    if isinstance(w, QuantWeight):
        return quantized_matmul(x, w)
    if isinstance(w, LoraWeight):  # the base projection plus the rows' adapters
        return (matmul(x, w.base).astype(jnp.float32) + w.delta(x)).astype(x.dtype)
    if isinstance(w, InputObserver):
        w.observe(x)
        w = w.w
    return dense_dot(x, w).astype(x.dtype)


def dense_dot(x: jax.Array, w) -> jax.Array:
    """x [..., Din] times a dense w (a [Din, Dout] array, a `TransposedWeight`, a `TiedHead` or a
    `PanelWeight`), float32 result."""
    w_axis = 0
    if isinstance(w, PanelWeight):
        return cpu_kernels.f32_matmul(x.astype(jnp.float32), w.panels, w.n)
    if isinstance(w, TransposedWeight):
        if w.native and cpu_kernels.applies(x, w.wt):
            return cpu_kernels.bf16_matmul(x, w.wt)
        if w.lhs and x.size > 2 * x.shape[-1]:  # three or more rows: wt @ x^T (see TransposedWeight)
            out = jax.lax.dot_general(w.wt, x.reshape(-1, x.shape[-1]), (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)  # [Dout, rows]
            return out.T.reshape(*x.shape[:-1], w.wt.shape[0])
        w, w_axis = w.wt, 1
    elif isinstance(w, TiedHead):
        w = w.w

    def dot(x):
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w_axis,)), ((), ())), preferred_element_type=jnp.float32)
    return one_row_padded(dot, x)


def one_row_padded(dot, x: jax.Array) -> jax.Array:
    """dot(x) for x [..., Din]; on CPU a low-precision x of a single row runs as two rows.

    XLA:CPU sends a one-row bf16 dot to a matrix-vector path that runs ~3.5x slower than the
    two-row matrix-matrix kernel (12 bf16 [384, 1024] weights: 1.43 vs 0.39 ms; float32's
    matrix-vector path is the fast one, 0.24 ms). Batch-1 decode is all one-row dots, so a
    zero second row is added and dropped again. The rows are independent, so the result is
    the same dot's; it also puts one-token steps on the kernel that k+1-token verification
    uses.
    """
    if x.dtype == jnp.float32 or x.size != x.shape[-1]:
        return dot(x)

    def padded():
        two = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))
        out = dot(two)
        return out[:1].reshape(*x.shape[:-1], out.shape[-1])
    return jax.lax.platform_dependent(cpu=padded, default=lambda: dot(x))


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with a float32 result. XLA:CPU has no bf16 x bf16 -> f32 batched dot,
    so on CPU low-precision operands are upcast first; elsewhere they stay native."""
    native = lambda: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        return native()
    upcast = lambda: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))  # noqa: E731
    return jax.lax.platform_dependent(cpu=upcast, default=native)


def batched_qk_pv(spec: str, a: jax.Array, b: jax.Array, small_q: bool) -> jax.Array:
    """The two attention products with one batch dim x, float32 results:
    "xqh,xsh->xqs" (scores) and "xqs,xsh->xqh" (weighted values).

    small_q: decode with grouped queries (one token, G >= 2 query heads per kv head). XLA:CPU
    runs those products 2-5x slower as batched dots than as a fused multiply + reduce that
    reads the cache once (attention of the embedded target at 64 rows x 1,024 slots: 23 ms
    vs 4.2 ms). With a single query row (G = 1, MHA) the reduce is the slow one (50x), so
    the caller passes small_q only for G >= 2. Elsewhere, and on other platforms: dots.

    A single batch entry (x = 1: one row of an MQA model, as in a one-request decode step) also
    takes the dot: jax 0.10.2's XLA:CPU miscompiles the scores' reduce when b is a page gather
    fused into it and x = 1 (every score took key 0's value; in a sweep of 432 shapes, G 2-16,
    head_dim 16-128, pages of 4-16 slots, 48 failed, all with x = 1; tests/test_model.py keeps
    the case).
    """
    def reduce():
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        if spec == "xqh,xsh->xqs":
            return jnp.sum(a32[:, :, None, :] * b32[:, None, :, :], axis=-1)
        return jnp.sum(a32[:, :, :, None] * b32[:, None, :, :], axis=2)
    if not small_q or a.shape[0] == 1:
        return einsum_f32(spec, a, b)
    return jax.lax.platform_dependent(cpu=reduce, default=lambda: einsum_f32(spec, a, b))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, style: str = "llama") -> jax.Array:
    """RMSNorm computed in float32 and cast back, in each family's order (as transformers has
    it; config.NORM_STYLES): "llama" rounds the normalized x and then multiplies by the weight;
    "gemma" multiplies by (1 + weight) in float32 and rounds once; "olmo2" multiplies by the
    weight in float32 and rounds once."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if style == "gemma":
        return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    if style == "olmo2":
        return (x32 * weight.astype(jnp.float32)).astype(x.dtype)
    return weight * x32.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm (StarCoder2; Cohere's without a shift: bias None): mean and biased variance over
    the last dim, scale and shift, all in float32 and rounded once (as torch computes a bf16
    LayerNorm on CPU, and Cohere's LayerNorm spells out)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * weight.astype(jnp.float32)
    return (y if bias is None else y + bias.astype(jnp.float32)).astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float, style: str = "llama") -> jax.Array:
    """A model's input / final norm: `layer_norm` for styles "layernorm" and "cohere" (bias None), else
    `rms_norm` (bias None)."""
    if style in ("layernorm", "cohere"):
        return layer_norm(x, weight, bias, eps)
    return rms_norm(x, weight, eps, style)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, dtype, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for positions [B, T]: each [B, T, 1, H/2], times `scale` (YaRN's
    attention factor) in float32 before the cast, as transformers scales them.

    On CPU the tables are computed once per forward: XLA:CPU fuses the cosine and sine into
    every consumer, each layer's q and k rotation, and evaluates them there per head (12
    times per head in the 6-layer models: 0.8 of a 32-row decode step's 18.6 ms). It drops
    `optimization_barrier` before fusing, but never fuses a dot's operand, so the tables
    pass through a product with the identity (exact: every other term is a zero)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    both = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)  # [B, T, H]
    if scale != 1.0:
        both = both * jnp.float32(scale)

    def materialized():
        return jnp.dot(both, jnp.eye(both.shape[-1], dtype=jnp.float32), precision="highest")
    both = jax.lax.platform_dependent(cpu=materialized, default=lambda: both)[:, :, None, :].astype(dtype)
    return jnp.split(both, 2, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotate [B, T, heads, H] by position; HF's rotate-half (non-interleaved) convention, over the
    first 2 * cos.shape[-1] dims of each head (all of them but for partial rotary). interleaved
    (Cohere): dims 2i and 2i + 1 turn together by frequency i (GPT-J's convention).

    Computed in float32 and rounded to x's dtype once. For bf16, XLA:CPU otherwise rounds after
    every product and sum (a convert pair each), which made the rotation of k alone ~37 us a layer
    of a 32-row decode step; the single rounding is also the more accurate result."""
    rotary = 2 * cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Phi-4-mini): the first `rotary` dims turn, the rest pass through
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin, interleaved), x[..., rotary:]], axis=-1)
    x32, cos, sin = x.astype(jnp.float32), cos.astype(jnp.float32), sin.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        turned = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return turned.reshape(x.shape).astype(x.dtype)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def swiglu(gate_up: jax.Array) -> jax.Array:
    """silu(gate) * up for a fused [..., 2F] projection.

    Left in the activation dtype: computed in float32 and rounded once (as `apply_rope` is), bf16
    SwiGLU ran ~35 us a layer faster in a 32-row decode step, but XLA:CPU's fused float32 sigmoid
    then differed between one-token and four-token forwards of the same rows, which broke bf16
    speculative decoding's token identity (test_engine_eagle_in_bfloat16_is_lossless_under_swap)."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def gated_activation(gate_up: jax.Array, act: str) -> jax.Array:
    """act(gate) * up for a fused [..., 2F] projection: `swiglu` for "silu", GeGLU with the tanh
    approximation of GELU for "gelu_pytorch_tanh" (Gemma; transformers' gelu_pytorch_tanh)."""
    if act == "silu":
        return swiglu(gate_up)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return activation(gate, act) * up


def activation(x: jax.Array, act: str) -> jax.Array:
    """silu, GELU's tanh approximation ("gelu_pytorch_tanh") or exact GELU ("gelu")."""
    if act == "silu":
        return jax.nn.silu(x)
    if act in ("gelu_pytorch_tanh", "gelu"):
        return jax.nn.gelu(x, approximate=act == "gelu_pytorch_tanh")
    raise ValueError(f"activation {act!r} is not one of silu, gelu_pytorch_tanh, gelu")


def fold_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """Queries [B, T, N, H] -> [B*K, T*G, H]: one batch dim (B K) for the attention products
    (XLA:CPU runs a dot with a single batch dim ~3x faster than with batch dims (B, K))."""
    b, t, n, h = q.shape
    g = n // kv_heads
    return q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, t * g, h)


def unfold_heads(out: jax.Array, b: int, t: int, kv_heads: int) -> jax.Array:
    """The inverse of `fold_heads`: [B*K, T*G, H] -> [B, T, N, H]."""
    h = out.shape[-1]
    g = out.shape[1] // t
    return out.reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, kv_heads * g, h)


def visible_keys(meta: AttentionMeta, q_pos: jax.Array, k_pos: jax.Array, causal: bool = True,
                 sliding_window: int | None = None) -> jax.Array:
    """Which cache slots each query may attend to: keys below the row's length, not after the
    query (causal), within the sliding window. q_pos [B, T], k_pos [S] (the same slots for every
    row) or [B, S] -> [B, T or 1, S] bool."""
    k_pos = k_pos[None, None, :] if k_pos.ndim == 1 else k_pos[:, None, :]  # [1 or B, 1, S]
    mask = k_pos < meta.kv_lens[:, None, None]  # [B, 1, S]
    if causal:
        mask = mask & (k_pos <= q_pos[:, :, None])  # [B, T, S]
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos[:, :, None] - sliding_window)
    return mask


def cap_scores(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """Attention logit soft-capping (Gemma 2): cap * tanh(scores / cap); None leaves them."""
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                        meta: AttentionMeta, *, scale: float, causal: bool = True,
                        sliding_window: int | None = None,
                        soft_cap: float | None = None) -> jax.Array:
    """Plain-XLA attention of queries [B, T, N, H] against a (paged) cache.

    k_pages, v_pages: [P, K, ps, H] (or [B, K, S, H] when ``meta.contiguous``),
    already holding this call's new tokens. Query t of row b sits at position
    kv_lens[b] - q_lens[b] + t and sees keys at positions < kv_lens[b] (and
    <= its own position when causal). Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    k = gather_pages(k_pages, meta)  # [B, K, S, H]
    v = gather_pages(v_pages, meta)
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    qf = fold_heads(q, kv_heads)  # [BK, TG, H]
    small_q = t == 1 and g >= 2  # decode with grouped queries: G rows per kv head
    scores = batched_qk_pv("xqh,xsh->xqs", qf, k.reshape(b * kv_heads, s, h), small_q) * scale  # [BK, TG, S]
    scores = scores.reshape(b, kv_heads, t, g, s)
    scores = cap_scores(scores, soft_cap)
    mask = visible_keys(meta, meta.query_positions(t), jnp.arange(s, dtype=jnp.int32), causal, sliding_window)
    mask = jnp.broadcast_to(mask, (b, t, s))[:, None, :, None, :]  # [B, 1, T, 1, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    # Padding query rows can have no visible key; keep them finite (they are discarded).
    scores = jnp.where(jnp.any(mask, axis=-1, keepdims=True), scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * kv_heads, t * g, s)
    out = batched_qk_pv("xqs,xsh->xqh", probs, v.reshape(b * kv_heads, s, h), small_q)  # [BK, TG, H]
    return unfold_heads(out, b, t, kv_heads).astype(q.dtype)


def loop_chunk_pages(page_size: int, num_tokens: int) -> int:
    """Pages per iteration of `attention_paged_loop`: 64 cache slots for one-token rows (decode),
    256 for wider calls (prefill chunks, speculative verification). On CPU, 64-slot chunks of a
    decode step's gather stay in cache between the gather and its products."""
    return max(1, (64 if num_tokens == 1 else 256) // page_size)


def attention_paged_loop(q: jax.Array, k_pages, v_pages, meta: AttentionMeta, *, scale: float,
                         sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """Attention over a paged cache, a few pages at a time, as far as the longest row reaches.

    Same arguments and result as `attention_reference` (paged caches of float, bits or
    quantized pages; contiguous caches too, read in slot slices: see `contiguous_bits_loop`).
    A `lax.fori_loop` whose trip count is computed on device from ``max(kv_lens)`` gathers
    `loop_chunk_pages` pages of every row per iteration and folds them in with an online
    softmax (running max, running sum, rescaled accumulator). Two things follow: the work is
    set by the longest row actually in the batch, not by the page table's width, so callers may
    pass a table of a fixed width (the serving engine passes max_model_len's, and its compiled
    programs no longer depend on context length); and the gathered chunk is consumed while
    still in cache. It sums in a different order than the reference (agrees to ~1e-6 in
    float32).
    """
    b, t, n, h = q.shape
    kv_heads, ps = k_pages.shape[1], k_pages.shape[2]  # ps: page size, or S for a contiguous cache
    g = n // kv_heads
    if meta.contiguous:  # [B, K, S, H]: slices of 64 slots (or of S's largest divisor below 64)
        width = math.gcd(ps, 64)

        def read(pages, i):
            return slice_slots(pages, i * width, width)
    else:
        chunk = loop_chunk_pages(ps, t)
        width = chunk * ps  # cache slots per iteration
        pp = meta.page_table.shape[1]
        table = jnp.pad(meta.page_table, ((0, 0), (0, -pp % chunk)))

        def read(pages, i):
            pages_i = jax.lax.dynamic_slice_in_dim(table, i * chunk, chunk, axis=1)
            return gather_pages(pages, meta.replace(page_table=pages_i))
    qf = fold_heads(q, kv_heads)  # [BK, TG, H]
    small_q = t == 1 and g >= 2
    q_pos = meta.query_positions(t)  # [B, T]
    last = (jnp.max(meta.kv_lens) + width - 1) // width  # iterations that hold any row's keys
    first = 0
    if sliding_window is not None:  # chunks wholly before every row's window are skipped
        lowest = jnp.where(meta.q_lens > 0, q_pos[:, 0] - sliding_window + 1, jnp.iinfo(jnp.int32).max)
        first = jnp.minimum(jnp.maximum(jnp.min(lowest), 0) // width, last)

    def fold(i, carry):
        m, l, acc = carry  # running max [BK, TG], running sum [BK, TG], accumulator [BK, TG, H]
        k = read(k_pages, i).reshape(b * kv_heads, width, h)
        v = read(v_pages, i).reshape(b * kv_heads, width, h)
        s = cap_scores(batched_qk_pv("xqh,xsh->xqs", qf, k, small_q) * scale, soft_cap)  # [BK, TG, width]
        mask = visible_keys(meta, q_pos, i * width + jnp.arange(width, dtype=jnp.int32), True, sliding_window)
        mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, kv_heads, t, g, width))
        s = jnp.where(mask.reshape(b * kv_heads, t * g, width), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet stay at 0
        p = jnp.exp(s - base[..., None])
        alpha = jnp.exp(m - base)
        pv = batched_qk_pv("xqs,xsh->xqh", p.astype(v.dtype), v, small_q)
        return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    init = (jnp.full((b * kv_heads, t * g), -jnp.inf, jnp.float32),
            jnp.zeros((b * kv_heads, t * g), jnp.float32),
            jnp.zeros((b * kv_heads, t * g, h), jnp.float32))
    _, l, acc = jax.lax.fori_loop(first, last, fold, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding rows (nothing visible): zeros
    return unfold_heads(out, b, t, kv_heads).astype(q.dtype)


RAGGED_MAX_TOKENS = 16  # paged calls of up to this many tokens per row take `attention_paged_ragged` (0: none)
RAGGED_ITEM_SLOTS = 64  # cache slots per work item
RAGGED_ITEMS = 32  # work items per iteration (fewer when the batch is smaller)


def attention_paged_ragged(q: jax.Array, k_pages, v_pages, meta: AttentionMeta, *, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """Attention over a paged cache whose work follows each row's own length.

    Same arguments and result as `attention_reference`. Every row's cache is cut into work
    items of `RAGGED_ITEM_SLOTS` slots (a few pages), from its first visible slot to its
    length; the items of all rows form one list (row by row), and a `lax.fori_loop` takes
    `RAGGED_ITEMS` of them per iteration, as many iterations as the list needs. An item
    gathers its pages, scores its row's queries against them and keeps its own softmax
    statistics (max, sum, weighted values), which are folded into the row's running ones
    with segment operations (online softmax across items and iterations).

    `attention_paged_loop` instead steps every row through the longest row's chunks: with
    rows of mixed lengths (serving) much of its gathers and products are padding. One decode
    forward of the embedded target with rows of mixed lengths (`paged_decode_cost.py`): 1.10x
    to 1.25x faster than the loop at 8 / 24 / 48 rows, and at most as slow as a contiguous cache
    that holds only the longest row's slots; with equal lengths the loop takes 0.94x-1.01x
    its time. The work list is built on device from kv_lens, so the page table may be any
    width. Calls of up to `RAGGED_MAX_TOKENS` tokens per row take this path (decode and
    speculative verification); prefill chunks keep the loop.
    """
    b, t, n, h = q.shape
    kv_heads, ps = k_pages.shape[1], k_pages.shape[2]
    g = n // kv_heads
    tg = t * g
    chunk = max(1, RAGGED_ITEM_SLOTS // ps)  # pages per item
    width = chunk * ps
    pp = meta.page_table.shape[1]
    table = jnp.pad(meta.page_table, ((0, 0), (0, -pp % chunk)))
    r = min(b, RAGGED_ITEMS)
    q_pos = meta.query_positions(t)  # [B, T]
    first = jnp.zeros((b,), jnp.int32)  # each row's first item (chunk index)
    if sliding_window is not None:  # chunks wholly before the row's window are left out
        first = jnp.maximum(q_pos[:, 0] - sliding_window + 1, 0) // width
    last = (meta.kv_lens + width - 1) // width  # one past each row's last item
    n_items = jnp.where(meta.q_lens > 0, jnp.maximum(last - first, 0), 0)  # [B]
    ends = jnp.cumsum(n_items)
    starts = ends - n_items
    qf = fold_heads(q, kv_heads).reshape(b, kv_heads, tg, h)
    small_q = t == 1 and g >= 2
    segment = functools.partial(jax.ops.segment_sum, num_segments=b, indices_are_sorted=True)

    def fold(i, carry):
        m, l, acc = carry  # per row: running max [B, K, TG], running sum [B, K, TG], accumulator [B, K, TG, H]
        j = i * r + jnp.arange(r, dtype=jnp.int32)  # this iteration's items
        valid = j < ends[-1]
        row = jnp.minimum(jnp.sum(ends[None, :] <= j[:, None], axis=1, dtype=jnp.int32), b - 1)  # [R], sorted
        c = jnp.where(valid, first[row] + j - starts[row], 0)  # chunk index within the row
        pages = table[row[:, None], c[:, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]]  # [R, chunk]
        sub = AttentionMeta(page_table=pages, kv_lens=meta.kv_lens[row], q_lens=meta.q_lens[row])
        k = gather_pages(k_pages, sub).reshape(r * kv_heads, width, h)
        v = gather_pages(v_pages, sub).reshape(r * kv_heads, width, h)
        s = cap_scores(batched_qk_pv("xqh,xsh->xqs", qf[row].reshape(r * kv_heads, tg, h), k, small_q) * scale,
                       soft_cap)
        k_pos = c[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]  # [R, W]
        mask = visible_keys(sub, q_pos[row], k_pos, True, sliding_window) & valid[:, None, None]  # [R, T, W]
        mask = jnp.broadcast_to(mask[:, None, :, None, :], (r, kv_heads, t, g, width))
        s = jnp.where(mask.reshape(r * kv_heads, tg, width), s, -jnp.inf)
        m_i = jnp.max(s, axis=-1)  # the item's own statistics
        p = jnp.exp(s - jnp.where(jnp.isfinite(m_i), m_i, 0.0)[..., None])
        l_i = jnp.sum(p, axis=-1).reshape(r, kv_heads, tg)
        a_i = batched_qk_pv("xqs,xsh->xqh", p.astype(v.dtype), v, small_q).reshape(r, kv_heads, tg, h)
        m_i = m_i.reshape(r, kv_heads, tg)
        m_new = jnp.maximum(m, jax.ops.segment_max(m_i, row, num_segments=b, indices_are_sorted=True))
        base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet stay at 0
        w_i = jnp.where(jnp.isfinite(m_i), jnp.exp(m_i - base[row]), 0.0)  # item -> row rescaling
        alpha = jnp.exp(m - base)
        return (m_new, alpha * l + segment(l_i * w_i, row),
                alpha[..., None] * acc + segment(a_i * w_i[..., None], row))

    init = (jnp.full((b, kv_heads, tg), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, tg), jnp.float32),
            jnp.zeros((b, kv_heads, tg, h), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (ends[-1] + r - 1) // r, fold, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding rows (nothing visible): zeros
    return unfold_heads(out.reshape(b * kv_heads, tg, h), b, t, kv_heads).astype(q.dtype)


def attention_loops_pay() -> bool:
    """Whether the XLA path's paged attention loops (`attention_paged_ragged`, `attention_paged_loop`)
    pay: on CPU, where they were measured against `attention_reference`.
    On a GPU each iteration of a data-dependent `while_loop` costs several kernel launches and a
    copy of its predicate to the host; one gather with dense attention over a page table cut to
    the rows' lengths costs a few launches a layer. On an H200 the engine with the loops spent
    4.5 ms between tokens (mean ITL, workload (a) of bench_serving, bfloat16) where a whole decode
    step of generate_static, whose contiguous cache takes the reference, took ~0.35 ms. How much
    of that gap the loops were is inferred, not yet measured (README, end-to-end H200 figures)."""
    return jax.default_backend() == "cpu"


def paged_loop_applies(backend: str, k_pages) -> bool:
    """Whether `attention` over a paged cache runs `attention_paged_ragged` or `attention_paged_loop`,
    whose work stops at the rows' lengths whatever the page table's width (the serving engine then
    passes full-width tables). The Pallas kernel and KIVI keys read every slot of the table, and
    so does `attention_reference`, which the XLA path takes where the loops do not pay
    (`attention_loops_pay`: off CPU)."""
    return backend in ("xla", "native") and not isinstance(k_pages, KiviKeys) and attention_loops_pay()


def contiguous_bits_loop(q: jax.Array, k_pages, meta: AttentionMeta) -> bool:
    """Whether the XLA path runs a contiguous cache through `attention_paged_loop`: bf16 caches
    stored as bits (CPU) for steps of up to 16 tokens (decode, speculative verification), when
    the cache length is a multiple of 16. The loop widens 64-slot slices in cache and stops at the
    longest row; the reference widens and reads every slot. When it was written the reference
    was far slower (MHA decode at 32 rows x 256 slots: 15.5 vs 2.1 ms a layer). With jax 0.10.2
    the trade-off depends on how full the cache is. In the speculative loop's fixed cache (384
    slots, batch 1, bench_spec's prompts) the loop was 1.04-1.08x faster for plain decoding and
    1.05-1.22x for n-gram speculation (k = 8). In `generate_static`, whose cache doubles as rows
    grow and so stays at least half full, the reference took 0.91-0.98x the loop's step
    (embedded target, batch 1-32; bench_decode's MHA model 0.95x at batch 8, equal at 32), so
    `generate_static`'s decode steps turn the loop off (`meta.bits_loop=False`; rerun interleaved
    on bench_decode's model: 2.45 -> 2.28 / 3.45 -> 3.24 / 4.93 -> 4.66 / 8.12 -> 8.13 ms a step at
    batch 1 / 8 / 16 / 32). The speculative loop, beam search and prefill keep it.
    Float32 contiguous caches stay on the reference, which reads them in place and is faster."""
    return (meta.contiguous and meta.bits_loop and isinstance(k_pages, BitsPages) and q.shape[1] <= 16
            and k_pages.shape[2] % 16 == 0)


def attention(q, k_pages, v_pages, meta: AttentionMeta, *, scale: float, backend: str = "xla",
              sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """Dispatch to the chosen attention implementation (same arguments for all).

    "xla" runs a fresh prompt (`AttentionMeta.fresh`) over its own slots alone,
    `attention_paged_ragged` over paged caches (except KIVI keys) for calls of up to
    `RAGGED_MAX_TOKENS` tokens per row, `attention_paged_loop` for wider paged calls and for bf16
    bits contiguous caches in short steps (`contiguous_bits_loop`), `attention_reference` otherwise.
    "native" runs `cpu_kernels.attention` where it applies (queries against a cache of their
    dtype, bf16 or float32, paged or contiguous; decode, verification and prefill alike), the
    "xla" path otherwise."""
    if backend == "native":
        if cpu_kernels.attention_applies(q, k_pages, v_pages):
            return cpu_kernels.attention(q, k_pages, v_pages, meta, scale=scale, sliding_window=sliding_window,
                                         soft_cap=soft_cap)
        backend = "xla"
    if backend == "xla":
        if meta.fresh and not isinstance(k_pages, KiviKeys):
            # A prompt into an empty contiguous cache: its own T slots hold every key it may see,
            # so the rest of a cache sized for prompt + output is left unread (embedded target,
            # float32: 192 tokens into 384 slots 1.08x faster, 512 into 1024 1.54x).
            t = q.shape[1]
            return attention_reference(q, slice_slots(k_pages, 0, t), slice_slots(v_pages, 0, t), meta,
                                       scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
        paged = not meta.contiguous and paged_loop_applies(backend, k_pages)
        if paged and q.shape[1] <= RAGGED_MAX_TOKENS:
            return attention_paged_ragged(q, k_pages, v_pages, meta, scale=scale, sliding_window=sliding_window,
                                          soft_cap=soft_cap)
        if paged or contiguous_bits_loop(q, k_pages, meta):
            return attention_paged_loop(q, k_pages, v_pages, meta, scale=scale, sliding_window=sliding_window,
                                        soft_cap=soft_cap)
        return attention_reference(q, k_pages, v_pages, meta, scale=scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == "pallas":
        from jaxinfer import kernels_bridge  # imported lazily: kernels are optional
        if isinstance(k_pages, KiviKeys):
            raise ValueError("kv_cache_dtype='int4_kivi' runs on attention_backend='xla' (the kernel does "
                             "not read the full-precision residual)")
        if isinstance(k_pages, QuantPages):  # dequantized inside the kernel
            (k_data, k_scale, k_zero), (v_data, v_scale, v_zero) = k_pages.values(), v_pages.values()
            return kernels_bridge.paged_attention(
                q, k_data, v_data, meta, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                k_scale=k_scale, v_scale=v_scale, k_zero=k_zero, v_zero=v_zero,
                kv_format=k_pages.spec.fmt,
                channel_group=k_pages.spec.channel_group, tensor_scale=k_pages.tensor_scale)
        return kernels_bridge.paged_attention(q, page_values(k_pages), page_values(v_pages), meta, scale=scale,
                                              sliding_window=sliding_window, soft_cap=soft_cap)
    raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
