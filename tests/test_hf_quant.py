"""Pre-quantized checkpoints: compressed-tensors directories (written by the compressed-tensors
library itself) load into QuantWeights that compute what transformers computes on them; GPTQ and AWQ
directories into QuantWeights that compute their dequantized weights."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_models import write_awq, write_compressed, write_gptq, write_tiny
from transformers.utils.quantization_config import CompressedTensorsConfig

from jaxinfer import LLM, SamplingParams, hf_quant
from jaxinfer.checkpoint import CheckpointError, export_hf, load_hf
from jaxinfer.model import dense_layout, forward
from jaxinfer.wquant import QuantWeight, quantize_rtn

INT4_G32 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}
INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
SCHEMES = {  # name: (scheme, the format the projections load as)
    "int4_g32": ({"weights": INT4_G32}, "int4"),
    "int4_g32_asym": ({"weights": {**INT4_G32, "symmetric": False}}, "int4"),
    "int8_g32": ({"weights": {**INT4_G32, "num_bits": 8}}, "int8"),
    "fp8_block": ({"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]}},
                  "fp8_e4m3"),
    "FP8_DYNAMIC": ("FP8_DYNAMIC", "w8a8_fp8"),  # fp8 weights per channel, fp8 activations per token
    "W8A8": ("W8A8", "w8a8"),
    "NVFP4A16": ("NVFP4A16", "nvfp4"),
    "MXFP4A16": ("MXFP4A16", "mxfp4"),  # power-of-two scales: the dequantized values are exact in bfloat16 too
}
IDS = np.random.default_rng(0).integers(3, 128, size=40).tolist()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny("llama", tmp_path_factory.mktemp("ct_base"))


def _transformers(path, dequantize=False):
    """The compressed checkpoint as transformers runs it: compressed-tensors decompresses the weights
    (and fake-quantizes dynamic activations) on the first forward. dequantize=True decompresses at
    load time instead (asymmetric zero points only load that way in transformers 5.24; NVFP4's
    default path fails there, and its dequantization rounds to bfloat16)."""
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([IDS])).logits[0].log_softmax(-1).numpy()
    return model, logprobs[np.arange(len(IDS) - 1), IDS[1:]]


def _ours(weights, cfg):
    logits, _, _ = jax.jit(forward, static_argnums=1)(weights, cfg, jnp.asarray([IDS]),
                                                      jnp.arange(len(IDS))[None], None, None)
    return np.asarray(jax.nn.log_softmax(logits[0], -1))[np.arange(len(IDS) - 1), IDS[1:]]


def _hf_projections(model, i):
    """Layer i's (dequantized) projections from a transformers model, in our [K, N] layout."""
    a, m = model.model.layers[i].self_attn, model.model.layers[i].mlp
    cat = lambda *ps: torch.cat([p.weight for p in ps]).T.detach().numpy()  # noqa: E731
    return {"wqkv": cat(a.q_proj, a.k_proj, a.v_proj), "wo": cat(a.o_proj),
            "w_gate_up": cat(m.gate_proj, m.up_proj), "w_down": cat(m.down_proj)}


