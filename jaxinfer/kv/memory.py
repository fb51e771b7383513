"""KV and weight memory calculator (`jaxinfer memory`), with the cache's real byte counts.

KV bytes = 2 (K and V) x layers x batch x seq x kv heads x bytes per head-token, where
bytes per head-token is head_dim x itemsize for an unquantized cache, and codes plus
scales for a quantized one (kv/quant.py: the same numbers the engine allocates).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from jaxinfer.config import ModelConfig
from jaxinfer.kv.quant import KVQuantSpec, page_bytes_per_token

WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclasses.dataclass
class MemoryReport:
    model: str
    num_params: int
    weights_dtype: str
    kv_cache_dtype: str
    batch: int
    seq: int
    weights_bytes: int
    kv_bytes_per_token: float  # all layers, K and V
    kv_bytes: int  # batch x seq tokens
    device_memory_bytes: int | None = None
    max_sequences: int | None = None  # sequences of length seq that fit beside the weights

    def format(self) -> str:
        gib = 2 ** 30
        lines = [
            f"model            {self.model}  ({self.num_params / 1e9:.3f}B parameters)",
            f"weights          {self.weights_bytes / gib:10.3f} GiB  ({self.weights_dtype})",
            f"KV per token     {self.kv_bytes_per_token:10.1f} bytes  ({self.kv_cache_dtype}, all layers, K+V)",
            f"KV total         {self.kv_bytes / gib:10.3f} GiB  (batch {self.batch} x seq {self.seq}; "
            f"{self.kv_bytes} bytes)",
        ]
        if self.device_memory_bytes is not None:
            lines.append(f"fits in {self.device_memory_bytes / gib:.1f} GiB: {self.max_sequences} sequences of "
                         f"{self.seq} tokens beside the weights")
        return "\n".join(lines)


def load_model_config(model: str | None) -> tuple[str, ModelConfig]:
    """An HF dir, a config.json / .toml file, a preset in configs/models, or an embedded model."""
    from jaxinfer.checkpoint import load_config
    from jaxinfer.llm import resolve_model

    if model and (CONFIGS / f"{model}.toml").is_file():
        model = str(CONFIGS / f"{model}.toml")
    path = Path(model) if model else None
    if path is not None and path.is_file():
        if path.suffix == ".toml":
            hf = tomllib.loads(path.read_text())
        else:
            hf = json.loads(path.read_text())
        return path.stem, ModelConfig.from_hf_dict(hf, source=str(path))
    model_dir = resolve_model(model)
    return model_dir.name, load_config(model_dir)


def kv_bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str, model_itemsize: float) -> float:
    """Bytes of K and V over all layers for one token (scales included)."""
    spec = KVQuantSpec.parse(kv_cache_dtype, cfg.head_dim)
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_bytes_per_token(spec, cfg.head_dim, model_itemsize)


def quantized_weights_bytes(cfg: ModelConfig, weights_dtype: str, quantization: str,
                            quantization_config: dict | None = None) -> int:
    """Bytes of the model as `LLM(quantization=..., quantization_config=...)` holds it: the decoder
    projections in their formats (codes and scales, `wquant.quantized_nbytes`; skip / overrides
    honoured), the LM head likewise when lm_head names a format (a copy beside a tied embedding),
    everything else in weights_dtype."""
    from jaxinfer.model import layer_shapes
    from jaxinfer.wquant import QUANT_MODULES, WeightQuantConfig, quantized_nbytes
    qc = WeightQuantConfig.from_args(quantization, quantization_config)
    d = cfg.hidden_size
    item = WEIGHT_BYTES[weights_dtype]
    total = cfg.num_params() * item
    for i in range(cfg.num_layers):
        shapes = layer_shapes(cfg, i)
        for name in QUANT_MODULES:
            fmt = qc.format_of(f"layers.{i}.{name}")
            if fmt is None or shapes[name] is None:
                continue
            *experts, kin, nout = shapes[name]  # a MoE layer's experts: [E, K, N]
            count = experts[0] if experts else 1
            total += count * (quantized_nbytes(kin, nout, fmt, qc.group_of(fmt, kin)) - kin * nout * item)
    if qc.lm_head is not None:
        head = quantized_nbytes(d, cfg.vocab_size, qc.lm_head, qc.group_of(qc.lm_head, d))
        total += head - (0 if cfg.tie_word_embeddings else d * cfg.vocab_size * item)
    return int(total)


def memory_report(cfg: ModelConfig, batch: int, seq: int, kv_cache_dtype: str = "auto",
                  weights_dtype: str = "bfloat16", device_memory_bytes: int | None = None,
                  model: str = "", quantization: str | None = None,
                  quantization_config: dict | None = None) -> MemoryReport:
    """quantization / quantization_config: as LLM takes them (the weights are counted as
    `quantized_weights_bytes`); weights_dtype is then the dtype of the rest."""
    if weights_dtype not in WEIGHT_BYTES:
        raise ValueError(f"weights_dtype={weights_dtype!r}; choose one of {', '.join(WEIGHT_BYTES)}")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch={batch} and seq={seq} must be positive")
    # An unquantized cache ("auto") is stored in the model's dtype (16-bit for 8/4-bit weights).
    itemsize = max(WEIGHT_BYTES[weights_dtype], 2.0)
    per_token = kv_bytes_per_token(cfg, kv_cache_dtype, itemsize)
    n = cfg.num_params()
    weights = int(n * WEIGHT_BYTES[weights_dtype])
    if quantization is not None:
        weights = quantized_weights_bytes(cfg, weights_dtype, quantization, quantization_config)
        weights_dtype = f"{weights_dtype}, projections {quantization}" + (
            f" g{quantization_config['group_size']}" if (quantization_config or {}).get("group_size") else "") + (
            f", LM head {quantization_config['lm_head']}" if (quantization_config or {}).get("lm_head") else "")
    report = MemoryReport(model=model, num_params=n, weights_dtype=weights_dtype, kv_cache_dtype=kv_cache_dtype,
                          batch=batch, seq=seq, weights_bytes=weights, kv_bytes_per_token=per_token,
                          kv_bytes=int(round(per_token * batch * seq)))
    if device_memory_bytes is not None:
        report.device_memory_bytes = device_memory_bytes
        report.max_sequences = max(0, int((device_memory_bytes - weights) // (per_token * seq)))
    return report


def register_cli(sub):
    p = sub.add_parser("memory", help="weights and KV-cache memory for a model, batch and sequence length")
    p.add_argument("--model", default=None, help="HF dir, config.json/.toml, preset in configs/models "
                   "(e.g. llama-2-70b), or embedded model name (default: the embedded target)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--weights-dtype", default="bfloat16", choices=sorted(WEIGHT_BYTES))
    p.add_argument("--device-memory-gib", type=float, default=80.0)
    p.add_argument("--quantization", default=None, metavar="FORMAT",
                   help="decoder projections in FORMAT (as LLM(quantization=...)); --weights-dtype is the rest's")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--lm-head", default=None, metavar="FORMAT", help="the LM head in FORMAT too")

    def run(args):
        name, cfg = load_model_config(args.model)
        qc = {k: v for k, v in (("group_size", args.group_size), ("lm_head", args.lm_head)) if v is not None}
        r = memory_report(cfg, args.batch, args.seq, args.kv_cache_dtype, args.weights_dtype,
                          int(args.device_memory_gib * 2 ** 30), model=name, quantization=args.quantization,
                          quantization_config=qc)
        print(r.format())
        return 0

    p.set_defaults(func=run)
