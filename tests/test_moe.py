"""Mixture-of-experts MLPs (jaxinfer.moe): the three implementations against a per-token reference,
Hub configs as transformers reads them, and the options MoE models refuse. Parity of whole
Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE models with transformers is in test_parity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import moe
from jaxinfer.config import ConfigError, ModelConfig

BASE = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=64, hidden_size=16, intermediate_size=24,
                   num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                   num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12)


def _reference(x, router, w_gate_up, w_down, k, renorm):
    """Token by token, in float64: softmax, top k, (renormalize), sum of the chosen SwiGLU experts."""
    x, router, w_gate_up, w_down = (np.asarray(a, np.float64) for a in (x, router, w_gate_up, w_down))
    out = np.zeros_like(x)
    for m, row in enumerate(x):
        logits = row @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:k]
        w = p[top] / (p[top].sum() if renorm else 1.0)
        for e, we in zip(top, w):
            gate, up = np.split(row @ w_gate_up[e], 2)
            out[m] += we * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


@pytest.mark.parametrize("impl", ["dense", "skip", "grouped"])
@pytest.mark.parametrize("k,renorm", [(2, True), (3, False), (1, True)])
@pytest.mark.parametrize("m", [1, 5, 37, 150])  # 150: "grouped" runs several chunks per expert
def test_implementations_match_per_token_reference(impl, k, renorm, m):
    cfg = dataclasses.replace(BASE, num_experts_per_tok=k, norm_topk_prob=renorm)
    keys = jax.random.split(jax.random.PRNGKey(m * 10 + k), 4)
    x = jax.random.normal(keys[0], (m, 16))
    router = jax.random.normal(keys[1], (16, 6))
    w_gate_up = 0.3 * jax.random.normal(keys[2], (6, 16, 24))
    w_down = 0.3 * jax.random.normal(keys[3], (6, 12, 16))
    got = jax.jit(lambda *a: moe.sparse_mlp(*a, cfg, impl=impl))(x, router, w_gate_up, w_down)
    np.testing.assert_allclose(np.asarray(got), _reference(x, router, w_gate_up, w_down, k, renorm),
                               rtol=2e-5, atol=2e-5)


def test_skip_never_reads_an_expert_no_token_chose():
    """Expert 0's weights are NaN and the router never picks it: "skip" does not run it (its result
    is the reference), while "dense" multiplies it by a zero weight and returns NaN."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (3, 16)).at[:, 0].set(1.0)
    router = jax.random.normal(keys[1], (16, 6)).at[:, 0].set(0.0).at[0, 0].set(-1e3)  # expert 0's logit: -1000
    w_gate_up = (0.3 * jax.random.normal(keys[2], (6, 16, 24))).at[0].set(jnp.nan)
    w_down = (0.3 * jax.random.normal(keys[3], (6, 12, 16))).at[0].set(jnp.nan)
    skip = np.asarray(moe.sparse_mlp(x, router, w_gate_up, w_down, BASE, impl="skip"))
    ok = w_gate_up.at[0].set(0.0), w_down.at[0].set(0.0)
    np.testing.assert_allclose(skip, _reference(x, router, *ok, 2, True), rtol=2e-5, atol=2e-5)
    assert np.isnan(np.asarray(moe.sparse_mlp(x, router, w_gate_up, w_down, BASE, impl="dense"))).all()


def test_choose_impl():
    """On CPU: "skip" while the experts average fewer than 16 rows, else "grouped"; "dense" elsewhere."""
    assert moe.choose_impl(47, BASE, "cpu") == "skip"  # 94 assignments < 16 x 6 experts
    assert moe.choose_impl(48, BASE, "cpu") == "grouped"
    assert moe.choose_impl(1, BASE, "gpu") == "dense"
    with pytest.raises(ValueError, match="impl='ragged'"):
        moe.sparse_mlp(jnp.ones((1, 16)), jnp.ones((16, 6)), jnp.ones((6, 16, 24)), jnp.ones((6, 12, 16)), BASE,
                       impl="ragged")