def _dense(w):
    return np.asarray(w.dense()) if isinstance(w, QuantWeight) else np.asarray(w)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compressed_tensors_checkpoint_matches_transformers(base, tmp_path, name):
    scheme, fmt = SCHEMES[name]
    sharded = name == "FP8_DYNAMIC"  # float8 tensors read across shards (safetensors' numpy reader cannot)
    path = write_compressed(base, tmp_path / name, scheme, max_shard_size="60KB" if sharded else None)
    assert (path / "model.safetensors.index.json").is_file() == sharded
    cfg, weights = load_hf(path)
    for layer in weights.layers:
        for field in ("wqkv", "wo", "w_gate_up", "w_down"):
            assert isinstance(getattr(layer, field), QuantWeight) and getattr(layer, field).fmt == fmt
    ours = _ours(weights, cfg)
    _, dense_ref = _transformers(base)
    assert np.abs(ours - dense_ref).max() > 1e-2  # the quantization shows: the comparison below can fail
    model, ref = _transformers(path, dequantize=name in ("int4_g32_asym", "NVFP4A16", "MXFP4A16"))
    if name == "NVFP4A16":  # compressed-tensors dequantizes NVFP4 to bfloat16: our float32 values, rounded
        for i, layer in enumerate(weights.layers):
            for field, want in _hf_projections(model, i).items():
                got = _dense(getattr(layer, field)).astype(ml_dtypes.bfloat16).astype(np.float32)
                np.testing.assert_array_equal(got, want, err_msg=f"layer {i} {field}")
    elif name == "W8A8":
        # Weights are exact; activations differ in one convention: compressed-tensors scales a row
        # by absmax / 127.5 (its [-128, 127] range), vLLM's kernels and ours by absmax / 127, so the
        # rows round on different grids (test_wquant checks our int8 product exactly).
        for i, layer in enumerate(weights.layers):
            for field, want in _hf_projections(model, i).items():
                np.testing.assert_allclose(_dense(getattr(layer, field)), want, rtol=1e-6, atol=1e-7)
        assert np.abs(ours - ref).max() < 0.15
    else:
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_mixed_schemes_ignore_list_and_quantized_lm_head(base, tmp_path):
    """Config groups: int8 per channel for every Linear, int4 by regex for q and the MLP (the more
    specific target wins), and an ignored module: q / k / v cannot share one QuantWeight and load
    dense (dequantized), the ignored down projection stays dense, the LM head is int8."""
    groups = {"g8": {"targets": ["Linear"], "weights": INT8_CHANNEL},
              "g4": {"targets": ["re:.*q_proj$", "re:.*mlp.*"], "weights": INT4_G32}}
    path = write_compressed(base, tmp_path / "mixed", None, ignore=["model.layers.0.mlp.down_proj"], groups=groups)
    cfg, weights = load_hf(path)
    kinds = [{f: getattr(getattr(layer, f), "fmt", "dense") for f in ("wqkv", "wo", "w_gate_up", "w_down")}
             for layer in weights.layers]
    assert kinds == [{"wqkv": "dense", "wo": "int8", "w_gate_up": "int4", "w_down": "dense"},
                     {"wqkv": "dense", "wo": "int8", "w_gate_up": "int4", "w_down": "int4"}]
    model, ref = _transformers(path)
    for i, layer in enumerate(weights.layers):
        for field, want in _hf_projections(model, i).items():
            np.testing.assert_allclose(_dense(getattr(layer, field)), want, rtol=1e-6, atol=1e-7)
    assert weights.lm_head.fmt == "int8"  # the LM head stays quantized
    np.testing.assert_allclose(_dense(weights.lm_head), model.lm_head.weight.T.detach().numpy(), atol=1e-7)
    np.testing.assert_allclose(_ours(weights, cfg), ref, atol=1e-4)


def test_nvfp4_fused_parts_keep_their_own_global_scales(base, tmp_path):
    """q, k and v were quantized with different NVFP4 global scales: the fused matrix keeps one per row."""
    path = write_compressed(base, tmp_path / "nvfp4", "NVFP4A16")
    _, weights = load_hf(path)
    ts = np.asarray(weights.layers[0].wqkv.tensor_scale)
    assert ts.shape == (128, 1) and len(np.unique(ts)) == 3


