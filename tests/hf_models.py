"""Tiny random checkpoints, written by transformers, for parity tests."""

from __future__ import annotations

import re
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
    # YaRN, as Qwen3 is run past 32k: a context 4x the original (32 < 72 tokens here)
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 32})),
    # Gemma: (1 + w) norms, sqrt(d)-scaled embeddings, GeGLU. Gemma 2 and 3: sliding and global layers interleaved (40 > window); Gemma 2 soft-caps the
    # attention scores and the logits (small caps, so that they bind); Gemma 3 has a RoPE base
    # per layer type, a scaled global one, and an attention scale of its own
    # OLMo 2: norms after attention and MLP instead of before, q / k normalized over all heads
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {"num_key_value_heads": 2}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"num_key_value_heads": 2, "head_dim": 32, "sliding_window": 24, "query_pre_attn_scalar": 24,
                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 40,
                "num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}),
    # Mixture of experts: Mixtral (top 2 of 4, renormalized); Qwen2-MoE (top 2 of 4, not renormalized,
    # plus a sigmoid-gated shared expert); Qwen3-MoE (top 2 of 8, renormalized, layer 1 dense)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {"num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 3, "num_experts": 8,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                   "mlp_only_layers": [1]}),
    # Phi-3 (Phi-4-mini's shape): fused qkv_proj and gate_up_proj, RoPE on the first 3/4 of each head
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             {"num_key_value_heads": 2, "pad_token_id": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}),
    # Granite: muP scalars on the embeddings, each residual branch, the attention scale and the logits
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                {"num_key_value_heads": 2, "attention_bias": True, "embedding_multiplier": 3.0,
                 "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    # StarCoder2: LayerNorms, an ungated GELU MLP (c_fc, c_proj), biases everywhere, a sliding window
    "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM,
                   {"num_key_value_heads": 2, "sliding_window": 24, "norm_epsilon": 1e-5}),
    # GPT-NeoX (Pythia): q / k / v per head in one query_key_value, a parallel residual, RoPE on a
    # quarter of each head, LayerNorms, an ungated exact-GELU MLP, biases, an untied head
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                 {"rotary_pct": 0.25, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}),
    # Phi-2: attention and MLP in parallel from one LayerNorm, RoPE on part of each head, an LM head bias
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM,
            {"num_key_value_heads": 2, "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5}),
    # Cohere (Command R): attention and MLP in parallel from one shift-less LayerNorm, interleaved RoPE,
    # a logit scale, tied embeddings
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM,
               {"num_key_value_heads": 2, "logit_scale": 0.5, "layer_norm_eps": 1e-5}),
    # GLM-4 (0414): interleaved RoPE on half of each head, fused gate_up_proj, q/k/v biases, norms after
    # attention and MLP; GLM (GLM-4-9B-chat-hf) is the same without those norms
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM,
             {"num_key_value_heads": 2, "head_dim": 16, "pad_token_id": None, "eos_token_id": 2}),
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM,
            {"num_key_value_heads": 2, "head_dim": 16, "pad_token_id": None, "eos_token_id": 2}),
    # SmolLM3: Llama's layers, every 2nd without RoPE here (4th in the Hub's), that one with a sliding window
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                {"num_key_value_heads": 2, "no_rope_layer_interval": 2, "use_sliding_window": True,
                 "sliding_window": 24, "pad_token_id": None, "eos_token_id": 2, "bos_token_id": 1}),
    # Cohere 2 (Command R7B, Command A): Cohere's layers, sliding ones with RoPE and global ones without
    "cohere2": (transformers.Cohere2Config, transformers.Cohere2ForCausalLM,
                {"num_key_value_heads": 2, "logit_scale": 0.5, "layer_norm_eps": 1e-5, "sliding_window": 24,
                 "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": None}),
    # OLMoE: OLMo's q / k norms over all heads, top 2 of 4 experts, not renormalized
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False}),
}