# Hub config.json files (mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B, Qwen/Qwen1.5-MoE-A2.7B,
# allenai/OLMoE-1B-7B-0924), the keys that matter
HUB_MOE = {
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "bos_token_id": 1,
                     "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                     "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
                     "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
                     "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                     "vocab_size": 32000},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
                      "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144,
                      "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                      "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
                      "vocab_size": 151936},
    "qwen1.5-moe-a2.7b": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                          "decoder_sparse_step": 1, "hidden_size": 2048, "intermediate_size": 5632,
                          "max_position_embeddings": 8192, "moe_intermediate_size": 1408, "norm_topk_prob": False,
                          "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
                          "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
                          "rope_theta": 1000000.0, "shared_expert_intermediate_size": 5632,
                          "tie_word_embeddings": False, "vocab_size": 151936},
    "olmoe-1b-7b": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
                    "clip_qkv": None, "eos_token_id": 50279, "hidden_size": 2048, "intermediate_size": 1024,
                    "max_position_embeddings": 4096, "norm_topk_prob": False, "num_attention_heads": 16,
                    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
                    "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
                    "vocab_size": 50304},
}


@pytest.mark.parametrize("name", sorted(HUB_MOE))
def test_hub_configs_count_what_transformers_builds(name):
    """Each Hub config reads as transformers reads it: the parameters its model builds (on the meta
    device) are ModelConfig.num_params, and the config written back reads the same."""
    import transformers
    hf = HUB_MOE[name]
    cfg = ModelConfig.from_hf_dict(hf)
    model_cls = getattr(transformers, hf["architectures"][0])
    with torch.device("meta"):
        model = model_cls(transformers.AutoConfig.for_model(**hf))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_sparse_step_and_mlp_only_layers_make_dense_layers():
    hf = {**HUB_MOE["qwen3-30b-a3b"], "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.dense_layers == (0, 2, 3, 4)  # (i + 1) % 2 != 0, and layer 3 listed
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_bad_moe_configs_name_the_value():
    with pytest.raises(ConfigError, match="num_experts_per_tok=9"):
        ModelConfig.from_hf_dict({**HUB_MOE["mixtral-8x7b"], "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="moe_intermediate_size=0"):
        dataclasses.replace(BASE, moe_intermediate_size=0)
    with pytest.raises(ConfigError, match=r"dense_layers=\[5\]"):
        dataclasses.replace(BASE, dense_layers=(5,))
    with pytest.raises(ConfigError, match="num_experts=6 needs a mixture-of-experts architecture"):
        dataclasses.replace(BASE, architecture="LlamaForCausalLM")
    with pytest.raises(ConfigError, match="only Qwen2MoeForCausalLM has a shared expert"):
        dataclasses.replace(BASE, shared_expert_intermediate_size=8)
    with pytest.raises(ConfigError, match="MixtralForCausalLM renormalizes"):
        dataclasses.replace(BASE, architecture="MixtralForCausalLM", norm_topk_prob=False)
    with pytest.raises(ConfigError, match="moe_impl='sparse'"):
        dataclasses.replace(BASE, moe_impl="sparse")
    with pytest.raises(ConfigError, match="clip_qkv=8.0 is not supported"):
        ModelConfig.from_hf_dict({**HUB_MOE["olmoe-1b-7b"], "clip_qkv": 8.0})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf_dict({**HUB_MOE["qwen3-30b-a3b"], "use_sliding_window": True})


def test_moe_impl_chooses_the_implementation_with_the_same_output(tmp_path):
    """LLM(moe_impl=...) sets how the experts run; greedy tokens and prompt logprobs are the same
    for each (qwen3_moe: top 2 of 8 experts; "auto" runs "skip" here).
    A dense model refuses the option."""
    from hf_models import write_tiny

    from jaxinfer import LLM, SamplingParams
    path = write_tiny("qwen3_moe", tmp_path / "qwen3_moe")
    prompts = [{"prompt_token_ids": [5, 9, 17, 33, 65, 3, 7]}, {"prompt_token_ids": [40, 41, 42]}]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, prompt_logprobs=0)
    outs = {}
    for impl in ("auto", "dense", "skip", "grouped"):
        llm = LLM(str(path), dtype="float32", moe_impl=impl, max_model_len=64)
        assert llm.cfg.moe_impl == impl
        outs[impl] = llm.generate(prompts, params)
    for impl, got in outs.items():
        for a, b in zip(outs["auto"], got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, impl
            lp = [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in (a, b)]
            np.testing.assert_allclose(lp[1], lp[0], atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="moe_impl='dense'.*dense model"):
        LLM(str(write_tiny("llama", tmp_path / "llama")), moe_impl="dense")


def test_bad_moe_impl_is_refused(tmp_path):
    from hf_models import write_tiny

    from jaxinfer import LLM
    with pytest.raises(ValueError, match="moe_impl='sparse'"):
        LLM(str(write_tiny("mixtral", tmp_path / "mixtral")), moe_impl="sparse")


# ----------------------------------------------------------------------------- quantized experts

def _fake_quant(weights):
    """The dense model whose projections and experts are the dequantized matrices."""
    from jaxinfer.wquant import QUANT_MODULES, QuantWeight
    dense = lambda w: w.dense() if isinstance(w, QuantWeight) else w
    return weights.replace(layers=[lw.replace(**{n: dense(getattr(lw, n)) for n in QUANT_MODULES})
                                   for lw in weights.layers])


def _prompt_logprobs(llm, ids):
    from jaxinfer import SamplingParams
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return np.array([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])


def _forward_logprobs(weights, cfg, ids):
    from jaxinfer.model import forward
    logits, _, _ = jax.jit(forward, static_argnums=1)(weights, cfg, jnp.asarray([ids]), jnp.arange(len(ids))[None],
                                                      None, None)
    lp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    return lp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.parametrize("impl, fmt, qconf", [
    ("skip", "int4", {"group_size": 16, "overrides": {"experts_down": "int8"}}),
    ("grouped", "nvfp4", {}),
    ("dense", "int8", {"method": "awq", "calibrate_all_experts": False}),
])
def test_quantized_experts_compute_their_dequantized_weights(tmp_path, impl, fmt, qconf):
    """Qwen2-MoE (routed experts and a shared expert) quantized: every expert is a stacked QuantWeight
    with its own scales, the shared expert a plain one, the router dense; prompt logprobs through the
    engine, whichever way the experts run, equal a plain forward of the dense model holding the
    dequantized matrices, which quantization moved away from the original's."""
    from hf_models import write_tiny

    from jaxinfer import LLM
    from jaxinfer.wquant import QuantWeight
    path = write_tiny("qwen2_moe", tmp_path / "m")
    ids = [5, 17, 99, 3, 120, 42, 8, 77, 1, 64, 23, 31, 2, 90]
    if qconf.get("method"):
        qconf = {**qconf, "calibration": np.random.default_rng(0).integers(3, 128, size=(4, 32))}
    llm = LLM(str(path), dtype="float32", max_num_seqs=2, max_model_len=64, moe_impl=impl, quantization=fmt,
              quantization_config=qconf)
    layer = llm.weights.layers[0]
    e = llm.cfg.num_experts
    assert isinstance(layer.experts_gate_up, QuantWeight) and layer.experts_gate_up.stacked
    assert layer.experts_gate_up.data.shape[0] == layer.experts_gate_up.scale.shape[0] == e
    assert layer.experts_down.fmt == ("int8" if "experts_down" in str(qconf) else fmt)
    assert isinstance(layer.w_gate_up, QuantWeight) and not layer.w_gate_up.stacked  # the shared expert
    assert not isinstance(layer.router, QuantWeight) and not isinstance(layer.shared_gate, QuantWeight)
    if qconf.get("method") == "awq":
        assert layer.experts_gate_up.input_scale.shape == (e, llm.cfg.hidden_size)  # one per expert
        assert not np.allclose(layer.experts_gate_up.input_scale[0], layer.experts_gate_up.input_scale[1])
    fake = _fake_quant(llm.weights)
    got, want = _prompt_logprobs(llm, ids), _forward_logprobs(fake, llm.cfg, ids)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - _forward_logprobs(LLM(str(path), dtype="float32", max_model_len=64).weights, llm.cfg,
                                           ids)).max() > 1e-3


@pytest.mark.parametrize("all_tokens", [False, True])
def test_experts_calibrate_on_the_tokens_routed_to_them(all_tokens):
    """While GPTQ / AWQ calibrate, expert j's observer records exactly the rows the router sends it
    (H = 2 X_j^T X_j / n_j), or every row with calibrate_all_experts; the layer's output is still the
    routed experts' (the reference)."""
    from jaxinfer.wquant import ExpertsObserver
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], (40, 16))
    router = jax.random.normal(keys[1], (16, 6))
    w_gate_up, w_down = 0.3 * jax.random.normal(keys[2], (6, 16, 24)), 0.3 * jax.random.normal(keys[3], (6, 12, 16))
    probe = ExpertsObserver(w_gate_up, hessian=True, keep_rows=8, all_tokens=all_tokens)
    with jax.disable_jit():
        got = moe.sparse_mlp(x, router, probe, w_down, BASE)
    np.testing.assert_allclose(np.asarray(got), _reference(x, router, w_gate_up, w_down, 2, BASE.norm_topk_prob),
                               rtol=2e-5, atol=2e-5)
    _, chosen = moe.route(x, router, BASE)
    chosen = np.asarray(chosen)
    for j, obs in enumerate(probe.experts):
        rows = np.asarray(x, np.float64) if all_tokens else np.asarray(x, np.float64)[(chosen == j).any(1)]
        assert obs.rows == len(rows) and len(obs.sample()) == min(8, len(rows))
        np.testing.assert_allclose(obs.hessian, 2 * rows.T @ rows / max(len(rows), 1), rtol=1e-5, atol=1e-6)
    assert sorted(o.rows for o in probe.experts) != [40] * 6 or all_tokens