def test_llm_serves_saves_and_reloads_a_prequantized_checkpoint(base, tmp_path):
    """A GPTQ checkpoint with zero points and activation order (the most a pre-quantized projection
    carries: codes, scales, zeros, a feature permutation) through the engine and the static loop,
    saved with orbax and reloaded; not exportable to compressed-tensors."""
    path = tmp_path / "gptq"
    write_gptq(base, path, bits=4, group=32, sym=False, desc_act=True)
    llm = LLM(str(path), dtype="float32", max_num_seqs=2)
    assert llm.quantization.format == "int4" and llm.quantization.method == "gptq"
    assert llm.quantization.group_size == 32 and llm.quantization.skip == ()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": IDS[:9]}, {"prompt_token_ids": IDS[:23]}]
    engine = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    static = [llm.generate_static([p], params)[0].outputs[0].token_ids for p in prompts]
    assert engine == static
    llm.save(tmp_path / "saved")
    again = LLM(str(tmp_path / "saved"), dtype="float32", max_num_seqs=2)
    assert again.quantization == llm.quantization
    assert np.asarray(again.weights.layers[1].wqkv.zero).shape == (128, 2)
    assert np.asarray(again.weights.layers[1].wqkv.input_perm).shape == (64,)
    assert [o.outputs[0].token_ids for o in again.generate(prompts, params)] == engine
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(path), quantization="int8")
    with pytest.raises(ValueError, match="activation order"):
        llm.save(tmp_path / "hf", "hf")


PACKED = {  # name: (writer, its arguments, the format the projections load as)
    "gptq_int4_g32_and_head": (write_gptq, {"bits": 4, "group": 32, "sym": True, "lm_head": True}, "int4"),
    "gptq_int8_channel_asym_v2": (write_gptq, {"bits": 8, "group": -1, "sym": False, "fmt": "gptq_v2"}, "int8"),
    "gptq_int4_g32_asym_desc_act": (write_gptq, {"bits": 4, "group": 32, "sym": False, "desc_act": True}, "int4"),
    "awq_int4_g32": (write_awq, {"group": 32}, "int4"),
    "qwen2_gptq_int4_g32": (write_gptq, {"bits": 4, "group": 32, "sym": True}, "int4"),  # q/k/v biases beside
    # Phi-3's fused qkv_proj and gate_up_proj, each one quantized module
    "phi3_gptq_int4_g32_asym_desc_act": (write_gptq, {"bits": 4, "group": 32, "sym": False, "desc_act": True}, "int4"),
    "phi3_awq_int4_g32": (write_awq, {"group": 32}, "int4"),
}


def _dense_copy(base, out, weights: dict):
    """base's checkpoint with the given [N, K] projection weights in place of its own."""
    from safetensors.numpy import load_file, save_file
    out.mkdir()
    tensors = load_file(str(base / "model.safetensors"))
    tensors.update({f"{m}.weight": w.astype(np.float32) for m, w in weights.items()})
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_bytes((base / "config.json").read_bytes())
    return out


@pytest.mark.parametrize("name", PACKED)
def test_gptq_and_awq_checkpoints_compute_their_dequantized_weights(base, tmp_path, name):
    """Each projection loads as a QuantWeight holding the stored codes (symmetric GPTQ as signed
    codes, zero points otherwise; activation order as a feature permutation that q/k/v and gate/up
    share), and the model is the dense one with the dequantized weights, which quantization moved
    away from the original's."""
    writer, kw, fmt = PACKED[name]
    arch = name.split("_")[0]
    if arch in ("qwen2", "phi3"):
        base = write_tiny(arch, tmp_path / arch)
    dequantized = writer(base, tmp_path / "q", **kw)
    cfg, weights = load_hf(tmp_path / "q")
    for layer in weights.layers:
        for field in ("wqkv", "wo", "w_gate_up", "w_down"):
            w = getattr(layer, field)
            assert isinstance(w, QuantWeight) and w.fmt == fmt, field
            assert (w.zero is None) == kw.get("sym", False)
            assert (w.input_perm is not None) == kw.get("desc_act", False)
    assert isinstance(weights.lm_head, QuantWeight) == kw.get("lm_head", False)
    _, reference = load_hf(_dense_copy(base, tmp_path / "dense", dequantized))
    ours, expected = _ours(weights, cfg), _ours(reference, cfg)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)
    assert np.abs(expected - _ours(load_hf(base)[1], cfg)).max() > 1e-3


