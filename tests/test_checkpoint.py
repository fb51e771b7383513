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


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
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


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "MixtralForCausalLM"])
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


def test_unsupported_dtype_and_rope(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="dtype='float16'"):
        load_hf(tiny_dir, "float16")
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _err(d, "rope_type='yarn' is not supported")


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
