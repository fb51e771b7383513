"""Pre-quantized Hugging Face checkpoints: compressed-tensors, GPTQ and AWQ, read into `wquant.QuantWeight`.

Checkpoints quantized by llm-compressor (and served by vLLM) describe themselves in config.json's
"quantization_config" with quant_method "compressed-tensors": config groups, each a scheme
(weight and input-activation arguments: num_bits, type int / float, strategy, group_size,
symmetric, dynamic) with the modules it targets and its storage format, plus an ignore list.
Each targeted decoder projection is read into a QuantWeight, its codes and scales as stored
(nothing is rounded again, so the model computes what the checkpoint's own dequantization
gives):

  scheme (weights; activations)               format here   stored per module (HF [N, K] order)
  int 4 / 8 bits, channel, group or tensor    int4 / int8   weight_packed int32 [N, K*b/32] (b-bit
    symmetric or not; none                                  values + 2^(b-1), value i at bits b*i),
                                                            or (int8) weight int8 [N, K];
                                                            weight_scale; weight_zero_point
                                                            (asymmetric; packed along N)
  int 8, channel; int 8 dynamic per token     w8a8          weight int8 [N, K], weight_scale [N, 1]
  float 8 (e4m3), tensor, channel, group      fp8_e4m3      weight float8_e4m3fn [N, K], weight_scale
    or block; none                                          ([bn, bk] blocks: [N/bn, K/bk])
  float 8, tensor or channel; float 8         w8a8_fp8      as fp8_e4m3
    dynamic per token
  float 4 (e2m1), group 32, uint8 scales      mxfp4         weight_packed as nvfp4, weight_scale uint8
                                                            exponents [N, K/32]: value = e2m1 * 2^(s - 127)
  float 4 (e2m1), tensor_group 16; none       nvfp4         weight_packed uint8 [N, K/2] (element 2j
                                                            in the low nibble), weight_scale
                                                            float8_e4m3fn [N, K/16],
                                                            weight_global_scale [1]: value =
                                                            e2m1 * scale / global_scale

Scales of every strategy become [N, K/g] (a tensor scale repeats over the rows, a block scale
over its block's rows). Asymmetric integers keep their offset nibbles and carry
zero = -(2^(b-1) + zero_point) * scale for int4, -zero_point * scale for int8 (value = q * s + z).
The fused projections (q/k/v, gate/up) stack their parts' rows; parts of one format and group
with different NVFP4 global scales keep one tensor scale per row. Parts that cannot share one
QuantWeight (different formats or groups, or some left dense) are dequantized into the dense
matrix, in the model's dtype, as is a quantized LM head.

GPTQ (quant_method "gptq": AutoGPTQ / GPTQModel, 4 or 8 bits, any group_size or -1, sym or not,
checkpoint_format "gptq" (v1: zero points stored minus one) or "gptq_v2", desc_act) and AWQ
(quant_method "awq": AutoAWQ's GEMM layout, 4 bits, zero points) checkpoints store every decoder
projection (and GPTQ's LM head with lm_head=True) as packed int32 codes with float16 scales and
packed zero points (`_read_packed_ints` has the layouts); they become int4 / int8 QuantWeights with
a zero point, or without one when every zero point is the midpoint (symmetric GPTQ). A GPTQ
projection in activation order (g_idx not k // g) is stored with its input features sorted by
group and an input permutation. modules_to_not_convert and GPTQ's modules_in_block_to_quantize
leave modules dense.

Refused with a CheckpointError naming the value: other quant_methods (bitsandbytes, ...); GPTQ of
2 or 3 bits, in marlin's layout, packed other than in int32 or with per-module "dynamic" settings; AWQ other than 4-bit GEMM;
in compressed-tensors: static activation scales, activation-order group indices (actorder="group"),
4-bit or grouped activations, other bit widths and float formats (MXFP6, MXFP8, ...), sparsity and
transforms.
A kv_cache_scheme is ignored with a warning (the KV cache's format is `LLM(kv_cache_dtype=...)`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax.numpy as jnp
import numpy as np

from jaxinfer.wquant import QuantWeight
from pallas_kernels import kv_formats as kvf

QUANT_METHOD = "compressed-tensors"
STORAGE = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized",
           "mxfp4-pack-quantized")


class QuantConfigError(ValueError):
    """A quantization_config this loader cannot honour (checkpoint.load_hf turns it into a CheckpointError)."""


@dataclasses.dataclass(frozen=True)
class ModuleScheme:
    """How one projection is stored: the QuantWeight format it becomes, and what its tensors hold."""

    fmt: str  # wquant format
    storage: str  # compressed-tensors format
    num_bits: int
    strategy: str  # tensor | channel | group | block | tensor_group
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True


@dataclasses.dataclass(frozen=True)
class CompressedTensors:
    """A parsed compressed-tensors quantization_config: (targets, scheme) per config group, ignore list."""

    groups: tuple[tuple[tuple[str, ...], ModuleScheme], ...]
    ignore: tuple[str, ...]
    method = QUANT_METHOD

    def scheme_of(self, name: str) -> ModuleScheme | None:
        """The scheme of the Linear module `name` (HF name, e.g. "model.layers.0.self_attn.q_proj"), or None
        (stored dense). Where several groups target it, the most specific target wins, as in
        compressed-tensors: the module's name, then a regex, then the class name."""
        if any(_match_rank(t, name) is not None for t in self.ignore):
            return None
        ranked = [(rank, i) for i, (targets, _) in enumerate(self.groups) for t in targets
                  if (rank := _match_rank(t, name)) is not None]
        return self.groups[min(ranked)[1]][1] if ranked else None