def test_gptq_and_awq_configs_say_which_modules_stay_dense():
    gptq = hf_quant.parse({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True,
                           "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.down_proj"]]})
    awq = hf_quant.parse({"quant_method": "awq", "bits": 4, "group_size": 64, "modules_to_not_convert": ["mlp."]})
    layer = "model.layers.3."
    assert [gptq.scheme_of(layer + m) is not None for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "mlp.down_proj", "mlp.up_proj")] == [True, False, True, False]
    assert gptq.scheme_of("lm_head").fmt == "int4" and awq.scheme_of("lm_head") is None
    assert awq.scheme_of(layer + "mlp.up_proj") is None and awq.scheme_of(layer + "self_attn.o_proj").group_size == 64


def _with_quantization_config(base, tmp_path, qc):
    out = tmp_path / "declared"
    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return out


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "GPTQ quantization_config: bits=3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "pack_dtype": "int16"}, "pack_dtype='int16'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {**INT4_G32, "actorder": "group"}}}}, "actorder='group'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}},
     "static activation scales"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {**INT4_G32, "num_bits": 3}}}}, "num_bits=3"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"g": {
        "targets": ["Linear"], "weights": INT4_G32}}}, "storage format 'marlin-24'"),
])
def test_unsupported_quantization_configs_are_refused_by_name(base, tmp_path, qc, match):
    path = _with_quantization_config(base, tmp_path, qc)
    with pytest.raises(CheckpointError, match=match):
        LLM(str(path))


def test_a_declared_scheme_whose_tensors_are_missing_names_the_tensor(base, tmp_path):
    """config.json says int4 but the files hold dense weights: one line naming the missing tensor."""
    path = _with_quantization_config(base, tmp_path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                                      "config_groups": {"g": {"targets": ["Linear"],
                                                                              "weights": INT4_G32}}})
    with pytest.raises(CheckpointError, match="q_proj.weight_scale' is missing"):
        load_hf(path)


EXPORTS = {  # name: LLM(quantization=..., quantization_config=...)
    "int4_g32": ("int4", {"group_size": 32}),
    "int8_gptq": ("int8", {"method": "gptq", "calibration": np.random.default_rng(1).integers(3, 128, (4, 32))}),
    "fp8": ("fp8_e4m3", {}),
    "w8a8_fp8": ("w8a8_fp8", {}),
    "hybrid": ("int4", {"group_size": 32, "overrides": {"w_down": "int8", "layers.0.wo": "fp8_e4m3"},
                        "skip": "layers.1.wqkv"}),
    "int8_head": ("int8", {"lm_head": "int8"}),
    "w8a8": ("w8a8", {}),  # round trip only: the activation conventions differ (see above)
    "nvfp4": ("nvfp4", {}),  # round trip only: transformers 5.24 cannot run NVFP4 on CPU (see above)
    "mxfp4": ("mxfp4", {}),
}


