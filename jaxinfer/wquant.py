"""Quantization of the linear layers (weight-only, and W8A8): formats, RTN / GPTQ / AWQ, the products.

Legend: K input features, N output features, g input features per scale group.

A quantized matrix keeps Hugging Face's [N, K] order (a row per output feature) with its
codes along K, in the codecs of pallas_kernels/kv_formats.py (output features play the
token axis there, input features the channels):

  format     data                              scale [N, K/g]        g by default
  int8       int8 [N, K]                       float32               K (per output channel)
  int4       uint8 [N, K/2], nibbles [-8, 7]   float32               128
  fp8_e4m3   float8_e4m3fn [N, K]              float32               K
  nvfp4      uint8 [N, K/2], e2m1 nibbles      float8_e4m3fn         16, with a float32 tensor scale
  mxfp4      uint8 [N, K/2], e2m1 nibbles      uint8 exponents e8m0  32 (OCP microscaling: 2^(e - 127))
  w8a8       int8 [N, K]                       float32               K; the activations are quantized
                                                                       too, per row, to int8 at run time
  w8a8_fp8   float8_e4m3fn [N, K]              float32               K; the activations too, per row,
                                                                       to float8_e4m3fn

An integer matrix may carry a zero point (asymmetric quantization, as pre-quantized checkpoints
store it, `jaxinfer.hf_quant`): `zero` [N, K/g] float32 is added after scaling, value = q * s + z,
and int4 nibbles are then unsigned ([0, 15]), as in the KV codec's asymmetric int4. The nvfp4
tensor scale is a scalar, or one per output feature [N, 1] when a fused projection's parts were
quantized with different ones. A GPTQ checkpoint quantized in activation order (desc_act) groups
input features that are not adjacent; its columns are stored sorted by group, with `input_perm`
saying which feature of x each stored column takes (x is permuted before the product).

The attention and MLP projections of the decoder layers are quantized (wqkv, wo, w_gate_up,
w_down), and a mixture-of-experts layer's routed experts (experts_gate_up, experts_down: a stacked
QuantWeight, every array with a leading expert axis, each expert with its own scales; the router
stays dense, as in llm-compressor's and AutoAWQ's MoE checkpoints); the LM head only when
`WeightQuantConfig.lm_head` names a format (round to nearest; with tied embeddings the head becomes
a quantized copy and the embedding stays dense for the lookup); the embedding and the norms stay in
the model's dtype, as in AWQ and GPTQ checkpoints.
`WeightQuantConfig.skip` keeps more modules dense and `overrides` gives modules another format
(hybrid policies: e.g. int4 everywhere but int8 for w_down, or the first layer dense).

Methods:
  rtn   round to nearest, each group scaled by its absmax;
  gptq  Frantar et al. (2022): quantize the columns (input features) one at a time and push
        each column's rounding error onto the columns not yet quantized, weighted by the
        inverse Hessian of the layer's reconstruction loss, H = 2 X^T X over calibration
        activations X. Layers are calibrated in order, each on the activations of the layers
        before it already quantized. Integer formats (int8, int4, w8a8).
  awq   Lin et al. (2023): scale each input channel by its mean activation magnitude to a
        searched power before rounding (salient channels get finer steps) and divide the
        inputs by the same scale at run time, then (integer formats) search each group's
        clipping range; calibrated in the same order as GPTQ. Any format (for w8a8 the
        searches score the weight rounding only).

W8A8 multiplies int8 codes by int8 codes (`w8a8_matmul`). W8A8-FP8 rounds each activation row to
float8_e4m3fn with its own scale and multiplies the float8 values, exactly representable, in float32
(what an FP8 GEMM with float32 accumulation computes; XLA:CPU has no FP8 product). The other formats
are weight-only:
their weights are dequantized to float32 and multiplied in float32 whatever the activation
dtype, so a one-token step and a many-token step compute the same function (the
speculative verification and the engine rely on that). On CPU, int8 products of a few rows
(batch-1 decode, speculative verification) read the codes themselves: XLA fuses the
dequantization into its matrix-vector loop, which is where weight-only quantization pays on a
memory-bound step (`quantized_matmul`). Wider products dequantize the matrix first.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.kv.cache import AttentionMeta
from pallas_kernels import kv_formats as kvf

FORMATS = ("int8", "int4", "fp8_e4m3", "nvfp4", "mxfp4", "w8a8", "w8a8_fp8")
ACT_FORMATS = ("w8a8", "w8a8_fp8")  # formats that quantize the activations too
# formats stored in another format's codec (else their own name); mxfp4 keeps nvfp4's e2m1 nibbles
CODEC = {"w8a8": "int8", "w8a8_fp8": "fp8_e4m3", "mxfp4": "nvfp4"}
MXFP4_GROUP = 32
FIXED_GROUP = {"nvfp4": kvf.NVFP4_GROUP, "mxfp4": MXFP4_GROUP}  # block sizes the formats define
METHODS = ("rtn", "gptq", "awq")
LOADED_METHODS = ("compressed-tensors",)  # read from a checkpoint (hf_quant); GPTQ / AWQ ones carry METHODS' names
DEFAULT_GROUP = {"int8": None, "int4": 128, "fp8_e4m3": None, "w8a8": None, "w8a8_fp8": None, **FIXED_GROUP}
GPTQ_FORMATS = ("int8", "int4", "w8a8")
AWQ_ROWS = 2048  # calibration rows kept per projection for AWQ's scale search
MODULES = ("wqkv", "wo", "w_gate_up", "w_down")  # LayerWeights fields that are linear maps
EXPERT_MODULES = ("experts_gate_up", "experts_down")  # a MoE layer's routed experts, stacked [E, K, N]
QUANT_MODULES = MODULES + EXPERT_MODULES  # what quantization may replace, in the order a layer applies them


@struct.dataclass
class QuantWeight:
    """A quantized [K, N] weight (stored [N, K], see the module docstring); `matmul` takes it
    wherever it takes a dense matrix."""

    data: jax.Array  # [N, K] or [N, K/2] packed
    scale: jax.Array  # [N, K/g]
    tensor_scale: jax.Array | None = None  # nvfp4: f32 scalar, or [N, 1]
    input_scale: jax.Array | None = None  # AWQ: [K] f32, multiplies x before the product
    zero: jax.Array | None = None  # asymmetric integer formats: [N, K/g] f32, added after scaling
    input_perm: jax.Array | None = None  # [K] int32: stored input feature j is x's feature input_perm[j]
    fmt: str = struct.field(pytree_node=False, default="int8")

    @property
    def shape(self) -> tuple[int, int]:
        """The dense matrix's shape, [K, N] (4-bit formats hold two input features per byte); of
        one expert for a stacked one."""
        return self.data.shape[-1] * (2 if CODEC.get(self.fmt, self.fmt) in kvf.PACKED else 1), self.data.shape[-2]

    @property
    def group(self) -> int:
        """Input features per scale."""
        return self.shape[0] // self.scale.shape[-1]

    @property
    def stacked(self) -> bool:
        """Whether this holds a MoE layer's experts, each array with a leading expert axis."""
        return self.data.ndim == 3

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def scale_values(self) -> jax.Array:
        """float32 [N, K/g] scales (mxfp4 stores e8m0 exponents: 2^(e - 127), built as the float32
        whose exponent field is e, a shift instead of an exp2 that XLA would fuse into every element;
        e = 0 gives 0 rather than 2^-127, which only an all-zero block has)."""
        if self.fmt == "mxfp4":
            return jax.lax.bitcast_convert_type(self.scale.astype(jnp.int32) << 23, jnp.float32)
        return self.scale.astype(jnp.float32)

    def dequantize(self) -> jax.Array:
        """float32 [N, K] ([E, N, K] stacked)."""
        if self.stacked:
            return jax.vmap(QuantWeight.dequantize)(self)
        vals = kvf.decode_values(self.data, CODEC.get(self.fmt, self.fmt), asymmetric=self.zero is not None)
        n, k = vals.shape
        groups = vals.reshape(n, k // self.group, self.group) * self.scale_values()[:, :, None]
        if self.zero is not None:
            groups = groups + self.zero[:, :, None]
        out = groups.reshape(n, k)
        return out * self.tensor_scale if self.tensor_scale is not None else out

    def dense(self, dtype=jnp.float32) -> jax.Array:
        """The [K, N] matrix it stands for (AWQ's input scale folded in, input features in x's order;
        for w8a8 the weights only, without the rounding of the activations; [E, K, N] stacked)."""
        if self.stacked:
            return jax.vmap(lambda q: q.dense(dtype))(self)
        w = self.dequantize().T
        if self.input_scale is not None:
            w = w * self.input_scale[:, None]
        if self.input_perm is not None:
            w = w[jnp.argsort(self.input_perm)]
        return w.astype(dtype)


# Products of up to this many rows tie the codes to x and multiply row by row (see
# `quantized_matmul`); measured per format on the embedded target's projections, a decode
# step in a fori_loop on 2 CPU cores (ms, dense float32 2.1-2.7):
#   int8      1 row: tied 0.46, untied 3.5;  2 rows: tied row by row 0.76, untied 3.5;  8 rows: 3.05 vs 4.2
#   int4      1 row: tied 2.4, untied 4.9;   4 rows: untied 4.5, tied 6.9
#   fp8_e4m3  1 row: untied 1.8, tied 2.6;   nvfp4  1 row: untied 1.8, tied 8.2
# Untied products inside a loop run on float32 matrices that XLA dequantizes once, before the
# loop (the compiled while carries them): dense speed, dense-size copies while the loop runs.
# int4 stays tied at one row so that batch-1 decode reads its codes (0.92x dense in the static
# loop; untied it measured 1.22x, by multiplying such copies).
TIED_ROWS = {"int8": 8, "int4": 1, "fp8_e4m3": 0, "nvfp4": 0, "mxfp4": 0, "w8a8": 0, "w8a8_fp8": 0}


def quantized_matmul(x: jax.Array, w: QuantWeight, tied_rows: dict[str, int] | None = None) -> jax.Array:
    """x [..., K] @ w -> [..., N] in x's dtype, computed in float32 (see the module docstring).
    tied_rows: the largest product per format that ties the codes to x (default TIED_ROWS).

    Left alone inside a decode loop, XLA either hoists the loop-invariant dequantization out of
    the loop and multiplies by a materialized float32 matrix, or fuses the decode into a slow
    general product (mxfp4, and nvfp4 without its tensor scale: 0.33 vs 0.03 ms for a [384, 2048]
    product); an optimization barrier on the dequantized matrix rules out the second. Up to
    TIED_ROWS[fmt] rows, the codes are tied to x with an optimization barrier instead, which
    keeps the dequantization in the step, and each row is its own matrix-vector
    product: XLA:CPU then fuses the int8 dequantization into the product and reads the codes
    (int8 at batch 1: 0.46 vs 2.4 ms for the dense step's projections). The 4-bit formats
    interleave their nibbles back into [N, K], which XLA:CPU does not fuse so (two products over
    the nibbles, planar layouts and shift-only decodes measured no better, 3.8-4.7 ms): int4
    and nvfp4 save memory, not time, on this backend."""
    k, n = w.shape
    x32 = x.astype(jnp.float32).reshape(-1, k)
    if w.input_perm is not None:  # act-order checkpoints: x's features in the stored order
        x32 = jnp.take(x32, w.input_perm, axis=1)
    if w.input_scale is not None:
        x32 = x32 * w.input_scale
    rows = x32.shape[0]
    if w.fmt == "w8a8":
        out = w8a8_matmul(x32, w)
    elif w.fmt == "w8a8_fp8":
        xq, xs, _ = kvf.quantize(x32, "fp8_e4m3")  # one scale per row
        out = jnp.dot(xq.astype(jnp.float32) * xs, w.dequantize().T)
    elif rows <= (TIED_ROWS if tied_rows is None else tied_rows)[w.fmt]:
        data, x32 = jax.lax.optimization_barrier((w.data, x32))
        wt = w.replace(data=data).dequantize().T
        out = jnp.concatenate([jnp.dot(x32[i:i + 1], wt) for i in range(rows)]) if rows > 1 else jnp.dot(x32, wt)
    else:  # the barrier keeps XLA from fusing the decode into the product (see the docstring)
        out = jnp.dot(x32, jax.lax.optimization_barrier(w.dequantize()).T)
    return out.reshape(*x.shape[:-1], n).astype(x.dtype)


def w8a8_matmul(x32: jax.Array, w: QuantWeight) -> jax.Array:
    """[M, K] float32 @ a "w8a8" matrix: each row quantized to int8 with its own scale, an
    int8 x int8 product accumulated in int32 (exact, so every row is the same number whatever
    M is), then both scales applied. A single row runs as two (XLA:CPU's one-row int8 product is
    a slow path; the rows are independent, so the padding row changes nothing)."""
    xq, xs, _ = kvf.quantize(x32, "int8")  # one scale per row: the codec's per-token int8
    one = xq.shape[0] == 1
    if one:
        xq = jnp.pad(xq, ((0, 1), (0, 0)))
    acc = jax.lax.dot_general(xq, w.data, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    if one:
        acc = acc[:1]
    return acc.astype(jnp.float32) * xs * w.scale[:, 0]


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """What to quantize and how: `LLM(quantization="int4", quantization_config={...})`.

    format: one of FORMATS. method: "rtn", "gptq" or "awq". group_size: input features per scale
    (None: the format's default, DEFAULT_GROUP; int8 / fp8 default to one scale per output
    channel). skip: modules kept dense. overrides: {module pattern: format} (hybrid policies;
    where several patterns match a module, the last one wins).
    A pattern names a layer ("layers.0"), a module of every layer ("w_down"), or one module
    ("layers.5.wo"). GPTQ and AWQ: calibration_samples windows of calibration_len tokens (from the
    standard-library training split unless `calibration` token ids are given to LLM), damp:
    the fraction of the mean Hessian diagonal added to it, block_size: columns per lazy update,
    act_order: quantize columns by decreasing Hessian diagonal, with static groups (`gptq_quantize`).
    calibrate_all_experts (mixture-of-experts models, GPTQ / AWQ): each routed expert calibrates on
    every token of the calibration windows (llm-compressor's default), not only on the tokens the
    router sends it; the layer's output still takes only the routed experts'. An expert that no
    calibration token reaches is rounded to nearest.
    AWQ: clip searches each integer group's clipping range after the scales (as AWQ does).
    lm_head: a format for the LM head too (round to nearest, one scale per vocabulary row; with tied
    embeddings the head gets its own quantized copy and the embedding stays dense for the lookup).
    """

    format: str = "int8"
    method: str = "rtn"
    group_size: int | None = None
    skip: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    calibration_samples: int = 32
    calibration_len: int = 256
    damp: float = 0.01
    block_size: int = 128
    clip: bool = True
    lm_head: str | None = None
    act_order: bool = False
    calibrate_all_experts: bool = True

    KEYS = ("method", "group_size", "skip", "overrides", "calibration_samples", "calibration_len", "damp",
            "block_size", "clip", "lm_head", "act_order", "calibrate_all_experts")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"quantization={self.format!r} is not supported; choose one of {', '.join(FORMATS)}")
        if self.method not in METHODS + LOADED_METHODS:
            raise ValueError(f"quantization method={self.method!r} is not one of {METHODS}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"quantization group_size={self.group_size!r} must be a positive integer or None")
        if self.format in ACT_FORMATS and self.group_size is not None:
            raise ValueError(f"{self.format} scales each output channel (a quantized product per row); group_size="
                             f"{self.group_size} is not allowed")
        if self.format in FIXED_GROUP and self.group_size not in (None, FIXED_GROUP[self.format]):
            raise ValueError(f"{self.format} uses {FIXED_GROUP[self.format]}-element blocks, not "
                             f"group_size={self.group_size}")
        for _, fmt in self.overrides:
            if fmt not in FORMATS:
                raise ValueError(f"quantization override format {fmt!r} is not one of {FORMATS}")
        if self.lm_head is not None and self.lm_head not in FORMATS:
            raise ValueError(f"quantization lm_head={self.lm_head!r} is not one of {FORMATS} (or None: dense)")
        for fmt in {self.format, *(f for _, f in self.overrides)}:
            if self.method == "gptq" and fmt not in GPTQ_FORMATS:
                raise ValueError(f"method='gptq' quantizes to {GPTQ_FORMATS}, not {fmt!r} (use method='rtn')")
        for name in ("calibration_samples", "calibration_len", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"quantization {name}={getattr(self, name)!r} must be a positive integer")
        for name in ("clip", "calibrate_all_experts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantization {name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.act_order, bool) or (self.act_order and self.method != "gptq"):
            raise ValueError(f"quantization act_order={self.act_order!r} must be True or False, and True only with "
                             "method='gptq'")
        if not 0 <= self.damp < 1:
            raise ValueError(f"quantization damp={self.damp!r} must be in [0, 1)")

    @classmethod
    def from_args(cls, quantization: str | None, config: dict | None) -> "WeightQuantConfig | None":
        if quantization is None:
            if config:
                raise ValueError("quantization_config needs quantization=<format>")
            return None
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown quantization_config keys {unknown}; allowed: {list(cls.KEYS)}")
        skip = config.get("skip", ())
        skip = (skip,) if isinstance(skip, str) else skip
        if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
            raise ValueError(f"quantization skip={skip!r} must be a module pattern or a list of them")
        overrides = config.get("overrides", {})
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise ValueError(f"quantization overrides={overrides!r} must be a dict {{module pattern: format}}")
        config["skip"], config["overrides"] = tuple(skip), tuple(overrides.items())
        if config.get("method") in LOADED_METHODS:
            raise ValueError(f"quantization method={config['method']!r} describes a pre-quantized checkpoint, "
                             f"which LLM(model=dir) loads as it is; quantize with one of {METHODS}")
        return cls(format=quantization, **config)

    @classmethod
    def of_weights(cls, weights, method: str) -> "WeightQuantConfig | None":
        """A description of weights quantized elsewhere (`method`: where from): the most common
        format (and its group), other formats as overrides, dense projections as skips; None if
        nothing is quantized."""
        fmts = {f"layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(weights.layers) for n in QUANT_MODULES
                if getattr(layer, n) is not None}
        quantized = [w.fmt for w in fmts.values() if isinstance(w, QuantWeight)]
        if not quantized:
            return None
        main = max(set(quantized), key=quantized.count)
        first = next(w for w in fmts.values() if isinstance(w, QuantWeight) and w.fmt == main)
        head = weights.lm_head.fmt if isinstance(weights.lm_head, QuantWeight) else None
        return cls(format=main, method=method, lm_head=head, clip=False,  # no search ran here
                   group_size=first.group if main in ("int8", "int4", "fp8_e4m3") and first.group < first.shape[0]
                   else None,
                   skip=tuple(m for m, w in fmts.items() if not isinstance(w, QuantWeight)),
                   overrides=tuple((m, w.fmt) for m, w in fmts.items() if isinstance(w, QuantWeight) and w.fmt != main))

    def to_saved(self) -> dict:
        """JSON-able fields (LLM.save writes them to quantization.json)."""
        d = dataclasses.asdict(self)
        d["skip"], d["overrides"] = list(self.skip), [list(o) for o in self.overrides]
        return d

    @classmethod
    def from_saved(cls, d: dict) -> "WeightQuantConfig":
        return cls(**{**d, "skip": tuple(d.get("skip", ())), "overrides": tuple(map(tuple, d.get("overrides", ())))})

    def tag(self) -> str:
        """A short description (prefix-cache key, reports)."""
        return (f"{self.format}/{self.method}/g{self.group_size}/skip{self.skip}/ovr{self.overrides}"
                + ("/clip" if self.method == "awq" and self.clip else "")
                + (f"/head:{self.lm_head}" if self.lm_head else "") + ("/act_order" if self.act_order else "")
                + ("/routed_experts" if self.method in ("gptq", "awq") and not self.calibrate_all_experts else ""))

    def format_of(self, module: str) -> str | None:
        """The format of module "layers.{i}.{name}", or None to keep it dense."""
        if any(_matches(p, module) for p in self.skip):
            return None
        fmt = self.format
        for pattern, f in self.overrides:
            if _matches(pattern, module):
                fmt = f
        return fmt

    def group_of(self, fmt: str, in_features: int) -> int:
        if fmt in ACT_FORMATS:
            return in_features  # one scale per output channel, whatever group_size the others use
        g = FIXED_GROUP.get(fmt, self.group_size)
        g = DEFAULT_GROUP[fmt] if g is None else g
        g = in_features if g is None else min(g, in_features)
        if in_features % g:
            raise ValueError(f"group_size={g} does not divide a layer's {in_features} input features")
        if CODEC.get(fmt, fmt) in kvf.PACKED and g % 2:
            raise ValueError(f"{fmt} packs two input features per byte: group_size={g} must be even")
        return g


def _matches(pattern: str, module: str) -> bool:
    return module == pattern or module.startswith(pattern + ".") or module.rsplit(".", 1)[-1] == pattern


# ----------------------------------------------------------------------------- RTN

def quantize_rtn(w: jax.Array | np.ndarray, fmt: str, group: int) -> QuantWeight:
    """Round-to-nearest quantization of a dense [K, N] matrix, each group scaled by its absmax."""
    wt = jnp.asarray(w, jnp.float32).T  # [N, K]
    if fmt == "mxfp4":
        return _mxfp4_rtn(wt)
    tensor_scale = None
    if fmt == "nvfp4":
        tensor_scale = kvf.nvfp4_tensor_scale(jnp.max(jnp.abs(wt)))
    data, scale, _ = kvf.quantize(wt, CODEC.get(fmt, fmt), 1, group, tensor_scale=tensor_scale)
    return QuantWeight(data=data, scale=scale, tensor_scale=tensor_scale, fmt=fmt)


OPTIONAL = ("tensor_scale", "input_scale", "zero", "input_perm")  # QuantWeight arrays that may be None


def quantize_experts_rtn(w: jax.Array | np.ndarray, fmt: str, group: int) -> QuantWeight:
    """Round to nearest of stacked experts [E, K, N], each expert with its own scales."""
    return stack_experts([quantize_rtn(w[j], fmt, group) for j in range(w.shape[0])])


def stack_experts(qs: list[QuantWeight]) -> QuantWeight:
    """One stacked QuantWeight from each expert's (the same format, group, dtypes and optional arrays;
    ValueError otherwise). nvfp4 tensor scales become one per output feature if any expert has those."""
    kinds = {(q.fmt, q.group, q.shape, q.data.dtype, q.scale.dtype) + tuple(getattr(q, f) is None for f in OPTIONAL)
             for q in qs}
    if len(kinds) != 1:
        raise ValueError(f"experts quantized differently cannot be stacked: {sorted(map(str, kinds))}")
    if qs[0].tensor_scale is not None and len({q.tensor_scale.shape for q in qs}) > 1:
        qs = [q.replace(tensor_scale=jnp.broadcast_to(jnp.reshape(q.tensor_scale, (-1, 1)), (q.shape[1], 1)))
              for q in qs]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *qs)



@jax.jit
def _mxfp4_rtn(wt: jax.Array) -> QuantWeight:
    """OCP MX FP4 of [N, K]: each 32-element block shares a power of two 2^e, stored as the biased
    exponent byte, and its values round to e2m1, saturating at 6. OCP's e = floor(log2 absmax) - 2
    (e2m1's largest exponent is 2) can leave the absmax at up to 8x the scale, clipped to 6; one
    step more when absmax / 2^e >= 7 (beyond 6 by more than half the next step) keeps the clip
    under 1/7 of the absmax, the rule compressed-tensors' MX scales follow."""
    n, k = wt.shape
    blocks = wt.reshape(n, k // MXFP4_GROUP, MXFP4_GROUP)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    exp = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - 2, -127.0)
    exp = jnp.clip(exp + (amax >= 7.0 * jnp.exp2(exp)), -127, 127)
    q = blocks / jnp.exp2(exp)[:, :, None]
    data = kvf.pack_nibbles(kvf.e2m1_encode(q.reshape(n, k)).astype(jnp.int32))
    return QuantWeight(data=data, scale=(exp + 127).astype(jnp.uint8), fmt="mxfp4")


# ----------------------------------------------------------------------------- GPTQ

def gptq_quantize(w: np.ndarray, hessian: np.ndarray, fmt: str, group: int, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> QuantWeight:
    """GPTQ of a dense [K, N] matrix given H = 2 X^T X [K, K] of its inputs (float64 math).

    Columns are the input features; each group's scale is its absmax at the moment the group's
    first column is reached (the weights then carry the error of the columns before it).
    act_order: quantize the columns in order of decreasing H diagonal (the inputs with the most
    energy first, while the most columns are left to absorb their error), each with its group's
    scale fixed up front from the weights as given ("static groups", compressed-tensors'
    actorder="weight"): the groups stay contiguous in the stored order, so the format is the same."""
    lo, qmax = int_range(fmt)
    wt = np.array(w, np.float64).T.copy()  # [N, K]
    n, k = wt.shape
    h = np.array(hessian, np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    scales = np.zeros((n, k // group), np.float64)
    order = np.arange(k)
    if act_order:
        amax = np.abs(wt).reshape(n, k // group, group).max(-1)
        scales[:] = np.where(amax > 0, amax / qmax, 1.0)
        order = np.argsort(-np.diag(h), kind="stable")
        wt, h = wt[:, order], h[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row i holds the weights that spread column i's error.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k), np.int32)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        err = np.zeros((n, b1 - b0))
        for i in range(b0, b1):
            g = order[i] // group  # the column's group in the stored order
            if not act_order and i % group == 0:
                amax = np.max(np.abs(wt[:, i:i + group]), axis=1)
                scales[:, g] = np.where(amax > 0, amax / qmax, 1.0)
            s = scales[:, g]
            q = np.clip(np.round(wt[:, i] / s), lo, qmax)
            codes[:, order[i]] = q
            e = (wt[:, i] - q * s) / hinv[i, i]
            wt[:, i:b1] -= np.outer(e, hinv[i, i:b1])
            err[:, i - b0] = e
        wt[:, b1:] -= err @ hinv[b0:b1, b1:]
    return from_codes(codes, scales, fmt)


INT_FORMATS = ("int8", "int4", "w8a8")


def int_range(fmt: str) -> tuple[int, int]:
    """The codes an integer format stores: int4 nibbles reach -8, int8 stays symmetric."""
    qmax = int(kvf.QMAX[CODEC.get(fmt, fmt)])
    return (-qmax - 1 if fmt == "int4" else -qmax), qmax


def from_codes(codes: np.ndarray, scales: np.ndarray, fmt: str) -> QuantWeight:
    """A QuantWeight of an integer format from integer codes [N, K] and scales [N, K/g]."""
    codes = np.asarray(codes, np.int32)
    if fmt in ("int8", "w8a8"):
        data = jnp.asarray(codes.astype(np.int8))
    else:
        data = kvf.pack_nibbles(jnp.asarray(codes & 0xF))
    return QuantWeight(data=data, scale=jnp.asarray(scales, jnp.float32), fmt=fmt)


class InputObserver:
    """Stands in for a dense [K, N] weight in an eager forward: `matmul` multiplies by the weight
    and records the inputs x: H = 2 X^T X averaged over the rows seen (GPTQ) and up to
    `keep_rows` of the rows themselves (AWQ's scale search)."""

    def __init__(self, w: jax.Array, hessian: bool = True, keep_rows: int = 0):
        self.w = w
        k = w.shape[0]
        self.hessian = np.zeros((k, k), np.float64) if hessian else None
        self.rows = 0
        self.keep_rows = keep_rows
        self.kept: list[np.ndarray] = []

    def observe(self, x: jax.Array) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.w.shape[0])
        total = self.rows + x.shape[0]
        if self.hessian is not None:
            self.hessian *= self.rows / total
            self.hessian += (2.0 / total) * (x.T @ x)
        self.rows = total
        room = self.keep_rows - sum(len(r) for r in self.kept)
        if room > 0:
            self.kept.append(x[:: max(1, x.shape[0] // room)][:room])

    def sample(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, self.w.shape[0]))


class ExpertsObserver:
    """Stands in for a MoE layer's stacked experts [E, K, N] in an eager forward (`moe.experts_forward`
    then runs each expert on its own rows): one InputObserver per expert, fed the rows the router sent
    it, or with `all_tokens` every row of the layer (`WeightQuantConfig.calibrate_all_experts`)."""

    def __init__(self, w: jax.Array, hessian: bool = True, keep_rows: int = 0, all_tokens: bool = True):
        self.experts = [InputObserver(w[j], hessian, keep_rows) for j in range(w.shape[0])]
        self.all_tokens = all_tokens


def take_expert(w, j: int):
    """Expert j's weight from stacked experts: an array [E, K, N], a stacked QuantWeight, or (while
    GPTQ / AWQ calibrate) an ExpertsObserver."""
    if isinstance(w, ExpertsObserver):
        return w.experts[j]
    return jax.tree_util.tree_map(lambda a: a[j], w)


# ----------------------------------------------------------------------------- AWQ

def awq_quantize(w: np.ndarray, x: np.ndarray, fmt: str, group: int, grid: int = 20,
                 clip: bool = True) -> tuple[QuantWeight, float]:
    """AWQ (Lin et al., 2023) of a dense [K, N] matrix given sample inputs x [R, K].

    Input channels that carry large activations matter more, so they are scaled up before
    rounding: W' = diag(s) W with s = mean|x|^alpha (normalised to a geometric mean of 1), and
    the inputs are divided by s at run time (`QuantWeight.input_scale`), which leaves the exact
    product unchanged. alpha is searched on the grid 0, 1/grid, ..., (grid - 1)/grid for the
    smallest output error ||x W - (x / s) Q(W')||^2; alpha = 0 is plain RTN. With clip, integer
    formats then search each group's clipping range (`clip_search`). Returns the quantized matrix and
    the alpha chosen."""
    w = np.asarray(w, np.float32)
    x = np.asarray(x, np.float32)
    ref = x @ w
    act = np.mean(np.abs(x), axis=0) + 1e-8
    best = (np.inf, None, 0.0)
    for i in range(grid):
        alpha = i / grid
        s = act ** alpha
        s = s / np.sqrt(s.max() * s.min())
        q = quantize_rtn(w * s[:, None], fmt, group)
        err = float(np.mean((ref - (x / s) @ np.asarray(q.dense())) ** 2))
        if err < best[0]:
            best = (err, q, alpha, s)
    _, q, alpha, s = best
    if clip and fmt in INT_FORMATS:
        q = clip_search(w * s[:, None], x / s, fmt, group)
    return q.replace(input_scale=jnp.asarray(1.0 / s, jnp.float32)), alpha


def clip_search(w: np.ndarray, x: np.ndarray, fmt: str, group: int, rows: int = 512,
                ratios: np.ndarray = np.linspace(1.0, 0.5, 11)) -> QuantWeight:
    """AWQ's second step for integer formats: each (output channel, group) scale covers
    ratio x its absmax instead of all of it, the ratio chosen on the grid 1.0 ... 0.5 for the
    smallest error of that group's share of the output, sum over sample rows of
    (x_g . (w_g - Q(w_g)))^2. Clipping a few large weights buys finer steps for the rest; ratio
    1.0 is round to nearest, so no group gets worse. w [K, N], x [R, K]."""
    lo, qmax = int_range(fmt)
    wg = np.asarray(w, np.float32).T.reshape(w.shape[1], -1, group)  # [N, G, g]
    xg = np.ascontiguousarray(np.asarray(x, np.float32)[:rows].reshape(-1, wg.shape[1], group).transpose(1, 0, 2))
    amax = np.abs(wg).max(-1)  # [N, G]
    best_err = np.full(amax.shape, np.inf)
    best_scale = np.where(amax > 0, amax / qmax, 1.0)
    for r in ratios:
        scale = np.where(amax > 0, r * amax / qmax, 1.0)
        diff = wg - np.clip(np.round(wg / scale[..., None]), lo, qmax) * scale[..., None]  # [N, G, g]
        err = np.sum(np.matmul(xg, diff.transpose(1, 2, 0)) ** 2, axis=1).T  # [G, R, N] -> [N, G]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    codes = np.clip(np.round(wg / best_scale[..., None]), lo, qmax).reshape(wg.shape[0], -1)
    return from_codes(codes, best_scale, fmt)


# ----------------------------------------------------------------------------- whole model

def quantize_weights(weights, cfg, qc: WeightQuantConfig, calibration: np.ndarray | None = None):
    """Weights with every selected projection replaced by a QuantWeight.

    calibration: int32 [S, T] token windows (GPTQ and AWQ). Both calibrate in the model's order
    ("true sequential"): each projection's inputs are recorded in an eager run of its layer on
    the activations that the quantized layers before it produce, with the projections before it
    in the same layer already quantized (wqkv, then wo, then w_gate_up, then w_down, then a MoE
    layer's experts_gate_up and experts_down, each expert calibrated on its own inputs)."""
    check_patterns(weights, qc)
    if qc.method in ("gptq", "awq"):
        if calibration is None:
            raise ValueError(f"method={qc.method!r} needs calibration token windows")
        tokens = np.asarray(calibration)
        if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{qc.method} calibration must be integer token ids of shape [windows, tokens], not "
                             f"{tokens.dtype} {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"{qc.method} calibration token ids must be in [0, {cfg.vocab_size}); got "
                             f"[{tokens.min()}, {tokens.max()}]")
        return quantize_lm_head(_calibrated_model(weights, cfg, qc, tokens.astype(np.int32)), qc)
    layers = []
    for i, layer in enumerate(weights.layers):
        fields = {}
        for name in QUANT_MODULES:
            fmt = qc.format_of(f"layers.{i}.{name}")
            w = getattr(layer, name)
            if fmt is None or w is None:
                continue
            rtn = quantize_experts_rtn if name in EXPERT_MODULES else quantize_rtn
            fields[name] = rtn(w, fmt, qc.group_of(fmt, w.shape[-2]))
        layers.append(layer.replace(**fields))
    return quantize_lm_head(weights.replace(layers=layers), qc)


def check_patterns(weights, qc: WeightQuantConfig) -> None:
    """ValueError for a skip or override pattern that names no module of these weights (a typo, or a
    dense model's module name on a MoE model, whose MoE layers hold experts_gate_up / experts_down
    instead of w_gate_up / w_down unless they have a shared expert)."""
    modules = [f"layers.{i}.{n}" for i, layer in enumerate(weights.layers) for n in QUANT_MODULES
               if getattr(layer, n) is not None]
    for kind, pattern in [("skip", p) for p in qc.skip] + [("override", p) for p, _ in qc.overrides]:
        if not any(_matches(pattern, m) for m in modules):
            names = sorted({m.rsplit(".", 1)[1] for m in modules}, key=QUANT_MODULES.index)
            raise ValueError(f"quantization {kind} pattern {pattern!r} matches no module of this model: name a "
                             f"layer (layers.0 .. layers.{len(weights.layers) - 1}), a module of every layer "
                             f"({', '.join(names)}) or one module (layers.0.{names[0]})")


def quantize_lm_head(weights, qc: WeightQuantConfig):
    """The LM head rounded to qc.lm_head (tied embeddings: a quantized copy of the embedding as the head)."""
    if qc.lm_head is None:
        return weights
    head = weights.lm_head if weights.lm_head is not None else weights.embed.T  # [D, V]
    return weights.replace(lm_head=quantize_rtn(head, qc.lm_head, qc.group_of(qc.lm_head, head.shape[0])))


def _calibrated_model(weights, cfg, qc: WeightQuantConfig, tokens: np.ndarray):
    from jaxinfer.model import decoder_layer, embed_tokens, layer_rope  # model imports this module

    s, t = tokens.shape
    x = embed_tokens(weights, cfg, jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (s, t))
    rope = layer_rope(cfg, pos, x.dtype)
    full = jnp.full((s,), t, jnp.int32)
    meta = AttentionMeta(page_table=jnp.zeros((s, 1), jnp.int32), kv_lens=full, q_lens=full, contiguous=True)

    def run(i, layer, x):  # jitted (decoder_layer): compiles once per layer structure (policy), not per layer
        return decoder_layer(layer, cfg, x, *rope[i], None, None, meta, "xla", cfg.layer_window(i))[0]

    awq = qc.method == "awq"
    observe = {"hessian": not awq, "keep_rows": AWQ_ROWS if awq else 0}

    def calibrated(probe: InputObserver, fmt: str) -> QuantWeight:
        group = qc.group_of(fmt, probe.w.shape[0])
        if probe.rows == 0:  # an expert no calibration token reached
            return quantize_rtn(probe.w, fmt, group)
        if qc.method == "gptq":
            return gptq_quantize(np.asarray(probe.w, np.float64), probe.hessian, fmt, group, qc.damp, qc.block_size,
                                 qc.act_order)
        return awq_quantize(np.asarray(probe.w), probe.sample(), fmt, group, clip=qc.clip)[0]

    layers = []
    for i, layer in enumerate(weights.layers):
        for name in QUANT_MODULES:  # in the order the layer applies them
            fmt, w = qc.format_of(f"layers.{i}.{name}"), getattr(layer, name)
            if fmt is None or w is None:
                continue
            experts = name in EXPERT_MODULES
            probe = (ExpertsObserver(w, all_tokens=qc.calibrate_all_experts, **observe) if experts
                     else InputObserver(w, **observe))
            with jax.disable_jit():
                run(i, layer.replace(**{name: probe}), x)
            q = (stack_experts([calibrated(p, fmt) for p in probe.experts]) if experts else calibrated(probe, fmt))
            layer = layer.replace(**{name: q})
        layers.append(layer)
        x = run(i, layer, x)  # the next layer calibrates on this quantized layer's output
    return weights.replace(layers=layers)


def quantized_nbytes(in_features: int, out_features: int, fmt: str, group: int) -> int:
    """Bytes a QuantWeight of a [K, N] matrix holds (codes, scales, the nvfp4 tensor scale), without
    building it (the memory calculator's count)."""
    codes = out_features * in_features // (2 if CODEC.get(fmt, fmt) in kvf.PACKED else 1)
    scale_itemsize = 1 if fmt == "mxfp4" else jnp.dtype(kvf.SCALE_DTYPE[CODEC.get(fmt, fmt)]).itemsize
    return codes + out_features * (in_features // group) * scale_itemsize + (4 if fmt == "nvfp4" else 0)


def weight_bytes(weights) -> dict:
    """Bytes of the quantized projections, of the dense projections (routed experts included), of what the LM head reads (the
    embedding when tied and not quantized), and of everything."""
    quant = dense = 0
    for layer in weights.layers:
        for name in QUANT_MODULES:
            w = getattr(layer, name)
            if isinstance(w, QuantWeight):
                quant += w.nbytes
            elif w is not None:
                dense += w.nbytes
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    leaves = {id(x): x for x in jax.tree_util.tree_leaves(weights)}  # an array held twice (a tied head read in place) once
    total = sum(x.nbytes for x in leaves.values())
    return {"quantized": quant, "dense_projections": dense, "lm_head": head.nbytes, "total": total}


__all__ = ["FORMATS", "METHODS", "QuantWeight", "WeightQuantConfig", "quantize_rtn", "quantize_experts_rtn",
           "stack_experts", "ExpertsObserver", "take_expert", "gptq_quantize",
           "quantize_weights", "quantized_matmul", "weight_bytes", "InputObserver", "awq_quantize"]