def _match_rank(target: str, name: str) -> int | None:
    """How a compressed-tensors target matches the Linear module `name`: 0 by its name, 1 by a
    "re:<regex>", 2 by the class name "Linear"; None if it does not."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    return 0 if target == name else 2 if target == "Linear" else None


@dataclasses.dataclass(frozen=True)
class PackedInts:
    """A GPTQ or AWQ quantization_config: one scheme for the decoder's projections (and the LM head
    when the config says so), but the modules it leaves dense."""

    method: str  # "gptq" | "awq"
    scheme: ModuleScheme
    dense: tuple[str, ...] = ()  # modules_to_not_convert: names containing any of these stay dense
    only: tuple[str, ...] | None = None  # GPTQ modules_in_block_to_quantize ("self_attn.q_proj", ...)
    lm_head: bool = False

    def scheme_of(self, name: str) -> ModuleScheme | None:
        if name == "lm_head":
            return self.scheme if self.lm_head else None
        if any(d in name for d in self.dense):
            return None
        if self.only is not None and not any(name.endswith("." + m) for m in self.only):
            return None
        return self.scheme


GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 stores each zero point minus one
PACKED_STORAGE = (*GPTQ_CHECKPOINT_FORMATS, "awq")  # ModuleScheme.storage of GPTQ / AWQ projections


def _packed_scheme(where: str, bits: int, group, storage: str, symmetric: bool) -> ModuleScheme:
    """The int4 / int8 scheme of a GPTQ / AWQ config (group_size -1: one group per row)."""
    if not isinstance(group, int) or not (group == -1 or group > 0):
        raise QuantConfigError(f"{where}: group_size={group!r} must be a positive integer or -1 (one group per row)")
    return ModuleScheme(fmt=f"int{bits}", storage=storage, num_bits=bits, strategy="group" if group > 0 else "channel",
                        group_size=group if group > 0 else None, symmetric=symmetric)


def _parse_gptq(qc: dict, source: str) -> PackedInts:
    where = f"{source}: GPTQ quantization_config"
    bits, group = qc.get("bits"), qc.get("group_size", 128)
    if bits not in (4, 8):
        raise QuantConfigError(f"{where}: bits={bits!r} is not supported; 4 and 8 are")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in GPTQ_CHECKPOINT_FORMATS or qc.get("is_marlin_format"):
        raise QuantConfigError(f"{where}: checkpoint_format={fmt!r}{' (marlin)' if qc.get('is_marlin_format') else ''}"
                               f" is not supported; supported: {', '.join(GPTQ_CHECKPOINT_FORMATS)}")
    if qc.get("dynamic"):
        raise QuantConfigError(f"{where}: per-module 'dynamic' overrides are not supported")
    if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise QuantConfigError(f"{where}: pack_dtype={qc['pack_dtype']!r} is not supported; codes packed in int32 are")
    only = qc.get("modules_in_block_to_quantize")
    if only is not None:
        only = tuple(m for block in only for m in (block if isinstance(block, list) else [block]))
    scheme = _packed_scheme(where, bits, group, fmt, symmetric=bool(qc.get("sym", True)))
    return PackedInts(method="gptq", scheme=scheme, dense=tuple(qc.get("modules_to_not_convert") or ()), only=only,
                      lm_head=bool(qc.get("lm_head", False)))


def _parse_awq(qc: dict, source: str) -> PackedInts:
    where = f"{source}: AWQ quantization_config"
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size", 128))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise QuantConfigError(f"{where}: bits={bits!r} is not supported; AWQ checkpoints of 4 bits are")
    if version != "gemm":
        raise QuantConfigError(f"{where}: version={version!r} is not supported; 'gemm' (AutoAWQ's default layout) is")
    if not qc.get("zero_point", True):
        raise QuantConfigError(f"{where}: zero_point=False is not supported; AWQ GEMM checkpoints store zero points")
    scheme = _packed_scheme(where, 4, group, "awq", symmetric=False)
    return PackedInts(method="awq", scheme=scheme, dense=tuple(qc.get("modules_to_not_convert") or ()))


def parse(qc: dict | None, source: str = "config.json") -> CompressedTensors | PackedInts | None:
    """config.json's quantization_config -> CompressedTensors, None for a dense checkpoint, or
    QuantConfigError naming what is not supported."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantConfigError(f"{source}: quantization_config must be an object, not {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "gptq":
        return _parse_gptq(qc, source)
    if method == "awq":
        return _parse_awq(qc, source)
    if method != QUANT_METHOD:
        raise QuantConfigError(
            f"{source}: quantization_config quant_method={method!r} is not supported; jaxinfer loads "
            f"{QUANT_METHOD!r} checkpoints (llm-compressor; int4 / int8 / fp8 / nvfp4 weights, int8 or fp8 "
            "dynamic activations), 'gptq' (AutoGPTQ / GPTQModel; 4 or 8 bits) and 'awq' (AutoAWQ GEMM; "
            "4 bits), or quantizes dense ones itself: LLM(quantization=...)")
    if qc.get("sparsity_config"):
        raise QuantConfigError(f"{source}: compressed-tensors sparsity_config is not supported")
    if qc.get("transform_config"):
        raise QuantConfigError(f"{source}: compressed-tensors transform_config (rotations) is not supported")
    if qc.get("kv_cache_scheme"):
        warnings.warn(f"{source}: the checkpoint's kv_cache_scheme is ignored; choose the KV cache's format "
                      "with LLM(kv_cache_dtype=...)", stacklevel=3)
    default_storage = qc.get("format")
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        if not isinstance(g, dict) or not g.get("targets"):
            raise QuantConfigError(f"{source}: config group {gname!r} has no targets")
        scheme = _scheme(g, g.get("format") or default_storage, f"{source}: config group {gname!r}")
        if scheme is not None:
            groups.append((tuple(g["targets"]), scheme))
    return CompressedTensors(groups=tuple(groups), ignore=tuple(qc.get("ignore") or ()))


def _scheme(g: dict, storage: str | None, where: str) -> ModuleScheme | None:
    w, act = g.get("weights"), g.get("input_activations")
    if g.get("output_activations"):
        raise QuantConfigError(f"{where}: output activation quantization is not supported")
    if storage == "dense" or w is None:
        if act:
            raise QuantConfigError(f"{where}: activation quantization without quantized weights is not supported")
        return None
    if storage not in STORAGE:
        raise QuantConfigError(f"{where}: storage format {storage!r} is not supported; supported: {', '.join(STORAGE)}")
    kind, bits, strategy = w.get("type", "int"), int(w.get("num_bits", 8)), w.get("strategy", "tensor")
    group = w.get("group_size")
    block = tuple(w["block_structure"]) if w.get("block_structure") else None
    symmetric = bool(w.get("symmetric", True))
    if w.get("dynamic"):
        raise QuantConfigError(f"{where}: dynamic weight quantization is not supported")
    if w.get("actorder") == "group":
        raise QuantConfigError(f"{where}: actorder='group' (per-column group indices) is not supported; "
                               "checkpoints with actorder='weight' or none load")
    if kind == "int" and bits in (4, 8) and strategy in ("tensor", "channel", "group"):
        fmt = f"int{bits}"
    elif kind == "float" and bits == 8 and strategy in ("tensor", "channel", "group", "block"):
        fmt = "fp8_e4m3"
    elif kind == "float" and bits == 4 and strategy == "tensor_group" and group == 16:
        fmt = "nvfp4"
    elif kind == "float" and bits == 4 and strategy == "group" and group == 32 and "uint8" in str(w.get("scale_dtype")):
        fmt = "mxfp4"
    else:
        raise QuantConfigError(f"{where}: weights of type={kind!r} num_bits={bits} strategy={strategy!r} "
                               f"group_size={group} are not supported; supported: int 4 / 8 bits (tensor, channel, "
                               "group), float 8 (tensor, channel, group, block), float 4 tensor_group 16 (NVFP4), "
                               "float 4 group 32 with uint8 exponent scales (MXFP4)")
    if not symmetric and kind != "int":
        raise QuantConfigError(f"{where}: asymmetric {kind} weights are not supported")
    if strategy == "group" and not group:
        raise QuantConfigError(f"{where}: strategy 'group' needs a group_size")
    if act:
        a_kind, a_bits = act.get("type", "int"), int(act.get("num_bits", 8))
        if not act.get("dynamic") or act.get("dynamic") == "local":
            raise QuantConfigError(f"{where}: static activation scales (dynamic={act.get('dynamic')!r}) are not "
                                   "supported; dynamic per-token int8 or fp8 activations are")
        if act.get("strategy") != "token" or a_bits != 8 or not act.get("symmetric", True):
            raise QuantConfigError(f"{where}: input activations {a_kind} {a_bits}-bit strategy={act.get('strategy')!r} "
                                   "are not supported; dynamic symmetric per-token 8-bit are")
        if a_kind == "int" and fmt == "int8" and symmetric and strategy in ("tensor", "channel"):
            fmt = "w8a8"
        elif a_kind == "float" and fmt == "fp8_e4m3" and strategy in ("tensor", "channel"):
            fmt = "w8a8_fp8"
        else:
            raise QuantConfigError(f"{where}: {a_kind} 8-bit activations with {fmt} {strategy} weights are not "
                                   "supported; int8 activations go with symmetric per-channel int8 weights, fp8 "
                                   "activations with per-channel or per-tensor fp8 weights")
    expect = {"int4": ("pack-quantized",), "int8": ("pack-quantized", "int-quantized", "naive-quantized"),
              "w8a8": ("pack-quantized", "int-quantized", "naive-quantized"),
              "fp8_e4m3": ("float-quantized", "naive-quantized"), "w8a8_fp8": ("float-quantized", "naive-quantized"),
              "nvfp4": ("nvfp4-pack-quantized",), "mxfp4": ("mxfp4-pack-quantized",)}[fmt]
    if storage not in expect:
        raise QuantConfigError(f"{where}: {fmt} weights stored as {storage!r}; expected {' or '.join(expect)}")
    return ModuleScheme(fmt=fmt, storage=storage, num_bits=bits, strategy=strategy,
                        group_size=group, block=block, symmetric=symmetric)


# ----------------------------------------------------------------------------- reading

def _unpack_int32(packed: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """int32 words holding b-bit unsigned fields (value i at bits b*i of its word, little-endian)
    -> uint8 values, `count` of them along `axis`."""
    words = np.moveaxis(np.asarray(packed).astype("<i4"), axis, -1)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    vals = (words.view(np.uint32)[..., None] >> shifts) & ((1 << bits) - 1)
    vals = vals.reshape(*words.shape[:-1], -1)[..., :count].astype(np.uint8)
    return np.moveaxis(vals, -1, axis)


def _scale_rows(scale: np.ndarray, s: ModuleScheme, n: int, k: int, where: str) -> np.ndarray:
    """A stored scale (tensor [1], channel [N, 1], group [N, K/g], block [N/bn, K/bk], nvfp4 [N, K/16],
    mxfp4 [N, K/32]) -> [N, K/g] (float32; the 4-bit float formats keep their stored float8 scales or
    exponent bytes)."""
    scale = np.asarray(scale)
    if s.fmt not in ("nvfp4", "mxfp4"):
        scale = scale.astype(np.float32)
    if s.strategy == "tensor":
        return np.broadcast_to(scale.reshape(1, 1), (n, 1)).copy()
    if s.strategy == "block":
        bn, bk = s.block or (None, None)
        if not bn or k % bk or scale.shape != (-(-n // bn), k // bk):
            raise QuantConfigError(f"{where}: block scale of shape {scale.shape} does not fit blocks {s.block} "
                                   f"of a [{n}, {k}] weight")
        return np.repeat(scale, bn, axis=0)[:n]
    groups = 1 if s.strategy == "channel" else k // (s.group_size or k)
    if s.strategy in ("group", "tensor_group") and k % s.group_size:
        raise QuantConfigError(f"{where}: group_size={s.group_size} does not divide {k} input features")
    if scale.shape != (n, groups):
        raise QuantConfigError(f"{where}: weight_scale has shape {scale.shape}, expected {(n, groups)}")
    return scale


def read_linear(get, name: str, n: int, k: int, s: ModuleScheme, has=lambda _: False) -> QuantWeight:
    """The projection `name` ([N, K] in HF order) stored as scheme s; get(tensor name) reads a tensor,
    has(tensor name) says whether the checkpoint holds an optional tensor (GPTQ's g_idx)."""
    where = name
    if s.storage in PACKED_STORAGE:
        return _read_packed_ints(get, has, name, n, k, s)
    if s.fmt in ("nvfp4", "mxfp4"):
        data = np.asarray(get(name + ".weight_packed"))
        if data.shape != (n, k // 2) or data.dtype != np.uint8:
            raise QuantConfigError(f"{where}: weight_packed is {data.dtype} {data.shape}, expected uint8 {(n, k // 2)}")
        scale = _scale_rows(get(name + ".weight_scale"), s, n, k, where)
        if s.fmt == "mxfp4":
            if scale.dtype != np.uint8:
                raise QuantConfigError(f"{where}: MXFP4 weight_scale is {scale.dtype}, expected uint8 exponents")
            return QuantWeight(data=jnp.asarray(data), scale=jnp.asarray(scale), fmt="mxfp4")
        scale = scale.astype(jnp.float8_e4m3fn)
        glob = np.asarray(get(name + ".weight_global_scale"), np.float32).reshape(())
        return QuantWeight(data=jnp.asarray(data), scale=jnp.asarray(scale),
                           tensor_scale=jnp.asarray(1.0 / glob, jnp.float32), fmt="nvfp4")
    scale = _scale_rows(get(name + ".weight_scale"), s, n, k, where)
    bits = s.num_bits
    if s.storage == "pack-quantized":
        packed = np.asarray(get(name + ".weight_packed"))
        if packed.shape != (n, -(-k * bits // 32)):
            raise QuantConfigError(f"{where}: weight_packed has shape {packed.shape}, expected {(n, -(-k * bits // 32))}")
        offset = _unpack_int32(packed, bits, k, axis=1)  # q + 2^(b-1), uint8 [N, K]
    else:
        q = np.asarray(get(name + ".weight"))
        if q.shape != (n, k):
            raise QuantConfigError(f"{where}: weight has shape {q.shape}, expected {(n, k)}")
        if s.fmt in ("fp8_e4m3", "w8a8_fp8"):
            return QuantWeight(data=jnp.asarray(q.astype(jnp.float8_e4m3fn)), scale=jnp.asarray(scale), fmt=s.fmt)
        offset = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    zp = None
    if not s.symmetric:
        zp = np.asarray(get(name + ".weight_zero_point"))
        if zp.dtype == np.int32 and zp.shape[0] != n:  # packed along N
            zp = _unpack_int32(zp, bits, n, axis=0).astype(np.int32) - (1 << (bits - 1))
        zp = _scale_rows(zp, s, n, k, where + ".weight_zero_point")
    return _integer_weight(offset, zp, scale, s.fmt)


def _integer_weight(offset: np.ndarray, zp: np.ndarray | None, scale: np.ndarray, fmt: str,
                    perm: np.ndarray | None = None) -> QuantWeight:
    """An int4 / int8 QuantWeight from codes `offset` (uint8 [N, K], the signed value + 2^(b-1)),
    signed zero points zp [N, K/g] (None: symmetric), value = (offset - 2^(b-1) - zp) * scale."""
    bits = 8 if fmt in ("int8", "w8a8") else 4
    zero = None if zp is None else -(((1 << (bits - 1)) if bits == 4 else 0) + zp) * scale  # int4 keeps offsets
    if bits == 8:
        data = (offset ^ 0x80).view(np.int8)  # two's complement
    else:
        nib = offset if zero is not None else offset ^ 0x8  # unsigned with a zero point, else two's complement
        data = kvf.pack_nibbles(jnp.asarray(nib))
    return QuantWeight(data=jnp.asarray(data), scale=jnp.asarray(scale, jnp.float32),
                       zero=None if zero is None else jnp.asarray(zero, jnp.float32),
                       input_perm=None if perm is None else jnp.asarray(perm, jnp.int32), fmt=fmt)


AWQ_COLUMNS = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # column c of a word's eight sits in field AWQ_COLUMNS[c]


def _read_packed_ints(get, has, name: str, n: int, k: int, s: ModuleScheme) -> QuantWeight:
    """A GPTQ or AWQ projection (`name`.qweight, .qzeros, .scales, GPTQ's .g_idx), value =
    (q - z) * s per group of input features:

      GPTQ  qweight int32 [K*b/32, N]: b-bit codes packed along K (value i at bits b*i);
            qzeros int32 [K/g, N*b/32] packed along N, each zero point minus one in the "gptq"
            (v1) format, as it is in "gptq_v2"; scales [K/g, N]; g_idx int32 [K]: each input
            feature's group (activation order: not k // g; the features are then sorted by group
            and x is permuted to match, `QuantWeight.input_perm`).
      AWQ   qweight int32 [K, N/8], qzeros int32 [K/g, N/8]: 4-bit codes packed along N, the eight
            of a word in the order 0, 2, 4, 6, 1, 3, 5, 7; scales [K/g, N].

    A GPTQ projection whose zero points are all 2^(b-1) (sym=True) becomes a symmetric QuantWeight."""
    bits, g = s.num_bits, s.group_size or k
    if k % g:
        raise QuantConfigError(f"{name}: group_size={g} does not divide {k} input features")
    groups = k // g

    def read(t: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(get(f"{name}.{t}"))
        if arr.shape != shape:
            raise QuantConfigError(f"{name}.{t} has shape {arr.shape}, expected {shape}")
        return arr

    scale = read("scales", (groups, n)).astype(np.float32).T  # [N, K/g]
    perm = None
    if s.storage == "awq":
        if n % 8:
            raise QuantConfigError(f"{name}: AWQ packs 8 output features per word; {n} is not a multiple of 8")
        def columns(words):  # [R, N/8] -> [R, N]
            fields = _unpack_int32(words, 4, n, axis=1).reshape(words.shape[0], n // 8, 8)
            return fields[:, :, AWQ_COLUMNS].reshape(words.shape[0], n)
        codes = columns(read("qweight", (k, n // 8))).T  # [N, K]
        z = columns(read("qzeros", (groups, n // 8))).T.astype(np.int32)  # [N, K/g]
    else:
        codes = _unpack_int32(read("qweight", (-(-k * bits // 32), n)), bits, k, axis=0).T  # [N, K]
        z = _unpack_int32(read("qzeros", (groups, -(-n * bits // 32))), bits, n, axis=1).T.astype(np.int32)
        if s.storage == "gptq":
            z = z + 1
        natural = np.arange(k) // g
        g_idx = read("g_idx", (k,)).astype(np.int64) if has(f"{name}.g_idx") else natural
        if not np.array_equal(g_idx, natural):
            perm = np.argsort(g_idx, kind="stable")
            if not np.array_equal(g_idx[perm], natural):
                raise QuantConfigError(f"{name}.g_idx does not give each of the {groups} groups {g} input features")
            codes = codes[:, perm]
    mid = 1 << (bits - 1)
    zp = None if np.all(z == mid) else z - mid
    return _integer_weight(codes.astype(np.uint8), zp, scale, s.fmt, perm)


def fuse(parts: list[QuantWeight | None]) -> QuantWeight | None:
    """Stack the rows of a fused projection's parts into one QuantWeight, or None when they cannot
    share one (different formats, groups or scale layouts, or a part stored dense)."""
    if any(p is None for p in parts):
        return None
    first = parts[0]
    same = all(p.fmt == first.fmt and p.group == first.group and p.scale.dtype == first.scale.dtype
               and (p.zero is None) == (first.zero is None) and (p.input_perm is None) == (first.input_perm is None)
               and (p.input_perm is None or np.array_equal(p.input_perm, first.input_perm)) for p in parts)
    if not same:  # different formats, groups, or activation orders: no shared x
        return None
    tensor_scale = None
    if first.tensor_scale is not None:
        ts = [np.asarray(p.tensor_scale, np.float32) for p in parts]
        if all(t.size == 1 and t.reshape(()) == ts[0].reshape(()) for t in ts):
            tensor_scale = jnp.asarray(ts[0].reshape(()))
        else:
            rows = [np.broadcast_to(t.reshape(-1, 1), (p.data.shape[0], 1)) for t, p in zip(ts, parts)]
            tensor_scale = jnp.asarray(np.concatenate(rows))
    cat = lambda f: None if getattr(first, f) is None else jnp.concatenate([getattr(p, f) for p in parts])  # noqa: E731
    return QuantWeight(data=cat("data"), scale=cat("scale"), zero=cat("zero"), tensor_scale=tensor_scale,
                       input_perm=first.input_perm, fmt=first.fmt)


# ----------------------------------------------------------------------------- writing

def _pack_int32(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """uint8 b-bit values -> int32 words along `axis` (inverse of `_unpack_int32`)."""
    vals = np.moveaxis(vals.astype(np.uint32), axis, -1)
    per = 32 // bits
    pad = -vals.shape[-1] % per
    vals = np.pad(vals, [(0, 0)] * (vals.ndim - 1) + [(0, pad)]).reshape(*vals.shape[:-1], -1, per)
    words = np.bitwise_or.reduce(vals << (np.arange(per, dtype=np.uint32) * bits), axis=-1)
    return np.moveaxis(words.view(np.int32), -1, axis)


def split_rows(q: QuantWeight, sizes: list[int]) -> list[QuantWeight]:
    """A fused projection's parts (consecutive output features, `sizes` of them)."""
    cuts = np.cumsum(sizes)[:-1].tolist()
    rows = lambda a: jnp.split(a, cuts) if a is not None and a.ndim == 2 else [a] * len(sizes)  # noqa: E731
    return [QuantWeight(data=d, scale=s, zero=z, tensor_scale=t, input_scale=q.input_scale, input_perm=q.input_perm,
                        fmt=q.fmt)
            for d, s, z, t in zip(rows(q.data), rows(q.scale), rows(q.zero), rows(q.tensor_scale))]


def encode(q: QuantWeight, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """One projection in compressed-tensors' tensors (`name`.weight_packed / weight / weight_scale ...)
    and its config group (format, weights, input_activations), or QuantConfigError when the format
    has no compressed-tensors equivalent."""
    if q.input_scale is not None:
        raise QuantConfigError(f"{name}: AWQ's run-time input scales have no compressed-tensors field; export a "
                               "GPTQ or RTN model, or the dense one")
    if q.input_perm is not None:
        raise QuantConfigError(f"{name}: groups in activation order (a GPTQ checkpoint's g_idx) are not exported; "
                               "export the dense model")
    n, k = q.shape[1], q.shape[0]
    scale = np.asarray(q.scale)
    strategy = {"strategy": "channel", "group_size": None} if q.group == k else {"strategy": "group", "group_size": q.group}
    act = None
    if q.fmt == "mxfp4":
        weights = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                   "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
        return ({"weight_packed": np.asarray(q.data), "weight_scale": scale},
                {"format": "mxfp4-pack-quantized", "weights": weights, "input_activations": None})
    if q.fmt == "nvfp4":
        ts = np.asarray(q.tensor_scale, np.float32).reshape(-1)
        if np.any(ts != ts[0]):
            raise QuantConfigError(f"{name}: NVFP4 tensor scales differ within one projection")
        tensors = {"weight_packed": np.asarray(q.data), "weight_scale": scale,
                   "weight_global_scale": np.asarray([1.0 / ts[0]], np.float32)}
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                   "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
        return tensors, {"format": "nvfp4-pack-quantized", "weights": weights, "input_activations": None}
    if q.fmt in ("fp8_e4m3", "w8a8_fp8"):
        tensors = {"weight": np.asarray(q.data), "weight_scale": scale}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, **strategy}
        if q.fmt == "w8a8_fp8":
            act = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        return tensors, {"format": "float-quantized", "weights": weights, "input_activations": act}
    bits = 8 if q.fmt in ("int8", "w8a8") else 4
    weights = {"num_bits": bits, "type": "int", "symmetric": q.zero is None, **strategy}
    if bits == 8:
        signed = np.asarray(q.data).view(np.int8).astype(np.int16)
    else:
        nib = np.asarray(kvf.unpack_nibbles(q.data))
        signed = nib - 8 if q.zero is not None else np.where(nib >= 8, nib - 16, nib)
    tensors = {"weight_scale": scale}
    if q.zero is not None:
        offset = (1 << (bits - 1)) if bits == 4 else 0
        zp = -np.asarray(q.zero, np.float64) / scale - offset
        if np.abs(zp - np.round(zp)).max() > 1e-3:
            raise QuantConfigError(f"{name}: zero points are not integers; compressed-tensors stores integer ones")
        tensors["weight_zero_point"] = _pack_int32((np.round(zp).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8),
                                                   bits, axis=0)
    if q.fmt == "w8a8":
        tensors["weight"] = signed.astype(np.int8)
        act = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
        return tensors, {"format": "int-quantized", "weights": weights, "input_activations": act}
    tensors["weight_packed"] = _pack_int32((signed + (1 << (bits - 1))).astype(np.uint8), bits, axis=1)
    tensors["weight_shape"] = np.asarray([n, k], np.int64)
    return tensors, {"format": "pack-quantized", "weights": weights, "input_activations": None}


def quantization_config(schemes: dict[str, dict], dense: list[str]) -> dict:
    """config.json's quantization_config for modules {name: config group} (from `encode`), the
    `dense` Linear modules ignored."""
    groups: dict[str, dict] = {}
    for name, g in schemes.items():
        key = repr(sorted((k, repr(v)) for k, v in g.items()))
        groups.setdefault(key, {**g, "targets": []})["targets"].append(name)
    config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
    formats = {g["format"] for g in config_groups.values()}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(dense),
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}
