"""Weight-only quantization: codecs, the quantized matmul, GPTQ, policies, and the LLM path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import write_tiny, write_tokenizer

from jaxinfer import LLM, SamplingParams
from jaxinfer.layers import matmul
from jaxinfer.model import forward
from jaxinfer.wquant import (ACT_FORMATS, FORMATS, QuantWeight, WeightQuantConfig, awq_quantize, clip_search, gptq_quantize,
                             quantize_rtn, weight_bytes)
from pallas_kernels import kv_formats as kvf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("wq_llama")
    write_tiny("llama", d, vocab_size=300, max_position_embeddings=128)
    write_tokenizer(d, 300)
    return d


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ACT_FORMATS])  # w8a8(_fp8) store int8 / fp8 codes
def test_rtn_round_trip_is_within_half_a_step(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32) * np.linspace(0.1, 3, 40)  # [K, N], columns scaled
    group = WeightQuantConfig(format=fmt).group_of(fmt, 96) if fmt != "int4" else 32
    q = quantize_rtn(w, fmt, group)
    assert q.shape == (96, 40) and q.nbytes < w.nbytes / 3
    back = np.asarray(q.dense())
    amax = np.abs(w.T.reshape(40, 96 // group, group)).max(-1)  # [N, groups]
    bound = np.repeat(amax, group, axis=1).T  # [K, N]: each weight's group absmax
    rel = {"int8": 0.5 / 127, "int4": 0.5 / 7, "fp8_e4m3": 2.0 ** -4, "nvfp4": 0.25, "mxfp4": 0.25}[fmt]
    assert np.all(np.abs(back - w) <= rel * bound + 1e-6)
    assert np.abs(back - w).max() > 0  # it did quantize


@pytest.mark.parametrize("fmt", ["int8", "int4", "nvfp4"])
def test_quantized_matmul_equals_the_dequantized_matrix(fmt):
    rng = np.random.default_rng(1)
    q = quantize_rtn(rng.standard_normal((64, 48)).astype(np.float32), fmt, 16 if fmt != "int8" else 64)
    dense = np.asarray(q.dense())
    for shape in [(64,), (1, 1, 64), (2, 3, 64), (3, 5, 64)]:  # one row, rows one by one (int8), wide
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), q)), x @ dense, rtol=1e-5, atol=1e-5)
    q = q.replace(input_scale=jnp.asarray(rng.uniform(0.5, 2.0, 64), jnp.float32))  # AWQ's input scale
    dense = np.asarray(q.dense())
    for shape in [(64,), (3, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(jax.jit(matmul)(jnp.asarray(x), q)), x @ dense, rtol=1e-5, atol=1e-5)
    xb = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    out = jax.jit(matmul)(xb, q)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xb, np.float32) @ dense, rtol=2e-2, atol=2e-2)


def test_w8a8_is_an_exact_int8_product_of_per_row_codes():
    """w8a8: each row of x is quantized to int8 with its own absmax scale and multiplied by the int8
    weight codes; the int32 sums are exact, so a row's result does not depend on the other rows."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    q = quantize_rtn(w, "w8a8", 64)
    codes, scale = np.asarray(q.data, np.float64), np.asarray(q.scale, np.float64)[:, 0]
    x = rng.standard_normal((20, 64)).astype(np.float32) * np.exp(rng.standard_normal((20, 1)))
    a = np.abs(x).max(1, keepdims=True) / 127
    ref = (np.clip(np.round(x / a), -127, 127) @ codes.T) * a * scale
    f = jax.jit(matmul)
    full = np.asarray(f(jnp.asarray(x), q))
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(3, 6)):  # one row (padded to two) and a few
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x[rows]), q)), full[rows])
    assert np.abs(full - x @ w).max() < 0.02 * np.abs(x @ w).max()