def _assert_same_weights(a, b):
    """Same codes, scales and zero points, bit for bit; NVFP4 tensor scales to an ulp (compressed-tensors
    stores their reciprocal)."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        if "tensor_scale" in jax.tree_util.keystr(path):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_quantized_models_export_to_compressed_tensors(base, tmp_path, name):
    """A model quantized here (RTN, GPTQ, hybrid policies) exports as a compressed-tensors checkpoint:
    transformers (with compressed-tensors) computes our logprobs from it, and it loads back into the
    same codes."""
    fmt, qc = EXPORTS[name]
    llm = LLM(str(base), dtype="float32", max_num_seqs=2, quantization=fmt, quantization_config=qc)
    out = tmp_path / "export"
    export_hf(out, llm.cfg, llm.weights, dtype="float32")
    if name not in ("w8a8", "nvfp4"):
        _, ref = _transformers(out, dequantize=name == "mxfp4")
        np.testing.assert_allclose(_ours(llm.weights, llm.cfg), ref, atol=1e-4)
    _, back = load_hf(out)
    _assert_same_weights(dense_layout(llm.weights), back)  # the arrays as stored, not as run
    assert LLM(str(out)).quantization.method == "compressed-tensors"


def test_a_quantized_head_of_tied_embeddings_exports_untied(tmp_path):
    tied = write_tiny("qwen2", tmp_path / "tied")
    llm = LLM(str(tied), dtype="float32", max_num_seqs=2, quantization="int4",
              quantization_config={"group_size": 32, "lm_head": "int8"})
    assert llm.cfg.tie_word_embeddings and llm.weights.lm_head.fmt == "int8"
    export_hf(tmp_path / "out", llm.cfg, llm.weights, dtype="float32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    _, ref = _transformers(tmp_path / "out")
    np.testing.assert_allclose(_ours(llm.weights, llm.cfg), ref, atol=1e-4)


@pytest.mark.parametrize("name", ["int4_g32_asym", "NVFP4A16"])
def test_loaded_checkpoints_export_back_unchanged(base, tmp_path, name):
    """Zero points and per-part NVFP4 global scales survive load -> export -> load."""
    cfg, weights = load_hf(write_compressed(base, tmp_path / name, SCHEMES[name][0]))
    export_hf(tmp_path / "again", cfg, weights, dtype="float32")
    _, back = load_hf(tmp_path / "again")
    _assert_same_weights(weights, back)


def test_export_refuses_what_compressed_tensors_cannot_hold(base, tmp_path):
    _, weights = load_hf(base)
    cfg, _ = load_hf(base)
    q = quantize_rtn(weights.layers[0].wo, "int4", 32)
    awq = weights.replace(layers=[weights.layers[0].replace(wo=q.replace(input_scale=jnp.ones(64))),
                                  *weights.layers[1:]])
    with pytest.raises(ValueError, match="AWQ's run-time input scales"):
        export_hf(tmp_path / "awq", cfg, awq)


# q/k/v biases; per-head q/k norms and an explicit head_dim; Phi-3's fused qkv_proj and gate_up_proj;
# StarCoder2's ungated MLP with biases; GPT-NeoX's per-head query_key_value and its own module names;
# Phi-2's dense, fc1 / fc2 and LM head bias; Cohere's tied head beside quantized projections; GLM-4's
# fused gate_up_proj beside separate q / k / v
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "starcoder2", "gpt_neox", "phi", "cohere", "glm4"])
def test_compressed_checkpoints_of_other_architectures_match_transformers(tmp_path, arch):
    base = write_tiny(arch, tmp_path / arch)
    path = write_compressed(base, tmp_path / f"{arch}_q", {"weights": {**INT4_G32, "group_size": 16}})
    cfg, weights = load_hf(path)
    assert weights.layers[0].wqkv.fmt == "int4"
    # transformers 5.24 runs a compressed GPT-NeoX to NaN logits unless it decompresses at load time
    _, ref = _transformers(path, dequantize=arch == "gpt_neox")
    np.testing.assert_allclose(_ours(weights, cfg), ref, atol=1e-4)


def test_the_most_specific_target_wins_whatever_the_group_order():
    """compressed-tensors resolves a module matched by several groups by its name first, then a
    regex, then the class name; the groups' order in config.json does not matter."""
    from jaxinfer.hf_quant import parse
    int8 = {"weights": INT8_CHANNEL}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"a": {"targets": ["Linear"], **int8},
                            "b": {"targets": ["re:.*mlp.*"], "weights": INT4_G32},
                            "c": {"targets": ["model.layers.0.mlp.down_proj"], "weights": {**INT4_G32, "group_size": 16}}}}
    ct = parse(qc)
    assert ct.scheme_of("model.layers.0.self_attn.q_proj").fmt == "int8"
    assert ct.scheme_of("model.layers.1.mlp.up_proj").group_size == 32
    assert ct.scheme_of("model.layers.0.mlp.down_proj").group_size == 16
    assert ct.scheme_of("lm_head") is None


# ----------------------------------------------------------------------------- mixture-of-experts checkpoints