def test_gptq_experts_reconstruct_their_inputs_better_than_rounding(tmp_path):
    """GPTQ on a MoE model: each expert's quantized gate/up reproduces the expert's calibration
    inputs' products with less error than round to nearest (what the per-expert Hessians buy), and
    the quantized model saves and reloads without calibrating again."""
    from hf_models import write_tiny

    from jaxinfer import LLM
    from jaxinfer.kv.cache import AttentionMeta
    from jaxinfer.layers import rms_norm
    from jaxinfer.model import attention_block, embed_tokens, layer_rope
    from jaxinfer.wquant import quantize_experts_rtn
    path = write_tiny("mixtral", tmp_path / "m")
    calib = np.random.default_rng(1).integers(3, 128, size=(4, 32))
    llm = LLM(str(path), dtype="float32", max_num_seqs=2, max_model_len=64, quantization="int4",
              quantization_config={"method": "gptq", "group_size": 16, "calibration": calib})
    dense = LLM(str(path), dtype="float32", max_model_len=64).weights.layers[0]
    w = np.asarray(dense.experts_gate_up)
    # layer 0's MLP input: its (quantized) attention block's output (calibrate_all_experts: every token, every expert)
    cfg = llm.cfg
    s, t = calib.shape
    h = embed_tokens(llm.weights, cfg, jnp.asarray(calib))
    rope = layer_rope(cfg, jnp.broadcast_to(jnp.arange(t), (s, t)), h.dtype)[0]
    full = jnp.full((s,), t, jnp.int32)
    meta = AttentionMeta(page_table=jnp.zeros((s, 1), jnp.int32), kv_lens=full, q_lens=full, contiguous=True)
    layer = llm.weights.layers[0]
    attn, _, _ = attention_block(layer, cfg, h, *rope, None, None, meta, "xla", None)
    xs = np.asarray(rms_norm(h + attn, layer.mlp_norm, cfg.rms_norm_eps, cfg.norm_style)).reshape(-1, cfg.hidden_size)
    rtn = np.asarray(quantize_experts_rtn(w, "int4", 16).dense())
    gptq = np.asarray(layer.experts_gate_up.dense())
    for j in range(cfg.num_experts):
        err = lambda q: np.sum((xs @ w[j] - xs @ q[j]) ** 2)  # noqa: B023
        assert err(gptq) < 0.7 * err(rtn), j  # measured 0.34-0.36
    llm.save(tmp_path / "saved")
    again = LLM(str(tmp_path / "saved"), max_num_seqs=2, max_model_len=64)
    assert again.quantization.method == "gptq" and again.weights.layers[1].experts_down.stacked
    ids = [5, 17, 99, 3, 120, 42, 8, 77]
    np.testing.assert_array_equal(_prompt_logprobs(again, ids), _prompt_logprobs(llm, ids))


def test_a_policy_pattern_that_names_no_module_is_refused():
    """A MoE layer without a shared expert has no w_gate_up / w_down: a policy naming them (or a layer
    the model lacks) is refused, naming the pattern and the modules there are; expert patterns work."""
    from jaxinfer.model import init_weights
    from jaxinfer.wquant import QuantWeight, WeightQuantConfig, quantize_weights
    weights = init_weights(BASE, jax.random.PRNGKey(0))
    for conf, match in [({"skip": ["w_down"]}, "skip pattern 'w_down'.*experts_gate_up, experts_down"),
                        ({"overrides": {"layers.2": "int8"}}, "override pattern 'layers.2'.*layers.0 .. layers.1")]:
        with pytest.raises(ValueError, match=match):
            quantize_weights(weights, BASE, WeightQuantConfig.from_args("int4", conf))
    q = quantize_weights(weights, BASE, WeightQuantConfig.from_args("int4", {"skip": ["experts_down"],
                                                                              "overrides": {"layers.1.wo": "int8"}}))
    assert isinstance(q.layers[0].experts_gate_up, QuantWeight) and not isinstance(q.layers[0].experts_down, QuantWeight)
    assert q.layers[1].wo.fmt == "int8" and q.layers[0].wo.fmt == "int4"