def test_w8a8_fp8_multiplies_per_row_float8_activations():
    """w8a8_fp8: each row of x is rounded to float8_e4m3fn with its own absmax / 448 scale (what
    vLLM's dynamic per-token FP8 does) and multiplied by the per-channel fp8 weights."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    q = quantize_rtn(w, "w8a8_fp8", 64)
    assert q.data.dtype == jnp.float8_e4m3fn and q.scale.shape == (40, 1)
    x = rng.standard_normal((7, 64)).astype(np.float32) * np.exp(rng.standard_normal((7, 1)))
    a = np.abs(x).max(1, keepdims=True) / 448
    xq = np.asarray(jnp.asarray(x / a).astype(jnp.float8_e4m3fn), np.float64) * a
    ref = xq @ np.asarray(q.dense(), np.float64)
    f = jax.jit(matmul)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x), q)), ref, rtol=1e-5, atol=1e-5)
    weight_only = x @ np.asarray(q.dense())
    assert np.abs(weight_only - ref).max() > 1e-3  # the activations were rounded
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x[2:3]), q)), np.asarray(f(jnp.asarray(x), q))[2:3],
                               rtol=1e-6, atol=1e-6)  # a row's scale is its own


def test_gptq_reconstructs_correlated_inputs_better_than_rtn():
    """GPTQ minimises ||X W - X Q||: with correlated input features its error pushes the rounding of
    each column onto the columns it correlates with, so the layer output error falls well below RTN's."""
    rng = np.random.default_rng(2)
    k, n = 64, 32
    x = rng.standard_normal((2048, 16)) @ rng.standard_normal((16, k)) + 0.1 * rng.standard_normal((2048, k))
    w = rng.standard_normal((k, n))
    h = 2.0 * x.T @ x / len(x)
    for fmt, group in (("int4", 32), ("int8", 64)):
        g = gptq_quantize(w, h, fmt, group)
        r = quantize_rtn(w, fmt, group)
        codes = np.asarray(kvf.decode_values(g.data, fmt))
        assert codes.min() >= -kvf.QMAX[fmt] - 1 and codes.max() <= kvf.QMAX[fmt]
        err_g = np.mean((x @ w - x @ np.asarray(g.dense(), np.float64)) ** 2)
        err_r = np.mean((x @ w - x @ np.asarray(r.dense(), np.float64)) ** 2)
        assert err_g < 0.5 * err_r, (fmt, err_g, err_r)


