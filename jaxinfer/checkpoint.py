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

from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.model import LayerWeights, Weights, layer_shapes

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
        self.where = {name: f for f, h in self.files.items() for name in h.keys()}
        self.model_dir = model_dir

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing")
        try:
            arr = self.files[f].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.paths[f]}: tensor {name!r} cannot be read ({e})") from None
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.paths[f]}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"config expects {tuple(shape)}")
        return arr

    def close(self):
        self.files.clear()


# ----------------------------------------------------------------------------- HF <-> Weights

def _hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj", "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight", "gate": p + "mlp.gate_proj", "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj",
    }


def _hf_tensors_of_layer(cfg: ModelConfig, src: TensorSource, i: int) -> Iterator[tuple[str, np.ndarray]]:
    """(field, array in our layout) for layer i; HF Linear weights are [out, in]."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    nm = _hf_layer_names(i)
    yield "attn_norm", src.get(nm["attn_norm"], (d,))
    yield "mlp_norm", src.get(nm["mlp_norm"], (d,))
    yield "wqkv", np.concatenate([src.get(nm["q"] + ".weight", (n * h, d)),
                                  src.get(nm["k"] + ".weight", (k * h, d)),
                                  src.get(nm["v"] + ".weight", (k * h, d))], axis=0).T
    yield "wo", src.get(nm["o"] + ".weight", (d, n * h)).T
    yield "w_gate_up", np.concatenate([src.get(nm["gate"] + ".weight", (f, d)),
                                       src.get(nm["up"] + ".weight", (f, d))], axis=0).T
    yield "w_down", src.get(nm["down"] + ".weight", (d, f)).T
    if cfg.qkv_bias:
        yield "bqkv", np.concatenate([src.get(nm["q"] + ".bias", (n * h,)),
                                      src.get(nm["k"] + ".bias", (k * h,)),
                                      src.get(nm["v"] + ".bias", (k * h,))])
    if cfg.o_bias:
        yield "bo", src.get(nm["o"] + ".bias", (d,))
    if cfg.qk_norm:
        yield "q_norm", src.get(nm["q_norm"], (h,))
        yield "k_norm", src.get(nm["k_norm"], (h,))
    if cfg.mlp_bias:
        yield "b_gate_up", np.concatenate([src.get(nm["gate"] + ".bias", (f,)),
                                           src.get(nm["up"] + ".bias", (f,))])
        yield "b_down", src.get(nm["down"] + ".bias", (d,))


def _to_device(arr: np.ndarray, dtype) -> jax.Array:
    # One tensor at a time: the mmap view is converted straight to the target dtype.
    return jnp.asarray(np.asarray(arr, dtype=jnp.dtype(dtype)))


def load_weights(model_dir: Path, cfg: ModelConfig, dtype=jnp.float32) -> Weights:
    """Read an HF safetensors checkpoint into Weights of the given dtype."""
    src = TensorSource(model_dir)
    try:
        layers = []
        for i in range(cfg.num_layers):
            fields = {name: _to_device(arr, dtype) for name, arr in _hf_tensors_of_layer(cfg, src, i)}
            layers.append(LayerWeights(**fields))
        embed = _to_device(src.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)), dtype)
        final_norm = _to_device(src.get("model.norm.weight", (cfg.hidden_size,)), dtype)
        lm_head = None
        if not cfg.tie_word_embeddings:
            lm_head = _to_device(src.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)).T, dtype)
    finally:
        src.close()
    return Weights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def hf_state_dict(cfg: ModelConfig, weights: Weights, dtype=None) -> dict[str, np.ndarray]:
    """Weights -> HF tensor names and layouts (numpy), for export."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    cast = (lambda x: np.asarray(x, dtype=jnp.dtype(dtype))) if dtype else np.asarray
    out = {"model.embed_tokens.weight": cast(weights.embed)}
    for i, layer in enumerate(weights.layers):
        nm = _hf_layer_names(i)
        qkv = cast(layer.wqkv).T
        out[nm["attn_norm"]] = cast(layer.attn_norm)
        out[nm["q"] + ".weight"], out[nm["k"] + ".weight"], out[nm["v"] + ".weight"] = np.split(
            qkv, [n * h, (n + k) * h], axis=0)
        out[nm["o"] + ".weight"] = cast(layer.wo).T
        out[nm["mlp_norm"]] = cast(layer.mlp_norm)
        out[nm["gate"] + ".weight"], out[nm["up"] + ".weight"] = np.split(cast(layer.w_gate_up).T, 2)
        out[nm["down"] + ".weight"] = cast(layer.w_down).T
        if layer.bqkv is not None:
            out[nm["q"] + ".bias"], out[nm["k"] + ".bias"], out[nm["v"] + ".bias"] = np.split(
                cast(layer.bqkv), [n * h, (n + k) * h])
        if layer.bo is not None:
            out[nm["o"] + ".bias"] = cast(layer.bo)
        if layer.q_norm is not None:
            out[nm["q_norm"]], out[nm["k_norm"]] = cast(layer.q_norm), cast(layer.k_norm)
        if layer.b_gate_up is not None:
            out[nm["gate"] + ".bias"], out[nm["up"] + ".bias"] = np.split(cast(layer.b_gate_up), 2)
            out[nm["down"] + ".bias"] = cast(layer.b_down)
    out["model.norm.weight"] = cast(weights.final_norm)
    if weights.lm_head is not None:
        out["lm_head.weight"] = cast(weights.lm_head).T
    del d, f
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def export_hf(out_dir: str | Path, cfg: ModelConfig, weights: Weights, dtype="bfloat16",
              tokenizer_json: str | Path | None = None, generation_config: dict | None = None,
              max_shard_bytes: int | None = None):
    """Write an HF directory (config.json + safetensors [+ tokenizer]) that transformers loads.

    max_shard_bytes: split the weights into shards with an index file, as HF does.
    """
    from jaxinfer.wquant import QuantWeight
    if any(isinstance(x, QuantWeight) for x in jax.tree_util.tree_leaves(
            weights, is_leaf=lambda x: isinstance(x, QuantWeight))):
        raise ValueError("export_hf writes dense weights; these hold quantized projections (LLM(quantization=...)): "
                         "export the model loaded without quantization")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    state = hf_state_dict(cfg, weights, DTYPES[dtype])
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
    return cfg, load_weights(Path(model_dir), cfg, DTYPES[dtype])


