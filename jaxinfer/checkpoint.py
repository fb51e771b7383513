"""Checkpoints: HF safetensors directories in and out, orbax for our own.

Tensors are read one at a time from the (lazily opened) safetensors files and
converted straight into the model's layout, so loading never holds two full
copies of the weights.
Every way a directory can be wrong (missing, truncated, mis-shaped, unsupported)
raises CheckpointError with one line naming the file, tensor or value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxinfer import hf_quant
from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.model import LayerWeights, Weights, dense_layout, layer_shapes
from jaxinfer.wquant import stack_experts, take_expert

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A model directory or file that cannot be loaded."""


# ----------------------------------------------------------------------------- safetensors


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]):
    """Write numpy tensors (bf16 through ml_dtypes) as one safetensors file."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def save_sharded(out_dir: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int):
    """Write model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(out_dir / fname, shard)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


RAW_DTYPES = {"F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}


def _read_raw(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file read from its header (8-byte length, JSON, then the data),
    for the dtypes that safetensors' numpy reader cannot name (RAW_DTYPES)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
        if info["dtype"] not in RAW_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        fh.seek(8 + n + start)
        buf = fh.read(end - start)
    return np.frombuffer(buf, jnp.dtype(RAW_DTYPES[info["dtype"]])).reshape(info["shape"])


# Where a vision-language checkpoint keeps its language model: Gemma 3 4B-27B as the Hub holds them
# (and transformers writes them), and as transformers 4.52-4.5x named them in memory
TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                       "language_model.lm_head.": "lm_head."}
# Other architectures' top-level names as Llama's: GPT-NeoX's (the Hub's; transformers 5 reads
# embed_out as lm_head), Phi-2's final norm
HUB_PREFIXES = {"GPTNeoXForCausalLM": {"gpt_neox.layers.": "model.layers.", "gpt_neox.embed_in.": "model.embed_tokens.",
                                       "gpt_neox.final_layer_norm.": "model.norm.", "embed_out.": "lm_head."},
                "PhiForCausalLM": {"model.final_layernorm.": "model.norm."}}
RENAMES = {stored: ours for prefixes in HUB_PREFIXES.values() for stored, ours in prefixes.items()}


def _text_model_name(name: str) -> tuple[str, tuple[str, str] | None]:
    """A tensor's name in Llama's layout of the text-only model (`TEXT_MODEL_PREFIXES`,
    `HUB_PREFIXES`), and the (stored, ours) prefix pair that renamed it (None: unchanged)."""
    for prefix, text in (TEXT_MODEL_PREFIXES | RENAMES).items():
        if name.startswith(prefix):
            return text + name[len(prefix):], (prefix, text)
    return name, None


def _hub_name(cfg: ModelConfig, name: str) -> str:
    """A tensor or module name as the architecture's checkpoints spell it (`HUB_PREFIXES` backwards;
    Llama's layout where it has none)."""
    for prefix, ours in HUB_PREFIXES.get(cfg.architecture, {}).items():
        if name.startswith(ours):
            return prefix + name[len(ours):]
    return name


class TensorSource:
    """All tensors of a model directory, across shards, by name."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs 'weight_map')") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise CheckpointError(f"{model_dir / missing[0]}: shard listed in {index.name} is missing")
        elif single.is_file():
            files = [single.name]
        else:
            raise CheckpointError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                f"(found: {', '.join(sorted(p.name for p in model_dir.iterdir())) or 'nothing'})")
        self.paths = {f: model_dir / f for f in files}
        self.files = {f: _open_safetensors(p) for f, p in self.paths.items()}
        self.where, self.stored = {}, {}  # text model's name -> file, -> the name stored there
        self.renamed: dict[str, str] = {}  # our prefix -> the stored one, for the prefixes this checkpoint renames
        for f, h in self.files.items():
            for name in h.keys():
                text, renamed = _text_model_name(name)
                self.where[text], self.stored[text] = f, name
                if renamed is not None:
                    self.renamed[renamed[1]] = renamed[0]
        self.model_dir = model_dir

    def stored_module(self, name: str) -> str:
        """A module's name as this checkpoint spells it (what its quantization config names)."""
        dotted = name + "."  # the prefixes end with ".": "lm_head." also covers module "lm_head"
        for ours, stored in self.renamed.items():
            if dotted.startswith(ours):
                return (stored + dotted[len(ours):])[:-1]
        return name

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name` (in Llama's layout: see `_text_model_name`), checked against `shape`
        when given."""
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing")
        name = self.stored[name]
        try:
            arr = self.files[f].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.paths[f]}: tensor {name!r} cannot be read ({e})") from None
        except AttributeError:  # a dtype numpy lacks (float8): safetensors looks it up on numpy
            arr = _read_raw(self.paths[f], name)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.paths[f]}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"config expects {tuple(shape)}")
        return arr

    def close(self):
        self.files.clear()


# ----------------------------------------------------------------------------- HF <-> Weights

def _hf_layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """HF tensor (or module) names of layer i's fields. With sandwich norms (Gemma 2 / 3, OLMo 2)
    post_attention_layernorm is the norm after attention, and pre_feedforward_layernorm the
    MLP's input norm (Gemma), which Llama calls post_attention_layernorm."""
    p = f"model.layers.{i}."
    names = {
        "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj", "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight", "gate": p + "mlp.gate_proj", "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj", "qkv": p + "self_attn.qkv_proj", "gate_up": p + "mlp.gate_up_proj",
    }
    if cfg.architecture == "GPTNeoXForCausalLM":
        names.update(qkv=p + "attention.query_key_value", o=p + "attention.dense", up=p + "mlp.dense_h_to_4h",
                     down=p + "mlp.dense_4h_to_h")
    elif cfg.architecture == "PhiForCausalLM":
        names.update(o=p + "self_attn.dense", up=p + "mlp.fc1", down=p + "mlp.fc2")
    elif not cfg.gated_mlp:  # StarCoder2: c_fc (up), c_proj (down)
        names.update(up=p + "mlp.c_fc", down=p + "mlp.c_proj")
    if cfg.shared_input_norm:  # Phi-2, Cohere: one input norm, held twice
        names["mlp_norm"] = names["attn_norm"]
    if cfg.sandwich_norms and cfg.architecture == "Glm4ForCausalLM":
        names.update(post_attn_norm=p + "post_self_attn_layernorm.weight",
                     post_mlp_norm=p + "post_mlp_layernorm.weight")
    elif cfg.sandwich_norms:
        names.update(mlp_norm=p + "pre_feedforward_layernorm.weight",
                     post_attn_norm=p + "post_attention_layernorm.weight",
                     post_mlp_norm=p + "post_feedforward_layernorm.weight")
    if cfg.is_moe_layer(i):  # the router, expert j's (gate, up, down), and Qwen2-MoE's shared expert
        if cfg.architecture == "MixtralForCausalLM":
            m = p + "block_sparse_moe."
            names.update(router=m + "gate.weight", experts=m + "experts.",
                         expert=tuple(m + "experts.{j}." + w for w in ("w1", "w3", "w2")))
        else:
            m = p + "mlp."
            names.update(router=m + "gate.weight", experts=m + "experts.",
                         expert=tuple(m + "experts.{j}." + w for w in ("gate_proj", "up_proj", "down_proj")),
                         gate=m + "shared_expert.gate_proj", up=m + "shared_expert.up_proj",
                         down=m + "shared_expert.down_proj", shared_gate=m + "shared_expert_gate.weight")
    return names


def _projection_parts(cfg: ModelConfig, nm: dict, f: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The HF modules that wqkv and w_gate_up stack, in column order, with their output widths:
    q / k / v, or the one module where the checkpoint fuses them (Phi-3, GPT-NeoX); gate / up, the
    one fused module (Phi-3, GLM), or up alone for an ungated MLP (f: the MLP's width)."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = ([(nm["qkv"], (n + 2 * k) * h)] if cfg.fused_qkv else
           [(nm["q"], n * h), (nm["k"], k * h), (nm["v"], k * h)])
    gate_up = ([(nm["up"], f)] if not cfg.gated_mlp else
               [(nm["gate_up"], 2 * f)] if cfg.fused_gate_up else [(nm["gate"], f), (nm["up"], f)])
    return qkv, gate_up


def linear_modules(cfg: ModelConfig) -> list[str]:
    """The names (last component) of a dense layer's Linear modules as the checkpoint spells them:
    the modules a PEFT adapter of this model can target."""
    nm = _hf_layer_names(cfg, 0)
    qkv, gate_up = _projection_parts(cfg, nm, cfg.intermediate_size)
    return [m.rsplit(".", 1)[1] for m, _ in [*qkv, (nm["o"], 0), *gate_up, (nm["down"], 0)]]


def _bias_of(weight_name: str) -> str:
    """A norm's shift beside its scale: "....weight" -> "....bias"."""
    return weight_name.removesuffix("weight") + "bias"


def _linear(src: TensorSource, parts: list[tuple[str, int, int]], quant):
    """A projection from its HF Linear parts [(module, out, in)] (several for q/k/v and gate/up):
    a dense [K, N] array in our layout, or a QuantWeight when the checkpoint stores it quantized
    (`hf_quant`; parts that cannot share one QuantWeight are dequantized into the dense matrix)."""
    schemes = [quant.scheme_of(src.stored_module(m)) if quant is not None else None for m, _, _ in parts]
    if all(s is None for s in schemes):
        if len(parts) == 1:
            return src.get(parts[0][0] + ".weight", parts[0][1:]).T
        return np.concatenate([src.get(m + ".weight", (n, k)) for m, n, k in parts], axis=0).T
    qs = [None if s is None else hf_quant.read_linear(src.get, m, n, k, s, has=src.where.__contains__)
          for (m, n, k), s in zip(parts, schemes)]
    fused = hf_quant.fuse(qs)
    if fused is not None:
        return fused
    rows = [np.asarray(src.get(m + ".weight", (n, k)), np.float32) if q is None else np.asarray(q.dense()).T
            for (m, n, k), q in zip(parts, qs)]
    return np.concatenate(rows, axis=0).T


def _hf_tensors_of_layer(cfg: ModelConfig, src: TensorSource, i: int, quant=None) -> Iterator[tuple[str, object]]:
    """(field, array in our layout, or QuantWeight) for layer i; HF Linear weights are [out, in]."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    nm = _hf_layer_names(cfg, i)
    if cfg.input_norms:
        yield "attn_norm", src.get(nm["attn_norm"], (d,))
        yield "mlp_norm", src.get(nm["mlp_norm"], (d,))
        if cfg.norm_style == "layernorm":
            yield "attn_norm_bias", src.get(_bias_of(nm["attn_norm"]), (d,))
            yield "mlp_norm_bias", src.get(_bias_of(nm["mlp_norm"]), (d,))
    if cfg.sandwich_norms:
        yield "post_attn_norm", src.get(nm["post_attn_norm"], (d,))
        yield "post_mlp_norm", src.get(nm["post_mlp_norm"], (d,))
    if cfg.is_moe_layer(i):
        f = cfg.shared_expert_intermediate_size
    qkv, gate_up = _projection_parts(cfg, nm, f)
    yield "wqkv", _linear(src, [(m, width, d) for m, width in qkv], quant)
    yield "wo", _linear(src, [(nm["o"], d, n * h)], quant)
    if cfg.is_moe_layer(i):
        yield from _hf_experts(cfg, src, nm, quant)
    if f:
        yield "w_gate_up", _linear(src, [(m, width, d) for m, width in gate_up], quant)
        yield "w_down", _linear(src, [(nm["down"], d, f)], quant)
    if cfg.qkv_bias:
        yield "bqkv", np.concatenate([src.get(m + ".bias", (width,)) for m, width in qkv])
    if cfg.o_bias:
        yield "bo", src.get(nm["o"] + ".bias", (d,))
    if cfg.qk_norm:
        yield "q_norm", src.get(nm["q_norm"], (n * h,) if cfg.qk_norm_full else (h,))
        yield "k_norm", src.get(nm["k_norm"], (k * h,) if cfg.qk_norm_full else (h,))
    if cfg.mlp_bias:
        yield "b_gate_up", np.concatenate([src.get(m + ".bias", (width,)) for m, width in gate_up])
        yield "b_down", src.get(nm["down"] + ".bias", (d,))


def _hf_experts(cfg: ModelConfig, src: TensorSource, nm: dict, quant=None) -> Iterator[tuple[str, object]]:
    """A MoE layer's router and stacked experts in our layout, from the Hub's one tensor per expert
    and projection (each expert's projections quantized or not, as the checkpoint stores them:
    `_linear`; stacked into one QuantWeight when every expert's is one), or from transformers'
    fused experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F]."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    yield "router", src.get(nm["router"], (e, d)).T
    fused = nm["experts"] + "gate_up_proj"
    if fused in src.where:
        yield "experts_gate_up", np.swapaxes(src.get(fused, (e, 2 * f, d)), 1, 2)
        yield "experts_down", np.swapaxes(src.get(nm["experts"] + "down_proj", (e, d, f)), 1, 2)
    else:
        gate, up, down = nm["expert"]
        yield "experts_gate_up", _stack([_linear(src, [(gate.format(j=j), f, d), (up.format(j=j), f, d)], quant)
                                         for j in range(e)])
        yield "experts_down", _stack([_linear(src, [(down.format(j=j), d, f)], quant) for j in range(e)])
    if cfg.shared_expert_intermediate_size:
        yield "shared_gate", src.get(nm["shared_gate"], (1, d)).T


def _stack(experts: list) -> object:
    """Each expert's projection (dense [K, N] arrays or QuantWeights) stacked along a new first axis;
    dequantized into a dense stack when they are not all QuantWeights of one kind."""
    if all(isinstance(w, hf_quant.QuantWeight) for w in experts):
        try:
            return stack_experts(experts)
        except ValueError:
            pass
    return np.stack([np.asarray(w.dense()) if isinstance(w, hf_quant.QuantWeight) else w for w in experts])


def _to_device(arr, dtype):
    # One tensor at a time: the mmap view is converted straight to the target dtype. Quantized
    # projections stay as the checkpoint stores them.
    if isinstance(arr, hf_quant.QuantWeight):
        return arr
    return jnp.asarray(np.asarray(arr, dtype=jnp.dtype(dtype)))


def load_weights(model_dir: Path, cfg: ModelConfig, dtype=jnp.float32,
                 quant: "hf_quant.CompressedTensors | hf_quant.PackedInts | None" = None) -> Weights:
    """Read an HF safetensors checkpoint into Weights of the given dtype (the projections that
    `quant`, its quantization config, says are quantized as QuantWeights)."""
    src = TensorSource(model_dir)
    try:
        layers = []
        for i in range(cfg.num_layers):
            fields = {name: _to_device(arr, dtype) for name, arr in _hf_tensors_of_layer(cfg, src, i, quant)}
            layers.append(LayerWeights(**fields))
        embed = _to_device(src.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)), dtype)
        final_norm = _to_device(src.get("model.norm.weight", (cfg.hidden_size,)), dtype)
        final_bias = (_to_device(src.get("model.norm.bias", (cfg.hidden_size,)), dtype)
                      if cfg.norm_style == "layernorm" else None)
        lm_head = None
        if not cfg.tie_word_embeddings:
            lm_head = _to_device(_linear(src, [("lm_head", cfg.vocab_size, cfg.hidden_size)], quant), dtype)
        head_bias = _to_device(src.get("lm_head.bias", (cfg.vocab_size,)), dtype) if cfg.lm_head_bias else None
    except hf_quant.QuantConfigError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    finally:
        src.close()
    return Weights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head, final_norm_bias=final_bias,
                   lm_head_bias=head_bias)


def _put_linear(out: dict, schemes: dict, parts: list[tuple[str, int]], w, cast):
    """A (fused) projection into HF tensors: its parts [(module, out_features)] dense ("module.weight"),
    or, for a QuantWeight, in compressed-tensors' tensors with each part's config group in `schemes`."""
    if isinstance(w, hf_quant.QuantWeight):
        for (m, _), q in zip(parts, hf_quant.split_rows(w, [n for _, n in parts])):
            tensors, schemes[m] = hf_quant.encode(q, m)
            out.update({f"{m}.{name}": arr for name, arr in tensors.items()})
        return
    rows = np.split(cast(w).T, np.cumsum([n for _, n in parts])[:-1].tolist(), axis=0)
    out.update({m + ".weight": r for (m, _), r in zip(parts, rows)})


def _split_bias(parts: list[tuple[str, int]], bias: np.ndarray) -> dict[str, np.ndarray]:
    """A fused field's bias as its modules' ("module.bias": its rows)."""
    widths = [width for _, width in parts]
    return {m + ".bias": b for (m, _), b in zip(parts, np.split(bias, np.cumsum(widths)[:-1]))}


def hf_state_dict(cfg: ModelConfig, weights: Weights, dtype=None) -> tuple[dict[str, np.ndarray], dict]:
    """Weights -> HF tensor names and layouts (numpy), for export, and the compressed-tensors
    config group of each quantized projection ({module: group}, empty for a dense model)."""
    weights = dense_layout(weights)
    cast = (lambda x: np.asarray(x, dtype=jnp.dtype(dtype))) if dtype else np.asarray
    out = {"model.embed_tokens.weight": cast(weights.embed)}
    schemes: dict[str, dict] = {}
    for i, layer in enumerate(weights.layers):
        nm = _hf_layer_names(cfg, i)
        if layer.attn_norm is not None:
            out[nm["attn_norm"]] = cast(layer.attn_norm)
        if layer.attn_norm_bias is not None:
            out[_bias_of(nm["attn_norm"])], out[_bias_of(nm["mlp_norm"])] = map(
                cast, (layer.attn_norm_bias, layer.mlp_norm_bias))
        # a dense MLP's width, or a MoE layer's shared expert's (w_down [F, D], also as a QuantWeight)
        qkv, gate_up = _projection_parts(cfg, nm, 0 if layer.w_down is None else layer.w_down.shape[0])
        _put_linear(out, schemes, qkv, layer.wqkv, cast)
        _put_linear(out, schemes, [(nm["o"], cfg.hidden_size)], layer.wo, cast)
        if layer.mlp_norm is not None:
            out[nm["mlp_norm"]] = cast(layer.mlp_norm)
        if layer.w_gate_up is not None:
            _put_linear(out, schemes, gate_up, layer.w_gate_up, cast)
            _put_linear(out, schemes, [(nm["down"], cfg.hidden_size)], layer.w_down, cast)
        if layer.router is not None:
            out[nm["router"]] = cast(layer.router).T
            gate, up, down = nm["expert"]
            fe = cfg.moe_intermediate_size
            for j in range(cfg.num_experts):  # the Hub's layout: one tensor per expert and projection
                _put_linear(out, schemes, [(gate.format(j=j), fe), (up.format(j=j), fe)],
                            take_expert(layer.experts_gate_up, j), cast)
                _put_linear(out, schemes, [(down.format(j=j), cfg.hidden_size)], take_expert(layer.experts_down, j),
                            cast)
            if layer.shared_gate is not None:
                out[nm["shared_gate"]] = cast(layer.shared_gate).T
        if layer.bqkv is not None:
            out.update(_split_bias(qkv, cast(layer.bqkv)))
        if layer.bo is not None:
            out[nm["o"] + ".bias"] = cast(layer.bo)
        if layer.q_norm is not None:
            out[nm["q_norm"]], out[nm["k_norm"]] = cast(layer.q_norm), cast(layer.k_norm)
        if layer.b_gate_up is not None:
            out.update(_split_bias(gate_up, cast(layer.b_gate_up)))
            out[nm["down"] + ".bias"] = cast(layer.b_down)
        if layer.post_attn_norm is not None:
            out[nm["post_attn_norm"]], out[nm["post_mlp_norm"]] = cast(layer.post_attn_norm), cast(layer.post_mlp_norm)
    out["model.norm.weight"] = cast(weights.final_norm)
    if weights.final_norm_bias is not None:
        out["model.norm.bias"] = cast(weights.final_norm_bias)
    if weights.lm_head is not None:  # a quantized head of tied embeddings is written as an untied one
        _put_linear(out, schemes, [("lm_head", cfg.vocab_size)], weights.lm_head, cast)
    if weights.lm_head_bias is not None:
        out["lm_head.bias"] = cast(weights.lm_head_bias)
    return ({_hub_name(cfg, name): np.ascontiguousarray(a) for name, a in out.items()},
            {_hub_name(cfg, m): group for m, group in schemes.items()})


# The names of Linear modules' weights: Llama's layout, GPT-NeoX's
LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight", "query_key_value.weight", "attention.dense.weight",
                   "dense_h_to_4h.weight", "dense_4h_to_h.weight", "embed_out.weight", "self_attn.dense.weight",
                   "mlp.fc1.weight", "mlp.fc2.weight")


def export_hf(out_dir: str | Path, cfg: ModelConfig, weights: Weights, dtype="bfloat16",
              tokenizer_json: str | Path | None = None, generation_config: dict | None = None,
              max_shard_bytes: int | None = None):
    """Write an HF directory (config.json + safetensors [+ tokenizer]) that transformers loads.

    Quantized projections (QuantWeight) are written in compressed-tensors' format, described by
    config.json's quantization_config (`hf_quant.encode`), which transformers (with the
    compressed-tensors package), vLLM and `load_hf` read; the rest is dense in `dtype`.
    max_shard_bytes: split the weights into shards with an index file, as HF does.
    """
    # Checkpoint layout first: a float32 LLM on CPU holds a tied head as a `TiedHead` copy, which
    # is not a head of its own (tie_word_embeddings below reads weights.lm_head).
    weights = dense_layout(weights)
    try:
        state, schemes = hf_state_dict(cfg, weights, DTYPES[dtype])
    except hf_quant.QuantConfigError as e:
        raise ValueError(f"export_hf: {e}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    if schemes:
        hf_cfg["tie_word_embeddings"] = weights.lm_head is None
        dense = [name[:-len(".weight")] for name in state if name.endswith(LINEAR_SUFFIXES)]
        dense = [m for m in dense if m not in schemes]  # float8 codes are stored as "weight" too
        hf_cfg["quantization_config"] = hf_quant.quantization_config(schemes, dense)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if max_shard_bytes is None:
        save_safetensors(out_dir / "model.safetensors", state)
    else:
        save_sharded(out_dir, state, max_shard_bytes)
    if tokenizer_json is not None:
        (out_dir / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    gen = generation_config or {}
    if cfg.eos_token_ids and "eos_token_id" not in gen:
        gen["eos_token_id"] = list(cfg.eos_token_ids)
    if cfg.bos_token_id is not None and "bos_token_id" not in gen:
        gen["bos_token_id"] = cfg.bos_token_id
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def load_config(model_dir: str | Path) -> ModelConfig:
    """ModelConfig of an HF directory; generation_config.json's eos ids take precedence."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: model directory does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: is a file, expected a model directory")
    try:
        cfg = ModelConfig.from_json(model_dir / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{gen_path}: not valid JSON") from None
        eos = gen.get("eos_token_id")
        if eos is not None:
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    return cfg


def load_hf(model_dir: str | Path, dtype="float32") -> tuple[ModelConfig, Weights]:
    """Config and weights of an HF model directory."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    cfg = load_config(model_dir)
    return cfg, load_weights(Path(model_dir), cfg, DTYPES[dtype], hf_quantization(model_dir))


def hf_quantization(model_dir: str | Path) -> "hf_quant.CompressedTensors | hf_quant.PackedInts | None":
    """The quantization an HF directory's config.json declares (compressed-tensors, GPTQ or AWQ),
    None for a dense checkpoint; any other quantization_config raises CheckpointError."""
    load_config(model_dir)  # a missing directory or config.json, or one that is not JSON: CheckpointError
    path = Path(model_dir) / "config.json"
    try:
        return hf_quant.parse(json.loads(path.read_text()).get("quantization_config"), str(path))
    except hf_quant.QuantConfigError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------- orbax

QUANT_FILE = "quantization.json"  # beside an orbax checkpoint whose projections are quantized
QUANT_ARRAYS = ("data", "scale", "tensor_scale", "input_scale", "zero", "input_perm")  # QuantWeight's array fields


def save_orbax(path: str | Path, cfg: ModelConfig, weights: Weights, quantization: dict | None = None):
    """Save weights with orbax-checkpoint, config.json beside them. Quantized projections
    (`wquant.QuantWeight`) are saved as they are, described in quantization.json (format, group,
    the shapes and dtypes of their arrays, and `quantization`: the settings that made them)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    weights = dense_layout(weights)  # saved as restore_orbax's callers expect, whatever the runtime layout
    modules = _quantized_modules(weights)
    if modules:
        desc = {name: {"fmt": q.fmt,
                       "arrays": {f: [list(getattr(q, f).shape), str(getattr(q, f).dtype)]
                                  for f in QUANT_ARRAYS if getattr(q, f) is not None}}
                for name, q in modules.items()}
        (path / QUANT_FILE).write_text(json.dumps({"quantization": quantization or {}, "modules": desc}, indent=1))
    elif (path / QUANT_FILE).exists():
        (path / QUANT_FILE).unlink()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "weights", weights, force=True)


def restore_orbax(path: str | Path, dtype=None) -> tuple[ModelConfig, Weights]:
    """Restore what save_orbax wrote (dtype: cast the float weights, never quantized codes)."""
    import orbax.checkpoint as ocp
    from jaxinfer.wquant import QuantWeight
    path = Path(path).absolute()
    if not (path / "weights").exists():
        raise CheckpointError(f"{path}: no orbax checkpoint (expected {path / 'weights'})")
    cfg = ModelConfig.from_json(path / "config.json")
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path / "weights")
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        abstract = _abstract_weights(cfg, tree, orbax_quantization(path))
        weights = ckpt.restore(path / "weights", abstract)
    if dtype is not None:
        weights = jax.tree_util.tree_map(lambda x: x if isinstance(x, QuantWeight) else x.astype(dtype), weights,
                                         is_leaf=lambda x: isinstance(x, QuantWeight))
    return cfg, weights


def orbax_quantization(path: str | Path) -> dict | None:
    """quantization.json of an orbax checkpoint, or None (dense)."""
    f = Path(path) / QUANT_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{f}: not valid JSON") from None


def is_orbax_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "weights").is_dir() and not any(path.glob("*.safetensors*"))


def _quantized_modules(weights: Weights) -> dict:
    from jaxinfer.wquant import QUANT_MODULES, QuantWeight
    modules = {f"layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(weights.layers) for n in QUANT_MODULES
               if isinstance(getattr(layer, n), QuantWeight)}
    if isinstance(weights.lm_head, QuantWeight):
        modules["lm_head"] = weights.lm_head
    return modules


def _abstract_weights(cfg: ModelConfig, tree, quant: dict | None = None) -> Weights:
    """ShapeDtypeStructs matching what was saved (dtype read from the metadata; quantized
    projections as quantization.json describes them)."""
    embed = tree.get("embed") if isinstance(tree, dict) else None  # quantized codes may come first
    leaves = [embed] if embed is not None else jax.tree_util.tree_leaves(tree)
    dtype = leaves[0].dtype if leaves and hasattr(leaves[0], "dtype") else jnp.float32
    sds = lambda s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    layers = [LayerWeights(**{n: (None if s is None else sds(s)) for n, s in layer_shapes(cfg, i).items()})
              for i in range(cfg.num_layers)]
    lm_head = None if cfg.tie_word_embeddings else sds((cfg.hidden_size, cfg.vocab_size))
    if quant:
        from jaxinfer.wquant import QuantWeight
        for name, d in quant["modules"].items():
            arrays = {f: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dt)) for f, (shape, dt) in d["arrays"].items()}
            if name == "lm_head":
                lm_head = QuantWeight(**arrays, fmt=d["fmt"])
                continue
            _, i, field = name.split(".")
            layers[int(i)] = layers[int(i)].replace(**{field: QuantWeight(**arrays, fmt=d["fmt"])})
    return Weights(embed=sds((cfg.vocab_size, cfg.hidden_size)), layers=layers,
                   final_norm=sds((cfg.hidden_size,)), lm_head=lm_head,
                   final_norm_bias=sds((cfg.hidden_size,)) if cfg.norm_style == "layernorm" else None,
                   lm_head_bias=sds((cfg.vocab_size,)) if cfg.lm_head_bias else None)
