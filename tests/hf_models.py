"""Tiny random checkpoints, written by transformers, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)

ARCHS = {
    # name: (config class, model class, extra config)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_key_value_heads=2, rope_theta=10000.0)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=2, sliding_window=24)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32)),
}


def write_tiny(arch: str, out_dir: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random model of `arch` with transformers; biases and norms are randomized too."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # nonzero biases, non-unit norms
            else:
                p.normal_(0.0, 0.15)
    model.to(dtype).save_pretrained(out_dir)
    return Path(out_dir)


def load_hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "The quick brown fox jumps over the lazy dog. Caf\u00e9 \u00fcber \u4e2d\u6587 \U0001f600\n",
] * 20


def write_tokenizer(out_dir: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer.json with <s>=1 </s>=2 <pad>=0 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return Path(out_dir)


def write_compressed(src: Path, out_dir: Path, scheme: str | dict, ignore=("lm_head",), groups: dict | None = None,
                     max_shard_size: str | None = None) -> Path:
    """Quantize the checkpoint at src with compressed-tensors (the library llm-compressor and vLLM use)
    and save it in its compressed format: `scheme` is a preset name ("W4A16", "W8A8", "FP8_DYNAMIC",
    "NVFP4A16", ...) or scheme arguments ({"weights": {...}, "input_activations": {...}}), applied
    to every Linear but `ignore`; or `groups` {name: scheme arguments with "targets"}. Scales and
    zero points come from each group's min / max (what an RTN observer computes). max_shard_size
    ("100KB"): sharded files with an index, as large checkpoints come."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = load_hf_model(src)
    if groups is None:
        one = (preset_name_to_scheme(scheme, ["Linear"]) if isinstance(scheme, str)
               else QuantizationScheme(targets=["Linear"], **scheme))
        config_groups = {"group_0": one}
    else:
        config_groups = {name: QuantizationScheme(**g) for name, g in groups.items()}
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups, ignore=list(ignore)))
    with torch.no_grad():
        for _, m in model.named_modules():
            s = getattr(m, "quantization_scheme", None)
            if s is None or s.weights is None:
                continue
            args, w = s.weights, m.weight.data
            strategy, global_scale = str(getattr(args.strategy, "value", args.strategy)), None
            if strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            elif strategy in ("group", "tensor_group"):
                grouped = w.reshape(w.shape[0], -1, args.group_size)
                lo, hi = grouped.amin(-1), grouped.amax(-1)
                if strategy == "tensor_group":
                    global_scale = generate_gparam(w.amin(), w.amax())
                    m.weight_global_scale.data.copy_(global_scale)
            elif strategy == "block":
                bn, bk = args.block_structure
                blocks = w.reshape(w.shape[0] // bn, bn, w.shape[1] // bk, bk)
                lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
            else:
                lo, hi = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
            m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = zero.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    compressor.update_config(out_dir)
    return Path(out_dir)
