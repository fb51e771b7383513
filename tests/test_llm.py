"""The public API: prompts in every form, sampling options, stop strings, outputs, errors."""

import math

import numpy as np
import pytest

from hf_models import write_tiny, write_tokenizer
from jaxinfer import LLM, SamplingParams
from jaxinfer.beam import BeamSearchParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_model")
    write_tiny("llama", d, vocab_size=300, max_position_embeddings=96)
    write_tokenizer(d, 300)
    return LLM(str(d), dtype="float32", max_num_seqs=4)


def test_prompt_forms_and_output_fields(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("def add(a, b):")
    assert tok.decode(ids) == "def add(a, b):"
    outs = llm.generate(["def add(a, b):", {"prompt_token_ids": ids}, {"prompt": "def add(a, b):"}],
                        SamplingParams(temperature=0, max_tokens=8, logprobs=3, prompt_logprobs=1,
                                       ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == [ids] * 3
    a, b, c = (o.outputs[0] for o in outs)
    assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) == 8
    assert a.finish_reason == "length" and a.text == tok.decode(a.token_ids)
    assert len(a.logprobs) == 8
    for t, pos in zip(a.token_ids, a.logprobs):
        assert t in pos and len(pos) in (3, 4) and pos[t].rank == 1  # greedy: chosen is top-1
    assert math.isclose(a.cumulative_logprob, sum(p[t].logprob for t, p in zip(a.token_ids, a.logprobs)),
                        rel_tol=1e-5)
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids)
    assert all(ids[i] in plp[i] for i in range(1, len(ids)))


def test_stop_string_is_excluded_and_ends_generation(llm):
    base = llm.generate("for i in", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate("for i in", SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                  ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    assert len(out.token_ids) < len(base.outputs[0].token_ids)
    inc = llm.generate("for i in", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True,
                                                  include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate("class Point:", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    toks = base.outputs[0].token_ids
    out = llm.generate("class Point:", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                      stop_token_ids=[toks[3]]))[0].outputs[0]
    first = toks.index(toks[3])
    assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == toks[3]
    # min_tokens blocks the stop token until reached
    out2 = llm.generate("class Point:", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                       stop_token_ids=[toks[0]], min_tokens=3))[0].outputs[0]
    assert toks[0] not in out2.token_ids[:3]


def test_sampling_is_seeded_and_n_samples_differ(llm):
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=123, n=3, ignore_eos=True)
    a = llm.generate("import os", p)[0]
    b = llm.generate("import os", p)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    assert [c.index for c in a.outputs] == [0, 1, 2]
    # the output of a seeded request does not depend on its batch-mates
    mixed = llm.generate(["x = 1", "import os"], [SamplingParams(temperature=0.5, max_tokens=12), p])
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in a.outputs]


def test_many_prompts_spanning_batches_keep_order(llm):
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (9, 2, 5, 7, 3, 11)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    single = [llm.generate(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [s.outputs[0].token_ids for s in single]
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]


def test_stream_matches_generate(llm):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    streamed = "".join(llm.stream("def f(x):", p))
    assert streamed == llm.generate("def f(x):", p)[0].outputs[0].text


def test_max_tokens_none_runs_to_the_context_limit(llm):
    out = llm.generate({"prompt_token_ids": list(range(3, 83))},
                       SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 96 - 80 and out.outputs[0].finish_reason == "length"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    """The output is the same as for the last k tokens given as the prompt; -1 fits a prompt longer
    than the context into it (without truncation it is refused)."""
    ids = list(range(3, 63))
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    tail = llm.generate({"prompt_token_ids": ids[-20:]}, p)[0]
    cut = llm.generate({"prompt_token_ids": ids}, SamplingParams(**{**vars(p), "truncate_prompt_tokens": 20}))[0]
    assert cut.prompt_token_ids == ids[-20:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    assert len(cut.prompt_logprobs) == 20
    long = list(range(3, 203))
    fit = llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))[0]
    assert fit.prompt_token_ids == long[-95:] and len(fit.outputs[0].token_ids) == 1
    with pytest.raises(ValueError, match="max_model_len=96"):
        llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=1))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="SamplingParams.truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)


@pytest.mark.parametrize("prompt,match", [
    ({"prompt_token_ids": list(range(3, 99))}, "max_model_len=96"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [5, 300]}, r"contains 300; token ids must be in \[0, 300\)"),
    ({"text": "x"}, "expected a string"),
    ({"prompt_token_ids": [5, 6.5]}, "must be a list of integer token ids"),  # not rounded to 6
    ({"prompt_token_ids": "56"}, "must be a list of integer token ids"),
    ({"prompt_token_ids": 5}, "must be a list of integer token ids"),
    ({"prompt_token_ids": [True, 5]}, "must be a list of integer token ids"),
])
def test_bad_prompts_raise_before_any_work(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", prompt], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("prompts", [5, None, 2.5])
def test_prompts_that_are_neither_a_prompt_nor_a_list_raise(llm, prompts):
    with pytest.raises(ValueError, match=f"prompts={prompts!r}: expected a prompt"):
        llm.generate(prompts, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="expected a prompt"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=2))