def test_gptq_act_order_quantizes_high_energy_inputs_first():
    """With input features of very different energy, GPTQ in activation order (largest H diagonal
    first, static groups) leaves the rounding error of the important columns to many columns
    still free to absorb it: the output error falls far below GPTQ in index order, in the same
    format (scales per contiguous group)."""
    rng = np.random.default_rng(0)
    k, n = 128, 64
    x = (rng.standard_normal((4096, 32)) @ rng.standard_normal((32, k)) + 0.1 * rng.standard_normal((4096, k)))
    x = x * np.exp(rng.standard_normal(k))
    w = rng.standard_normal((k, n))
    h = 2.0 * x.T @ x / len(x)
    for fmt, group in (("int4", 32), ("int8", 128)):
        plain, ordered = gptq_quantize(w, h, fmt, group), gptq_quantize(w, h, fmt, group, act_order=True)
        assert ordered.scale.shape == plain.scale.shape == (n, k // group)
        err = [np.mean((x @ w - x @ np.asarray(q.dense(), np.float64)) ** 2) for q in (plain, ordered)]
        assert err[1] < 0.2 * err[0], (fmt, err)
    with pytest.raises(ValueError, match="act_order"):
        WeightQuantConfig.from_args("int4", {"act_order": True})  # RTN has no order


def test_awq_protects_salient_channels():
    """With a few input channels carrying large activations, AWQ's searched scales cut the output
    error well below RTN's, for every format (alpha = 0 would be RTN itself)."""
    rng = np.random.default_rng(3)
    k, n = 128, 64
    x = (rng.standard_normal((2048, k)) * np.exp(1.5 * rng.standard_normal(k))).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    for fmt, group in (("int4", 32), ("int8", 128), ("fp8_e4m3", 128), ("nvfp4", 16)):
        q, alpha = awq_quantize(w, x, fmt, group)
        err_a = np.mean((x @ w - x @ np.asarray(q.dense())) ** 2)
        err_r = np.mean((x @ w - x @ np.asarray(quantize_rtn(w, fmt, group).dense())) ** 2)
        assert alpha > 0 and err_a < 0.8 * err_r, (fmt, alpha, err_a, err_r)


def test_clip_search_trades_a_few_large_weights_for_finer_steps():
    """A few outlier weights stretch their group's int4 scale; clipping them (the ratio chosen per
    group on the calibration rows) lowers the output error, and no group does worse than RTN."""
    rng = np.random.default_rng(5)
    k, n, g = 128, 96, 32
    x = rng.standard_normal((1024, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[rng.random((k, n)) < 0.004] *= 10
    c, r = clip_search(w, x, "int4", g), quantize_rtn(w, "int4", g)
    codes = np.asarray(kvf.decode_values(c.data, "int4"))
    assert codes.min() >= -8 and codes.max() <= 7
    err = lambda q: (x @ w - x @ np.asarray(q.dense())) ** 2  # noqa: E731
    assert err(c).mean() < 0.9 * err(r).mean()
    seen = x[:512]  # the rows clip_search scores on (its default)
    per_group = lambda q: ((seen.reshape(512, k // g, g).transpose(1, 0, 2)  # noqa: E731
                            @ (w - np.asarray(q.dense())).reshape(k // g, g, n)) ** 2).sum(1)
    assert np.all(per_group(c) <= per_group(r) * (1 + 1e-4) + 1e-7)


def test_config_validation_and_policies():
    with pytest.raises(ValueError, match="quantization='int3'"):
        WeightQuantConfig.from_args("int3", None)
    with pytest.raises(ValueError, match="unknown quantization_config keys"):
        WeightQuantConfig.from_args("int8", {"bits": 4})
    with pytest.raises(ValueError, match="gptq"):
        WeightQuantConfig.from_args("nvfp4", {"method": "gptq"})
    with pytest.raises(ValueError, match="group_size"):
        WeightQuantConfig.from_args("int4", {"group_size": 0})
    with pytest.raises(ValueError, match="overrides="):
        WeightQuantConfig.from_args("int4", {"overrides": [("w_down", "int8")]})
    with pytest.raises(ValueError, match="skip="):
        WeightQuantConfig.from_args("int4", {"skip": 3})
    assert WeightQuantConfig.from_args("int4", {"skip": "layers.0"}).skip == ("layers.0",)
    last = WeightQuantConfig.from_args("int4", {"overrides": {"w_down": "int8", "layers.0": "fp8_e4m3"}})
    assert last.format_of("layers.0.w_down") == "fp8_e4m3" and last.format_of("layers.1.w_down") == "int8"
    with pytest.raises(ValueError, match="needs quantization"):
        WeightQuantConfig.from_args(None, {"method": "gptq"})
    with pytest.raises(ValueError, match="does not divide"):
        WeightQuantConfig(format="int4", group_size=48).group_of("int4", 64)
    with pytest.raises(ValueError, match="w8a8 scales each output channel"):
        WeightQuantConfig.from_args("w8a8", {"group_size": 32})
    assert WeightQuantConfig(format="int4", group_size=32).group_of("w8a8", 96) == 96
    with pytest.raises(ValueError, match="must be even"):
        WeightQuantConfig(format="int4", group_size=3).group_of("int4", 96)
    qc = WeightQuantConfig.from_args("int4", {"skip": ["layers.0"], "overrides": {"w_down": "int8", "layers.1.wo": "fp8_e4m3"}})
    assert qc.format_of("layers.0.wqkv") is None and qc.format_of("layers.0.w_down") is None
    assert qc.format_of("layers.1.w_down") == "int8" and qc.format_of("layers.1.wo") == "fp8_e4m3"
    assert qc.format_of("layers.1.wqkv") == "int4" and qc.format_of("layers.10.wqkv") == "int4"
    assert qc.group_of("int4", 96) == 96 and qc.group_of("int8", 96) == 96 and qc.group_of("nvfp4", 96) == 16


def test_llm_quantized_equals_its_fake_quant_reference(tiny):
    """Prompt logprobs of LLM(quantization=...) through the engine equal a plain forward of the
    dense model whose projections are the dequantized matrices, and the hybrid policy keeps what
    it says dense; the LM head is quantized too (lm_head)."""
    qconf = {"group_size": 32, "skip": ["layers.0.wo"], "overrides": {"w_down": "int8"}, "lm_head": "int8"}
    llm = LLM(str(tiny), dtype="float32", max_num_seqs=4, quantization="int4", quantization_config=qconf)
    layers = llm.weights.layers
    assert not isinstance(layers[0].wo, QuantWeight) and isinstance(layers[1].wo, QuantWeight)
    assert layers[0].w_down.fmt == "int8" and layers[0].wqkv.fmt == "int4" and layers[0].wqkv.group == 32
    sizes = weight_bytes(llm.weights)
    assert 0 < sizes["quantized"] < sizes["dense_projections"] * 4
    assert llm.weights.lm_head.fmt == "int8" and sizes["lm_head"] < llm.weights.embed.nbytes / 3
    _assert_matches_fake_quant(llm, _fake_quant(llm.weights))
    calib = np.random.default_rng(1).integers(3, 300, size=(4, 48))
    awq = LLM(str(tiny), dtype="float32", max_num_seqs=4, quantization="int4",
              quantization_config={"method": "awq", "group_size": 32, "calibration": calib})
    assert all(lw.wqkv.input_scale is not None for lw in awq.weights.layers)
    _assert_matches_fake_quant(awq, _fake_quant(awq.weights))


@jax.jit  # one program; op by op, each dequantization compiled a dozen small ones per matrix shape
def _fake_quant(weights):
    """The dense model whose projections (and LM head) are the dequantized matrices."""
    def dense(w):
        return w.dense() if isinstance(w, QuantWeight) else w
    return weights.replace(lm_head=dense(weights.lm_head), layers=[
        lw.replace(**{n: dense(getattr(lw, n)) for n in ("wqkv", "wo", "w_gate_up", "w_down")})
        for lw in weights.layers])


def _assert_matches_fake_quant(llm, fake):
    ids = [5, 17, 99, 3, 250, 42, 8, 77, 1, 64, 23]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logits, _, _ = forward(fake, llm.cfg, jnp.asarray([ids]), jnp.arange(len(ids))[None], None, None)
    ref = np.asarray(jax.nn.log_softmax(logits[0], -1))
    got = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    np.testing.assert_allclose(got, [ref[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)


@pytest.mark.parametrize("quant", ["int4", "w8a8"])
def test_quantized_engine_matches_static_and_gptq_runs(tiny, quant):
    """The engine (batched rows, chunked prefill) and the static loop at batch 1 (one-row products)
    generate the same greedy tokens; GPTQ calibrates on given token windows."""
    calib = np.random.default_rng(0).integers(3, 300, size=(4, 48))
    llm = LLM(str(tiny), dtype="float32", max_num_seqs=4, quantization=quant,
              quantization_config={"method": "gptq", "group_size": 32 if quant == "int4" else None,
                                   "calibration": calib})
    assert all(isinstance(lw.w_down, QuantWeight) and lw.w_down.fmt == quant for lw in llm.weights.layers)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": [7, 8, 9, 10]}, {"prompt_token_ids": [40, 41, 2, 99, 100, 5]}]
    engine = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    static = [llm.generate_static([p], sp, batch_size=1)[0].outputs[0].token_ids for p in prompts]
    assert engine == static
    if quant == "w8a8":
        return
    with pytest.raises(ValueError, match="calibration must be integer token ids"):
        LLM(str(tiny), quantization="int8", quantization_config={"method": "gptq", "calibration": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        LLM(str(tiny), quantization="int8", quantization_config={"method": "gptq", "calibration": [[1, 300]]})


def test_speculative_decoding_stays_lossless_on_a_quantized_target(tiny):
    """N-gram speculation over an int8 target verifies k + 1 rows per step (the row-by-row tied
    product) where plain decoding runs one row: the greedy tokens are the same."""
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": [7, 8, 9, 7, 8, 9, 7, 8]}, {"prompt_token_ids": [40, 41, 42, 40, 41]}]
    plain = LLM(str(tiny), dtype="float32", max_num_seqs=2, quantization="int8")
    spec = LLM(str(tiny), dtype="float32", max_num_seqs=2, quantization="int8",
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                                   "prompt_lookup_min": 1})
    ref = [o.outputs[0].token_ids for o in plain.generate_static(prompts, sp, batch_size=2)]
    assert [o.outputs[0].token_ids for o in spec.generate_static(prompts, sp, batch_size=2)] == ref


def test_saved_quantized_model_reloads_without_calibrating_again(tiny, tmp_path):
    calib = np.random.default_rng(2).integers(3, 300, size=(4, 48))
    llm = LLM(str(tiny), dtype="float32", max_num_seqs=2, quantization="int4",
              quantization_config={"method": "awq", "group_size": 32, "calibration": calib,
                                   "overrides": {"w_down": "w8a8"}, "lm_head": "int4"})
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": [7, 8, 9, 10, 11]}
    ref = llm.generate(prompt, sp)[0].outputs[0].token_ids
    llm.save(tmp_path / "q")
    again = LLM(str(tmp_path / "q"), max_num_seqs=2)
    assert again.quantization == llm.quantization
    for a, b in zip(jax.tree_util.tree_leaves(llm.weights), jax.tree_util.tree_leaves(again.weights)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert again.weights.layers[1].w_down.fmt == "w8a8" and again.weights.layers[1].wqkv.input_scale is not None
    assert again.weights.lm_head.fmt == "int4"
    assert again.generate(prompt, sp)[0].outputs[0].token_ids == ref
    assert again.get_tokenizer() is not None
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(tmp_path / "q"), quantization="int8")
    dense = LLM(str(tiny), dtype="float32", max_num_seqs=2)
    dense.save(tmp_path / "d")  # a dense save quantizes on load like an HF directory
    assert isinstance(LLM(str(tmp_path / "d"), quantization="int8").weights.layers[0].wo, QuantWeight)


@pytest.mark.parametrize("arch, fmt, qconf", [
    ("llama", "int4", {"group_size": 32, "skip": ["layers.0.wo"], "overrides": {"w_down": "nvfp4"}, "lm_head": "int8"}),
    ("qwen2", "w8a8", {"lm_head": "int4"}),  # tied embeddings: the quantized head is a copy; q/k/v biases
    ("qwen2_moe", "int4", {"group_size": 16, "overrides": {"experts_down": "nvfp4"}, "skip": "layers.0.experts_gate_up"}),
])
def test_memory_calculator_counts_quantized_weights_as_llm_holds_them(tmp_path, arch, fmt, qconf):
    from jaxinfer.kv.memory import memory_report
    path = write_tiny(arch, tmp_path / arch)
    llm = LLM(str(path), dtype="float32", max_num_seqs=2, quantization=fmt, quantization_config=qconf)
    report = memory_report(llm.cfg, 1, 16, weights_dtype="float32", quantization=fmt, quantization_config=qconf)
    assert report.weights_bytes == weight_bytes(llm.weights)["total"]
    assert report.weights_bytes < memory_report(llm.cfg, 1, 16, weights_dtype="float32").weights_bytes
