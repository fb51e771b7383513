"""The choices jaxinfer makes off CPU (GPU, TPU), exercised on CPU CI.

`jax.default_backend()` is made to answer "gpu" for jaxinfer's own choices: bfloat16 as the "auto"
dtype, bf16 caches held as bf16 rather than as bits, the paged XLA attention through
`attention_reference` over page tables cut to the rows' lengths (`layers.attention_loops_pay`),
weights without the CPU layouts (`model.runtime_layout`, `model.loop_layout`). XLA still compiles
for the CPU, so `lax.platform_dependent` branches stay CPU's. Programs traced under these choices
are dropped afterwards, so none serves a later test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import write_tiny

from jaxinfer import LLM, SamplingParams
from jaxinfer.layers import PanelWeight, TiedHead, TransposedWeight


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("accel_model")
    write_tiny("llama3", d, vocab_size=300, max_position_embeddings=512)  # MQA (G = 4), tied embeddings
    return str(d)


def _prompts(n=6, seed=3):
    """Prompts of 2-40 tokens and one of 270: page tables cut to the rows' lengths take two widths."""
    rng = np.random.default_rng(seed)
    lengths = [*rng.integers(2, 40, size=n - 1).tolist(), 270]
    return [{"prompt_token_ids": rng.integers(3, 300, size=k).tolist()} for k in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=0)
# num_kv_pages: the pages these prompts need, not the default 512 MiB. Off CPU a bf16 cache is held as
# bf16, and XLA:CPU (which still compiles these programs) converts the whole of such a cache to float32
# around its K/V writes and page gathers (why the CPU paths keep one as uint16 bits): at the default
# size that took ~0.8 s a step, 74 s of this module's bf16 test.
OPTS = {"enable_prefix_caching": False, "max_num_seqs": 4, "max_num_batched_tokens": 24, "block_size": 8,
        "num_kv_pages": 128}


@pytest.fixture
def off_cpu(monkeypatch):
    """A function that switches jaxinfer's platform choices to a GPU's for the rest of the test
    (dropping the programs traced before: some take the same shapes)."""
    def switch():
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        jax.clear_caches()
    yield switch
    jax.clear_caches()


def _run(llm: LLM):
    prompts = _prompts()
    engine, static = llm.generate(prompts, GREEDY), llm.generate_static(prompts, GREEDY, batch_size=4)
    tokens = [o.outputs[0].token_ids for o in engine]
    plp = np.array([lp[t].logprob for o in engine for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])])
    return tokens, [o.outputs[0].token_ids for o in static], plp


@pytest.fixture(scope="module")
def cpu_run(model_dir):
    """_run on CPU's choices, float32: what the off-CPU paths are compared with (computed once:
    each test's off_cpu drops the programs afterwards)."""
    return _run(LLM(model_dir, dtype="float32", **OPTS))


def test_float32_off_cpu_choices_give_the_cpu_tokens(model_dir, cpu_run, off_cpu):
    cpu = LLM(model_dir, dtype="float32", **OPTS)
    assert isinstance(cpu.weights.lm_head, (TiedHead, PanelWeight))  # a CPU layout's copy, for contrast
    ref_tokens, ref_static, ref_plp = cpu_run
    off_cpu()
    llm = LLM(model_dir, dtype="float32", **OPTS)
    assert llm.weights.lm_head is None and not llm.engine.runner.full_width_tables
    widths, inputs = set(), llm.engine.runner._inputs

    def recorded(*args, **kwargs):  # the page-table width of every call
        out = inputs(*args, **kwargs)
        widths.add(out[3])
        return out
    llm.engine.runner._inputs = recorded
    tokens, static, plp = _run(llm)
    assert len(widths) >= 2 and max(widths) < llm.engine.runner.max_pages_per_seq  # cut, and varying
    assert tokens == ref_tokens and static == ref_static == ref_tokens
    np.testing.assert_allclose(plp, ref_plp, atol=1e-4)


def test_bfloat16_off_cpu_caches_and_defaults(model_dir, cpu_run, off_cpu):
    _, _, ref_plp = cpu_run
    off_cpu()
    llm = LLM(model_dir, **OPTS)  # dtype "auto": bfloat16 off CPU
    assert llm.weights.dtype == jnp.bfloat16
    assert llm.engine.runner.kv.k[0].dtype == jnp.bfloat16  # not uint16 bits
    assert not any(isinstance(layer.wqkv, TransposedWeight) for layer in llm.weights.layers)
    tokens, static, plp = _run(llm)
    assert all(len(t) == GREEDY.max_tokens for t in tokens + static)
    # teacher-forced prompt logprobs: bf16 rounding only (no divergence compounds)
    assert np.abs(plp - ref_plp).max() < 0.1 and np.abs(plp - ref_plp).mean() < 0.02


def test_speculation_and_beams_off_cpu_equal_the_cpu_paths(model_dir, off_cpu):
    """n-gram speculation (engine and static loop, verification of k + 1 tokens) stays token-identical
    to plain decoding, and beam search returns the CPU paths' beams, under the off-CPU choices."""
    from jaxinfer import BeamSearchParams

    prompts = _prompts(4, seed=7)[:3]
    beams = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}

    def run():
        plain = [o.outputs[0].token_ids for o in LLM(model_dir, dtype="float32", **OPTS).generate(prompts, GREEDY)]
        llm = LLM(model_dir, dtype="float32", speculative_config=spec, **OPTS)
        engine = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        static = [o.outputs[0].token_ids for o in llm.generate_static(prompts, GREEDY, batch_size=4)]
        assert engine == static == plain and llm.get_stats().spec_steps > 0
        found = LLM(model_dir, dtype="float32").beam_search(prompts, beams)
        return plain, [[s.tokens for s in o.sequences] for o in found]

    cpu = run()
    off_cpu()
    assert run() == cpu
