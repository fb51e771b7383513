"""Checkpoints: sharded loading, orbax round trip, HF export, and every error path."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from hf_models import load_hf_model, write_tiny
from jaxinfer.checkpoint import (CheckpointError, export_hf, load_hf, restore_orbax, save_orbax,
                                 save_safetensors, save_sharded)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny("qwen2", tmp_path_factory.mktemp("qwen2"))


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_checkpoint_loads_the_same_weights(tiny_dir, tmp_path):
    cfg, w = load_hf(tiny_dir)
    from safetensors.numpy import load_file
    state = load_file(str(tiny_dir / "model.safetensors"))
    out = _copy(tiny_dir, tmp_path)
    (out / "model.safetensors").unlink()
    save_sharded(out, state, max_shard_bytes=40_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    _, w2 = load_hf(out)
    _leaves_equal(w, w2)


def test_bf16_and_f16_checkpoints_load(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        d = write_tiny("llama", tmp_path / str(dtype), dtype=dtype)
        cfg, w = load_hf(d, "float32")
        assert w.embed.dtype == np.float32 and np.all(np.isfinite(np.asarray(w.embed)))


def test_orbax_round_trip(tiny_dir, tmp_path):
    cfg, w = load_hf(tiny_dir)
    save_orbax(tmp_path / "ckpt", cfg, w)
    cfg2, w2 = restore_orbax(tmp_path / "ckpt")
    assert cfg2 == cfg
    _leaves_equal(w, w2)


def test_bf16_llm_saves_and_exports_its_weights_in_checkpoint_layout(tiny_dir, tmp_path):
    """A bf16 LLM on CPU holds TransposedWeights (model.runtime_layout); save and export write
    the [Din, Dout] arrays load_hf reads, and each format loads back to the same weights."""
    from jaxinfer import LLM
    from jaxinfer.layers import TransposedWeight
    from jaxinfer.model import runtime_layout
    llm = LLM(str(tiny_dir), dtype="bfloat16", max_model_len=64)
    assert isinstance(llm.weights.layers[0].wqkv, TransposedWeight)
    llm.save(tmp_path / "o")
    llm.save(tmp_path / "h", save_format="hf")
    _, loaded = load_hf(tiny_dir, "bfloat16")
    _, restored = restore_orbax(tmp_path / "o", "bfloat16")
    _, exported = load_hf(tmp_path / "h", "bfloat16")
    _leaves_equal(loaded, restored)
    _leaves_equal(loaded, exported)
    _leaves_equal(llm.weights, runtime_layout(restored))
    kept = LLM(str(tiny_dir), dtype="bfloat16", max_model_len=64, weight_layout="in_out")
    _leaves_equal(kept.weights, loaded)
    with pytest.raises(ValueError, match="weight_layout='rows'.*'out_in'"):
        LLM(str(tiny_dir), weight_layout="rows")


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma2", "gemma3", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                  "granite", "phi3_longrope", "starcoder2", "gpt_neox", "phi", "cohere", "glm", "glm4",
                                  "smollm3", "cohere2"])
def test_export_loads_in_transformers_with_same_logits(arch, tmp_path):
    src = write_tiny(arch, tmp_path / "src")
    cfg, w = load_hf(src)
    export_hf(tmp_path / "out", cfg, w, dtype="float32", max_shard_bytes=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ref = load_hf_model(src)
    hf = load_hf_model(tmp_path / "out")
    ids = torch.tensor([[3, 9, 27, 81, 5, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(hf(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)
    cfg2, w2 = load_hf(tmp_path / "out")
    assert cfg2 == cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "mixtral",
                                  "qwen2_moe", "qwen3_moe", "olmoe", "phi3", "granite", "starcoder2", "gpt_neox",
                                  "phi", "cohere", "glm4", "smollm3", "cohere2"])
def test_parameter_count_is_transformers(arch):
    """ModelConfig.num_params (the memory calculator's count) against the parameters transformers
    builds for the same config: biases, per-head and whole-projection q / k norms, sandwich norms,
    tied embeddings, routers, experts, shared experts and dense layers among MoE ones."""
    from hf_models import ARCHS, COMMON

    from jaxinfer.config import ModelConfig
    cfg_cls, model_cls, extra = ARCHS[arch]
    with torch.device("meta"):
        model = model_cls(cfg_cls(**{**COMMON, **extra}))
    cfg = ModelConfig.from_hf_dict({"architectures": [model_cls.__name__], **model.config.to_dict()})
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


# Gemma configs as the Hub holds them (written by older transformers: flat RoPE keys, the layer
# pattern as a period, defaults left out), trimmed to a small size
HUB_GEMMA = {
    "gemma-3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
                   "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
                   "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
                   "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
                   "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
                   "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
                   "vocab_size": 262144},
    "gemma-3-4b-text": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256,
                        "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
                        "num_hidden_layers": 34, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
                        "vocab_size": 262208},
    "gemma-2-2b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 256,
                   "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
                   "intermediate_size": 9216, "max_position_embeddings": 8192, "num_attention_heads": 8,
                   "num_hidden_layers": 26, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                   "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000},
    "gemma-2b": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "gelu", "head_dim": 256,
                 "hidden_size": 2048, "intermediate_size": 16384, "max_position_embeddings": 8192,
                 "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1, "rope_theta": 10000.0,
                 "vocab_size": 256000},
}


@pytest.mark.parametrize("name", sorted(HUB_GEMMA))
def test_gemma_hub_configs_read_as_transformers_reads_them(name):
    """Layer types, sliding window, RoPE per layer type, attention scale, activation, soft caps
    and tied embeddings, each against transformers' own config class for the same dict."""
    from transformers import CONFIG_MAPPING

    from jaxinfer.config import ModelConfig, rope_inv_freq
    d = HUB_GEMMA[name]
    cfg = ModelConfig.from_hf_dict(d)
    ref = CONFIG_MAPPING[d["model_type"]](**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings is True
    assert cfg.norm_style == "gemma" and cfg.scale_embeddings and cfg.head_dim == ref.head_dim
    assert cfg.hidden_act == (getattr(ref, "hidden_activation", None) or ref.hidden_act) == "gelu_pytorch_tanh"
    if d["model_type"] == "gemma":  # no sliding layers, no soft caps, the head dim's scale
        assert cfg.layer_types is None and cfg.sliding_window is None and cfg.attention_scale == 256 ** -0.5
        assert not cfg.sandwich_norms and cfg.final_logit_softcapping is None
        return
    assert cfg.sandwich_norms and list(cfg.layer_types) == ref.layer_types
    assert cfg.sliding_window == ref.sliding_window and cfg.query_pre_attn_scalar == ref.query_pre_attn_scalar
    assert cfg.final_logit_softcapping == ref.final_logit_softcapping
    if d["model_type"] == "gemma2":
        assert cfg.attn_logit_softcapping == ref.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0
        assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
        return
    full, local = ref.rope_parameters["full_attention"], ref.rope_parameters["sliding_attention"]
    assert (cfg.rope_theta, cfg.local_rope_theta) == (full["rope_theta"], local["rope_theta"])
    assert cfg.rope_scaling.rope_type == full["rope_type"] and local["rope_type"] == "default"
    assert cfg.rope_scaling.factor == full.get("factor", 1.0)
    assert cfg.attn_logit_softcapping is None  # transformers' Gemma 3 applies none
    np.testing.assert_allclose(rope_inv_freq(cfg, local=True)[1], 10000.0 ** (-2 / 256))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_gemma3_vision_language_configs_and_tensor_layouts(tmp_path):
    """A vision-language Gemma 3 as the Hub holds it (text_config leaves transformers' defaults out,
    eos at the top level) reads as transformers' Gemma3Config reads its text_config; its language
    model loads from either name layout (language_model.model.* on the Hub, model.language_model.*
    as transformers 4.52+ names it in memory), and the vision tower is not read."""
    from hf_models import write_tiny_gemma3_vlm
    from safetensors.numpy import load_file
    from transformers import Gemma3Config

    from jaxinfer.config import ModelConfig
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    cfg, ref = ModelConfig.from_hf_dict(hub), Gemma3Config(**hub).text_config
    for ours, theirs in [("vocab_size", "vocab_size"), ("num_heads", "num_attention_heads"),
                         ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                         ("num_layers", "num_hidden_layers"), ("sliding_window", "sliding_window"),
                         ("query_pre_attn_scalar", "query_pre_attn_scalar"), ("rms_norm_eps", "rms_norm_eps"),
                         ("max_position_embeddings", "max_position_embeddings")]:
        assert getattr(cfg, ours) == getattr(ref, theirs), ours
    assert list(cfg.layer_types) == ref.layer_types and cfg.eos_token_ids == (1, 106)
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.rope_scaling.factor == 8.0
    assert (cfg.rope_theta, cfg.local_rope_theta) == (ref.rope_parameters["full_attention"]["rope_theta"],
                                                      ref.rope_parameters["sliding_attention"]["rope_theta"])

    src = write_tiny_gemma3_vlm(tmp_path / "hub")
    state = load_file(str(src / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in state) and "model.norm.weight" not in state
    _, w = load_hf(src)
    moved = _copy(src, tmp_path, "moved")
    save_safetensors(moved / "model.safetensors", {k.replace("language_model.model.", "model.language_model."): v
                                                   for k, v in state.items()})
    _leaves_equal(w, load_hf(moved)[1])
    np.testing.assert_array_equal(np.asarray(w.final_norm), state["language_model.model.norm.weight"])


def test_gemma_configs_built_in_python_write_what_they_run():
    """A Gemma config built by hand, its optional fields left unset (no attention scalar, no layer
    types, no local RoPE base), writes a config.json that reads back to the same model: the same
    attention scale, windows and RoPE frequencies per layer."""
    import dataclasses

    from jaxinfer.config import ModelConfig, rope_inv_freq
    base = ModelConfig.from_hf_dict(HUB_GEMMA["gemma-3-1b"])
    for cfg in (dataclasses.replace(base, query_pre_attn_scalar=None, layer_types=None, local_rope_theta=None),
                dataclasses.replace(base, architecture="Gemma2ForCausalLM", query_pre_attn_scalar=None,
                                    layer_types=None, sliding_window=None, local_rope_theta=None)):
        back = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
        assert back.attention_scale == cfg.attention_scale
        assert [back.layer_window(i) for i in range(26)] == [cfg.layer_window(i) for i in range(26)]
        assert [rope_inv_freq(back, local=loc) for loc in (False, True)] == [rope_inv_freq(cfg)] * 2


def test_gemma_config_errors_name_the_value():
    from jaxinfer.config import ConfigError, ModelConfig
    base = HUB_GEMMA["gemma-3-1b"]
    for change, match in [({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
                          ({"hidden_activation": "relu"}, "hidden_act='relu' is not supported; supported: silu"),
                          ({"layer_types": ["full_attention"] * 3}, "for each of the 26 layers"),
                          ({"sliding_window": None}, "sliding_window is not set"),
                          ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "factor": 2.0}}},
                           "sliding_attention rope_type='yarn'")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf_dict({**base, **change})


# ------------------------------------------------------------------ error paths: one line each

def _err(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_hf(path)
    assert "\n" not in str(e.value)


def test_missing_directory(tmp_path):
    _err(tmp_path / "nope", "does not exist")


def test_missing_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    _err(d, "no model.safetensors")


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _err(d, "corrupt or truncated")


def test_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    _err(d, "shard .* is missing")


def test_shape_mismatch_names_the_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    _err(d, r"mlp.gate_proj.weight' has shape \(96, 64\), config expects \(100, 64\)")


def test_missing_tensor_names_it(tmp_path):
    d = tmp_path / "m"
    write_tiny("llama", d)
    from safetensors.numpy import load_file
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_safetensors(d / "model.safetensors", state)
    _err(d, "model.layers.1.mlp.down_proj.weight' is missing")


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "FalconForCausalLM", "DeepseekV3ForCausalLM"])
def test_unsupported_architecture_lists_supported(tiny_dir, tmp_path, arch):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = [arch]
    (d / "config.json").write_text(json.dumps(cfg))
    _err(d, f"unsupported architecture '{arch}'; supported: LlamaForCausalLM")


def test_missing_or_bad_config(tiny_dir, tmp_path):
    from jaxinfer import LLM
    d = _copy(tiny_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    _err(d, "not valid JSON")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):  # LLM reads the
        LLM(model=str(d))                                                      # quantization_config first
    (d / "config.json").unlink()
    _err(d, "config.json not found")
    with pytest.raises(CheckpointError, match="config.json not found"):
        LLM(model=str(d))


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen3's long-context recipe
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 0.8},  # DeepSeek's
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "truncate": False,
     "attention_factor": 1.3},
])
def test_yarn_frequencies_and_attention_factor_are_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxinfer.config import ModelConfig, rope_inv_freq
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 131072,
          "rope_parameters": {"rope_theta": 1e6, **rope}}
    cfg = ModelConfig.from_hf_dict(hf)
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"}))
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg), np.float32), want.numpy(), rtol=2e-6)
    assert cfg.rope_scaling.attention_factor == pytest.approx(factor, rel=1e-6)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