MOE_PACKED = {  # name: (arch, writer, its arguments, the format the experts load as)
    "mixtral_gptq_int4_desc_act": ("mixtral", write_gptq, {"bits": 4, "group": 32, "sym": False, "desc_act": True},
                                   "int4"),
    "qwen2_moe_awq_int4": ("qwen2_moe", write_awq, {"group": 16}, "int4"),  # and its shared expert
}


@pytest.mark.parametrize("name", sorted(MOE_PACKED))
def test_moe_gptq_and_awq_checkpoints_load_their_experts_quantized(tmp_path, name):
    """GPTQ / AWQ checkpoints of MoE models store one quantized tensor set per expert and projection
    (the router stays dense): the experts load as one stacked QuantWeight (each expert's own codes,
    scales, zero points and, in activation order, its own feature permutation), and the model is the
    dense one with the dequantized weights."""
    arch, writer, kw, fmt = MOE_PACKED[name]
    base = write_tiny(arch, tmp_path / arch)
    dequantized = writer(base, tmp_path / "q", **kw)
    assert any(".experts.3." in m for m in dequantized) and not any(m.endswith("gate") for m in dequantized)
    cfg, weights = load_hf(tmp_path / "q")
    for layer in weights.layers:
        for field in ("experts_gate_up", "experts_down"):
            w = getattr(layer, field)
            assert isinstance(w, QuantWeight) and w.stacked and w.fmt == fmt and w.zero is not None, field
            assert w.data.shape[0] == cfg.num_experts
        assert not isinstance(layer.router, QuantWeight)
    perm = weights.layers[0].experts_gate_up.input_perm
    assert (perm is not None) == kw.get("desc_act", False)
    if perm is not None:
        assert not np.array_equal(perm[0], perm[1])  # each expert's own order
    _, reference = load_hf(_dense_copy(base, tmp_path / "dense", dequantized))
    ours, expected = _ours(weights, cfg), _ours(reference, cfg)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)
    assert np.abs(expected - _ours(load_hf(base)[1], cfg)).max() > 1e-3
    llm = LLM(str(tmp_path / "q"), dtype="float32", max_num_seqs=2, max_model_len=64)
    assert llm.quantization.method == kw.get("fmt", "gptq" if writer is write_gptq else "awq")


@pytest.mark.parametrize("arch, fmt, qc", [
    ("mixtral", "int4", {"group_size": 16}),
    ("qwen2_moe", "fp8_e4m3", {}),
    # round trip only: transformers 5.24 decodes every expert of a mixed-precision MoE checkpoint with one
    # scheme (these int8 down projections as int4 codes), while its dense modules load right
    ("mixtral", "int4", {"group_size": 16, "overrides": {"experts_down": "int8"}}),
])
def test_quantized_moe_models_export_to_compressed_tensors(tmp_path, arch, fmt, qc):
    """A MoE model quantized here exports its experts as the Hub lays them out, one compressed-tensors
    tensor set per expert and projection: transformers (with compressed-tensors) computes our logprobs
    from it, and it loads back into the same codes."""
    base = write_tiny(arch, tmp_path / arch)
    llm = LLM(str(base), dtype="float32", max_num_seqs=2, max_model_len=64, quantization=fmt, quantization_config=qc)
    out = tmp_path / "export"
    export_hf(out, llm.cfg, llm.weights, dtype="float32")
    targets = [t for g in json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
               for t in g["targets"]]
    expert = ("model.layers.1.block_sparse_moe.experts.3.w2" if arch == "mixtral"
              else "model.layers.1.mlp.experts.3.down_proj")
    assert expert in targets and not any(t.endswith(".gate") for t in targets)
    if not qc.get("overrides"):
        _, ref = _transformers(out)
        ours = _ours(llm.weights, llm.cfg)
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        _, dense_ref = _transformers(base)
        assert np.abs(ours - dense_ref).max() > 1e-2  # the quantization shows: the comparison above can fail
    _, back = load_hf(out)
    _assert_same_weights(dense_layout(llm.weights), back)