# ----------------------------------------------------------------------------- orbax

QUANT_FILE = "quantization.json"  # beside an orbax checkpoint whose projections are quantized
QUANT_ARRAYS = ("data", "scale", "tensor_scale", "input_scale")  # QuantWeight's array fields


def save_orbax(path: str | Path, cfg: ModelConfig, weights: Weights, quantization: dict | None = None):
    """Save weights with orbax-checkpoint, config.json beside them. Quantized projections
    (`wquant.QuantWeight`) are saved as they are, described in quantization.json (format, group,
    the shapes and dtypes of their arrays, and `quantization`: the settings that made them)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
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
    from jaxinfer.wquant import MODULES, QuantWeight
    return {f"layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(weights.layers) for n in MODULES
            if isinstance(getattr(layer, n), QuantWeight)}


def _abstract_weights(cfg: ModelConfig, tree, quant: dict | None = None) -> Weights:
    """ShapeDtypeStructs matching what was saved (dtype read from the metadata; quantized
    projections as quantization.json describes them)."""
    embed = tree.get("embed") if isinstance(tree, dict) else None  # quantized codes may come first
    leaves = [embed] if embed is not None else jax.tree_util.tree_leaves(tree)
    dtype = leaves[0].dtype if leaves and hasattr(leaves[0], "dtype") else jnp.float32
    shapes = layer_shapes(cfg)
    sds = lambda s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    layers = [LayerWeights(**{n: (None if s is None else sds(s)) for n, s in shapes.items()})
              for _ in range(cfg.num_layers)]
    if quant:
        from jaxinfer.wquant import QuantWeight
        for name, d in quant["modules"].items():
            _, i, field = name.split(".")
            arrays = {f: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dt)) for f, (shape, dt) in d["arrays"].items()}
            layers[int(i)] = layers[int(i)].replace(**{field: QuantWeight(**arrays, fmt=d["fmt"])})
    return Weights(embed=sds((cfg.vocab_size, cfg.hidden_size)), layers=layers,
                   final_norm=sds((cfg.hidden_size,)),
                   lm_head=None if cfg.tie_word_embeddings else sds((cfg.hidden_size, cfg.vocab_size)))