# Phi-3 configs as the Hub holds them (older spellings: rope_scaling, its "type"), trimmed: Phi-3.5-mini
# (LongRoPE over all 96 dims), Phi-4-mini (LongRoPE over the first 3/4 of 128)
PHI3_BASE = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
             "sliding_window": 262144, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}
HUB_PHI3 = {
    "phi-3.5-mini": {**PHI3_BASE, "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(48)],
                                                   "long_factor": [1.0 + 0.7 * i for i in range(48)]}},
    "phi-4-mini": {**PHI3_BASE, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
                   "partial_rotary_factor": 0.75, "sliding_window": None, "tie_word_embeddings": True,
                   "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(48)],
                                    "long_factor": [1.0 + 0.9 * i for i in range(48)]}},
}


@pytest.mark.parametrize("name", sorted(HUB_PHI3))
def test_longrope_frequencies_and_attention_factor_are_transformers(name):
    """Short and long frequencies (partial rotary included) and the attention factor against
    transformers' longrope for the same dict; the long set rotates when the model is served past
    its original context (max_model_len, `with_context`), and the config writes what it reads."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxinfer.config import ModelConfig, rope_inv_freq
    d = HUB_PHI3[name]
    cfg = ModelConfig.from_hf_dict(d)
    ref = Phi3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert cfg.rope_scaling.rope_type == "longrope" and cfg.rope_scaling.long  # served for 131072 by default
    assert cfg.rotary_dim == 96 and cfg.sliding_window == d["sliding_window"]
    assert cfg.fused_qkv and cfg.fused_gate_up and cfg.tie_word_embeddings == bool(d.get("tie_word_embeddings"))
    short_want, factor = ROPE_INIT_FUNCTIONS["longrope"](ref, None)
    long_want, _ = ROPE_INIT_FUNCTIONS["longrope"](ref, None, seq_len=4097)
    short_cfg = cfg.with_context(4096)
    assert not short_cfg.rope_scaling.long and short_cfg.with_context(8192) == cfg
    np.testing.assert_allclose(np.asarray(rope_inv_freq(short_cfg), np.float32), short_want.numpy(), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg), np.float32), long_want.numpy(), rtol=2e-6)
    assert cfg.rope_scaling.attention_factor == pytest.approx(factor, rel=1e-6) and factor > 1.1
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    # Phi-3-mini-128k's first config spelled longrope "su" (transformers 5.24 no longer reads it)
    assert ModelConfig.from_hf_dict({**d, "rope_scaling": {**d["rope_scaling"], "type": "su"}}) == cfg


def test_phi3_config_errors_name_the_value():
    from jaxinfer.config import ConfigError, ModelConfig
    base = HUB_PHI3["phi-3.5-mini"]
    for change, match in [({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 47, "long_factor": [1.0] * 48}},
                           "47 / 48 values; the rotated dims need 48"),
                          ({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48}},
                           "needs short_factor and long_factor lists"),
                          ({"rope_scaling": None, "partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5"),
                          ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf_dict({**base, **change})


def test_unsupported_dtype_and_rope(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="dtype='float16'"):
        load_hf(tiny_dir, "float16")
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _err(d, "rope_type='dynamic' is not supported")


@pytest.mark.parametrize("name, match", [("tokenizer.json", "cannot be read as a tokenizer"),
                                         ("tokenizer_config.json", "not valid JSON")])
def test_corrupt_tokenizer_files_name_the_file(tiny_dir, tmp_path, name, match):
    from jaxinfer import LLM
    from jaxinfer.llm import resolve_model
    d = _copy(tiny_dir, tmp_path)
    shutil.copy(resolve_model("stdlib-target") / "tokenizer.json", d)  # tokenizer_config.json is read beside it
    (d / name).write_text("{not json")
    with pytest.raises(ValueError, match=f"{name}: {match}") as e:
        LLM(model=str(d))
    assert "\n" not in str(e.value)


def test_a_quantized_model_with_tied_embeddings_exports_to_hf_and_loads_back(tiny_dir, tmp_path):
    """A float32 LLM on CPU holds its tied head as a copy (a TiedHead, or a tied PanelWeight with
    the native kernels). Exporting an int8 model wrote tie_word_embeddings=false (read from that
    copy) and no lm_head tensor, so the export did not load ("tensor 'lm_head.weight' is missing")."""
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.layers import PanelWeight, TiedHead
    llm = LLM(str(tiny_dir), dtype="float32", quantization="int8", max_model_len=64)
    assert isinstance(llm.weights.lm_head, TiedHead) or (isinstance(llm.weights.lm_head, PanelWeight)
                                                         and llm.weights.lm_head.tied)
    llm.save(tmp_path / "h", save_format="hf")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["tie_word_embeddings"] is True
    again = LLM(str(tmp_path / "h"), dtype="float32", max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [3, 17, 42, 9, 77]}
    assert again.generate(prompt, params)[0].outputs[0].token_ids == llm.generate(prompt, params)[0].outputs[0].token_ids