# Phi-3.5-mini's LongRoPE: short and long factors per rotated frequency (6 here: head_dim 16, 3/4 rotated)
# past an original context of 32 (max_position_embeddings 256: factor 8)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.8, 2.5, 3.0], "long_factor": [1.0, 1.5, 3.0, 6.0, 10.0, 16.0]}
ARCHS["phi3_longrope"] = (ARCHS["phi3"][0], ARCHS["phi3"][1],
                          {**ARCHS["phi3"][2], "rope_parameters": LONGROPE, "original_max_position_embeddings": 32})


def write_tiny(arch: str, out_dir: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random model of `arch` with transformers; biases and norms are randomized too."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    model = _random_model(model_cls, cfg_cls(**{**COMMON, **extra, **overrides}), seed)
    model.to(dtype).save_pretrained(out_dir)
    return Path(out_dir)


def write_tiny_gemma3_vlm(out_dir: Path, seed: int = 0) -> Path:
    """A random vision-language Gemma 3 (Gemma3ForConditionalGeneration: a one-layer SigLIP tower,
    a projector, and the gemma3 arch's language model), saved by transformers: its language model's
    tensors under language_model.model.*, as the Hub's Gemma 3 4B-27B hold them."""
    text = {**COMMON, **ARCHS["gemma3"][2]}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
    _random_model(transformers.Gemma3ForConditionalGeneration, cfg, seed).save_pretrained(out_dir)
    return Path(out_dir)


def _random_model(model_cls, cfg, seed: int):
    """model_cls(cfg) with random weights: matrices normal(0, 0.15), biases and norms moved off their
    initial values (nonzero biases, non-unit norms)."""
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


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


# ----------------------------------------------------------------------------- GPTQ / AWQ checkpoints
# Written here from the formats' descriptions (AutoGPTQ / GPTQModel and AutoAWQ write them; neither
# installs on a CPU-only machine with this torch), round to nearest per group.

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "self_attn.qkv_proj", "mlp.gate_up_proj")  # Phi-3's fused modules
# a MoE layer's expert and shared-expert projections (Mixtral's w1 / w3 / w2, Qwen's gate / up / down); not the router
EXPERT = re.compile(r"model\.layers\.\d+\.(block_sparse_moe\.experts\.\d+\.w[123]"
                    r"|mlp\.(experts\.\d+|shared_expert)\.(gate|up|down)_proj)")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # field i of a word holds column AWQ_ORDER[i] of its eight


def _words(codes, bits: int, axis: int):
    """Unsigned b-bit codes [..] -> int32 words along `axis`, code j of a word at bits b*j."""
    import numpy as np
    c = np.moveaxis(np.asarray(codes, np.uint64), axis, 0)
    per = 32 // bits
    words = np.zeros((c.shape[0] // per,) + c.shape[1:], np.uint64)
    for j in range(per):
        words |= c[j::per] << np.uint64(bits * j)
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis))  # save_file: C order