def test_seeds_beyond_32_bits_sample_their_own_stream(llm):
    """Seeds 0 and 2**32 drew the same tokens (jax keeps a seed's low 32 bits), and a seed past
    int64 raised OverflowError from inside jax."""
    def tokens(seed):
        p = SamplingParams(temperature=1.0, max_tokens=16, seed=seed, ignore_eos=True)
        return llm.generate("import os", p)[0].outputs[0].token_ids
    assert tokens(0) != tokens(2**32)
    assert tokens(2**70) == tokens(2**70)
    beams = [llm.beam_search("import os", BeamSearchParams(beam_width=2, max_tokens=4, temperature=1.0, seed=s))
             for s in (2**70, 2**70)]
    assert [b.tokens for b in beams[0][0].sequences] == [b.tokens for b in beams[1][0].sequences]


def test_params_list_length_and_vocab_checked(llm):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams or a list of one per prompt, got dict"):
        llm.generate("a", {"max_tokens": 2})
    with pytest.raises(ValueError, match=r"sampling_params\[1\] must be a SamplingParams, got int"):
        llm.generate(["a", "b"], [SamplingParams(), 3])
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest or a list of one per prompt, got int"):
        llm.generate("a", SamplingParams(max_tokens=2), lora_request=5)
    with pytest.raises(ValueError, match="stop_token_ids contains 999"):
        llm.generate("a", SamplingParams(stop_token_ids=[999]))
    for field in ("logprobs", "prompt_logprobs"):  # more top logprobs than the vocabulary holds
        with pytest.raises(ValueError, match=f"{field}=301: at most vocab_size=300"):
            llm.generate("a", SamplingParams(max_tokens=2, **{field: 301}))
    assert not llm.engine.has_unfinished_requests()


def test_a_call_that_fails_mid_run_leaves_the_llm_serving(llm, monkeypatch):
    """An error (or Ctrl-C) inside generate's step loop aborts that call's requests: the next
    call runs alone and every page is back in the pool."""
    runner = llm.engine.runner
    real, calls = runner.execute, []

    def fail_third(chunks):
        calls.append(len(chunks))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunks)
    monkeypatch.setattr(runner, "execute", fail_third)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["def f(x):", "import os"], p)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.groups
    assert llm.engine.allocator.num_used == 0
    out = llm.generate("def f(x):", p)[0].outputs[0]
    monkeypatch.setattr(runner, "execute", real)
    assert out.token_ids == llm.generate("def f(x):", p)[0].outputs[0].token_ids and len(out.token_ids) == 6


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(ValueError, match="attention_backend='cuda'"):
        LLM(str(tmp_path), attention_backend="cuda")
    for bad in ("float8", "half", None):  # refused before anything reads it
        with pytest.raises(ValueError, match=f"dtype={bad!r} is not supported; choose one of auto, float32, bfloat16"):
            LLM(str(tmp_path), dtype=bad)
    with pytest.raises(ValueError, match="no such directory"):
        LLM(str(tmp_path / "missing"))


def test_bad_static_batch_size_and_beam_width(llm):
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
            llm.generate_static(["a"], SamplingParams(max_tokens=2), batch_size=bad)
    with pytest.raises(ValueError, match="beam_width=301 exceeds the model's vocab_size=300"):
        llm.beam_search(["a"], BeamSearchParams(beam_width=301, max_tokens=2))


@pytest.mark.parametrize("value", [0, 1, -5, 10**6, 2.5])
def test_bad_max_model_len(llm, value):
    with pytest.raises(ValueError, match=rf"max_model_len={value!r} must be in \[2, "):  # 0 is not "unset"
        LLM(str(llm.model_dir), max_model_len=value)


@pytest.mark.parametrize("conf", [
    {"method": "layer_skip", "num_speculative_tokens": 2, "num_layers": 1},  # engine
    {"method": "ngram", "num_speculative_tokens": 3},  # engine
    {"method": "ngram_draft_model", "model": "SELF", "num_speculative_tokens": 3},  # engine
])
def test_speculative_config_is_lossless_through_llm(llm, conf):
    if conf.get("model") == "SELF":  # the target drafts for itself (same vocabulary)
        conf = {**conf, "model": str(llm.model_dir)}
    spec = LLM(str(llm.model_dir), dtype="float32", speculative_config=conf)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["def add(a, b):", "for i in range(10):\n"]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, p)] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, p)]


@pytest.mark.parametrize("conf,match", [
    ({"method": "medusa2", "num_speculative_tokens": 2}, "method='medusa2'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookup": 3}, r"keys \['lookup'\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size=0"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "prompt_lookup_max": 4},
     r"keys \['prompt_lookup_max'\] are not known for method 'layer_skip'"),
])
def test_bad_speculative_config(llm, conf, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(llm.model_dir), speculative_config=conf)