def _round_groups(w, bits: int, group: int, sym: bool, g_idx, zero_from: int = 0):
    """RTN codes of w [N, K] in the groups g_idx [K] gives: (codes [N, K], scales [G, N] float16,
    zeros [G, N], dequantized [N, K] float32). Zero points lie in [zero_from, 2^b - 1]."""
    import numpy as np
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    scales = np.zeros((groups, w.shape[0]), np.float16)
    zeros = np.zeros((groups, w.shape[0]), np.int64)
    for j in range(groups):
        blk = w[:, g_idx == j]
        if sym:
            s = 2 * np.abs(blk).max(1) / maxq
            z = np.full(w.shape[0], (maxq + 1) // 2)
        else:
            lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
            s = (hi - lo) / maxq
            z = np.clip(np.round(-lo / s), zero_from, maxq)
        scales[j], zeros[j] = s, z
    s_k, z_k = scales.astype(np.float32)[g_idx].T, zeros[g_idx].T  # [N, K]
    codes = np.clip(np.round(w / s_k) + z_k, 0, maxq).astype(np.int64)
    return codes, scales, zeros, (codes - z_k) * s_k


def _quantize_checkpoint(src: Path, out_dir: Path, qc: dict, module_tensors, lm_head: bool = False) -> dict:
    """Copy src to out_dir with every decoder projection (and the untied LM head when lm_head)
    replaced by module_tensors(name, w [N, K]) -> (tensors {suffix: array}, dequantized [N, K]);
    returns {module: dequantized}."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    dequantized = {}
    for name in sorted(tensors):
        module = name[:-len(".weight")]
        if not (name.endswith(".weight") and (module.split(".", 3)[-1] in PROJECTIONS or EXPERT.fullmatch(module)
                                              or (lm_head and module == "lm_head"))):
            continue
        w = tensors.pop(name).astype(np.float32)
        parts, dequantized[module] = module_tensors(module, w)
        tensors.update({f"{module}.{k}": v for k, v in parts.items()})
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = json.loads((Path(src) / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qc}, indent=1))
    return dequantized


def write_gptq(src: Path, out_dir: Path, bits: int = 4, group: int = 32, sym: bool = True, desc_act: bool = False,
               fmt: str = "gptq", seed: int = 0, lm_head: bool = False) -> dict:
    """A GPTQ checkpoint (AutoGPTQ / GPTQModel layout) of src's projections: qweight int32 [K*b/32, N]
    packed along K, qzeros int32 [K/g, N*b/32] packed along N (minus one in the v1 "gptq" format),
    scales float16 [K/g, N], g_idx int32 [K]; the untied LM head too with lm_head (GPTQModel's
    lm_head=True). desc_act: the groups follow a random feature order
    (one order per input: q/k/v share theirs, as do gate/up, as GPTQ's shared Hessian gives them).
    Returns {module: the dequantized [N, K] weight}."""
    import numpy as np
    rng = np.random.default_rng(seed)
    orders = {}

    def module_tensors(module, w):
        k = w.shape[1]
        g = group if group > 0 else k
        perm = np.arange(k)
        if desc_act:
            shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}
            prefix, own = module.rsplit(".", 1)
            perm = orders.setdefault((prefix, shared.get(own, own)), rng.permutation(k))
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // g
        codes, scales, zeros, deq = _round_groups(w, bits, g, sym, g_idx, zero_from=1 if fmt == "gptq" else 0)
        stored_zeros = zeros - 1 if fmt == "gptq" else zeros
        return {"qweight": _words(codes.T, bits, axis=0), "qzeros": _words(stored_zeros, bits, axis=1),
                "scales": scales, "g_idx": g_idx.astype(np.int32)}, deq

    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "format": fmt, "damp_percent": 0.01, "true_sequential": True, "lm_head": lm_head}
    return _quantize_checkpoint(src, out_dir, qc, module_tensors, lm_head)


def write_awq(src: Path, out_dir: Path, group: int = 32) -> dict:
    """An AWQ checkpoint (AutoAWQ's GEMM layout) of src's projections: qweight int32 [K, N/8] and
    qzeros int32 [K/g, N/8], 4-bit codes packed along N in the AWQ_ORDER interleave, scales float16
    [K/g, N]; asymmetric. Returns {module: the dequantized [N, K] weight}."""
    import numpy as np

    def interleaved(codes):  # [R, N] -> [R, N/8] words
        r, n = codes.shape
        return _words(codes.reshape(r, n // 8, 8)[:, :, AWQ_ORDER].reshape(r, n), 4, axis=1)

    def module_tensors(module, w):
        g_idx = np.arange(w.shape[1]) // group
        codes, scales, zeros, deq = _round_groups(w, 4, group, False, g_idx)
        return {"qweight": interleaved(codes.T), "qzeros": interleaved(zeros), "scales": scales}, deq

    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    return _quantize_checkpoint(src, out_dir, qc, module_tensors)
