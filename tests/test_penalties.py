"""Presence / frequency / repetition penalties, logit_bias and allowed_token_ids: transformers'
repetition penalty token for token, vLLM's definitions checked against the model's own logits,
and the same tokens on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import load_hf_model, write_tiny
from jaxinfer import LLM, SamplingParams
from jaxinfer.model import forward

PROMPT_LENS = (5, 17, 30)
# Every (rows, tokens) of an engine call is a program to compile, most of this module's time: its
# engines run on the "slots" grid (one decode shape; the same tokens, test_engine.py).
SLOTS = {"shape_buckets": "slots"}


def _prompts(seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny("llama", tmp_path_factory.mktemp("pen"))
    return path, load_hf_model(path)


def test_repetition_penalty_matches_transformers(tiny):
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", **SLOTS)
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, repetition_penalty=1.5)
    engine = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    static = llm.generate_static([{"prompt_token_ids": p} for p in prompts], params)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=24,
                                                                                     min_tokens=24))
    changed = 0
    for p, e, s, q in zip(prompts, engine, static, plain):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              repetition_penalty=1.5)[0, len(p):].tolist()
        assert e.outputs[0].token_ids == ref
        assert s.outputs[0].token_ids == ref
        changed += q.outputs[0].token_ids != ref
    assert changed > 0  # the penalty changed what greedy decoding picks


def _penalized(logits, prompt, out, presence, frequency, repetition, bias=None):
    """vLLM's definition, in numpy, for one position: out = the tokens generated before it."""
    x = logits.astype(np.float64).copy()
    counts = np.bincount(out, minlength=x.size)
    seen = (counts > 0) | np.isin(np.arange(x.size), prompt)
    x[seen] = np.where(x[seen] > 0, x[seen] / repetition, x[seen] * repetition)
    x = x - frequency * counts - presence * (counts > 0)
    for t, b in (bias or {}).items():
        x[t] += b
    return x


BIAS = {7: 3.0, 11: -50.0, 40: 1.5}


@pytest.mark.parametrize("presence,frequency,repetition,bias", [(1.5, 0.0, 1.0, None), (0.0, 0.7, 1.0, None),
                                                                (0.5, 0.3, 1.3, None), (-1.0, -0.5, 0.8, None),
                                                                (0.0, 0.0, 1.0, BIAS), (0.5, 0.3, 1.3, BIAS)])
def test_greedy_picks_the_argmax_of_the_penalized_logits(tiny, presence, frequency, repetition, bias):
    """Every generated token is the argmax of the model's logits at its position (recomputed
    without a cache), penalized and biased by the definition above; the logprobs reported are
    the model's."""
    path, _ = tiny
    # fused steps carry the counts on device
    llm = LLM(str(path), dtype="float32", num_scheduler_steps=4, **SLOTS)
    prompts = _prompts(1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0, presence_penalty=presence,
                            frequency_penalty=frequency, repetition_penalty=repetition, logit_bias=bias)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs):
        gen = o.outputs[0].token_ids
        full = jnp.asarray([p + gen])
        logits, _, _ = forward(llm.weights, llm.cfg, full, jnp.arange(full.shape[1])[None], None, None)
        logits = np.asarray(logits[0])
        lp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for i, t in enumerate(gen):
            pos = len(p) - 1 + i
            shaped = _penalized(logits[pos], p, gen[:i], presence, frequency, repetition, bias)
            assert t == int(np.argmax(shaped)), f"token {i}"
            np.testing.assert_allclose(o.outputs[0].logprobs[i][t].logprob, lp[pos, t], atol=1e-4)


def test_sampled_rows_with_and_without_penalties_agree_on_every_path(tiny):
    """Seeded sampling: engine (single steps; fused steps under preemption) == static batching,
    with penalized and plain rows mixed in one batch."""
    path, _ = tiny
    prompts = [{"prompt_token_ids": p} for p in _prompts(2) + _prompts(3)]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=16, ignore_eos=True,
                             presence_penalty=0.8 * (i % 2), frequency_penalty=0.4 * (i % 3 == 0),
                             repetition_penalty=1.0 + 0.3 * (i % 2)) for i in range(6)]
    ref = [o.outputs[0].token_ids for o in LLM(str(path), block_size=8).generate_static(prompts, params)]
    for opts in (dict(), dict(num_scheduler_steps=4, num_kv_pages=12, max_num_batched_tokens=24)):
        llm = LLM(str(path), block_size=8, **opts, **SLOTS)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref, opts
        if "num_kv_pages" in opts:  # fused steps and preemption in one engine
            assert llm.get_stats().num_preemptions > 0 and llm.get_stats().num_fused_steps > 0


def test_allowed_token_ids_and_a_large_bias_decide_every_token(tiny):
    path, _ = tiny
    llm = LLM(str(path), dtype="float32", **SLOTS)
    reqs = [{"prompt_token_ids": p} for p in _prompts(4)]
    allowed = [9, 33, 71, 100]
    for temperature in (0.0, 1.0):
        outs = llm.generate(reqs, SamplingParams(temperature=temperature, seed=0, max_tokens=24, ignore_eos=True,
                                                 allowed_token_ids=allowed))
        toks = [t for o in outs for t in o.outputs[0].token_ids]
        assert set(toks) <= set(allowed) and len(set(toks)) > 1
        static = llm.generate_static(reqs, SamplingParams(temperature=temperature, seed=0, max_tokens=24,
                                                          ignore_eos=True, allowed_token_ids=allowed))
        assert [o.outputs[0].token_ids for o in static] == [o.outputs[0].token_ids for o in outs]
        outs = llm.generate(reqs, SamplingParams(temperature=temperature, seed=0, max_tokens=8, ignore_eos=True,
                                                 logit_bias={55: 100.0}))
        assert all(o.outputs[0].token_ids == [55] * 8 for o in outs)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
                                         ("logit_bias", {5: 200.0}), ("logit_bias", {-1: 1.0}),
                                         ("allowed_token_ids", []), ("allowed_token_ids", [3, "a"])])
def test_invalid_penalties_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    path, _ = tiny
    llm = LLM(str(path), dtype="float32", **SLOTS)
    for kw in (dict(logit_bias={500: 1.0}), dict(allowed_token_ids=[3, 128])):
        with pytest.raises(ValueError, match="vocab_size=128"):
            llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2, **kw))


def test_speculative_decoding_with_penalties_gives_plain_decoding_tokens(tiny):
    """Through LLM, on the engine's speculative steps with a draft model on device, with penalties,
    biases and allowed tokens mixed in one batch. (The static speculative loop is checked for
    every drafter in test_spec_decode; the engine's n-gram steps under penalties in
    test_bad_words_are_never_generated_on_any_path.)"""
    path, _ = tiny
    prompts = [{"prompt_token_ids": p} for p in _prompts(5)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=1.0,
                             frequency_penalty=0.5, logit_bias=BIAS),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, allowed_token_ids=[7, 9, 40, 41, 77])]
    ref = [o.outputs[0].token_ids for o in LLM(str(path), block_size=8, **SLOTS).generate(prompts, params)]
    llm = LLM(str(path), block_size=8, **SLOTS,
              speculative_config={"method": "draft_model", "model": str(path), "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
    stats = llm.get_stats()  # the model drafting for itself penalizes each draft as the verifier will: all accepted
    assert stats.spec_accepted_tokens == stats.spec_drafted_tokens > 0


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_mask_follows_the_output_and_the_drafts():
    """Penalties.banned against a direct reading of the rule: at each verified position, a word's
    last token is banned iff the output, then the drafts before that position, end with the
    word's other tokens; and recording tokens moves the window as generation does."""
    from jaxinfer.sampling import PenaltyInputs
    rng = np.random.default_rng(0)
    vocab, rows, n = 12, 4, 5
    words = [[rng.integers(0, 4, size=int(rng.integers(1, 4))).tolist() for _ in range(int(rng.integers(0, 4)))]
             for _ in range(rows)]
    words[0] = [[2, 3], [1, 1, 3], [5]]  # a multi-token word, a repeated token, a single token
    outputs = [rng.integers(0, 4, size=int(rng.integers(0, 6))).tolist() for _ in range(rows)]
    drafted = rng.integers(0, 4, size=(rows, n - 1))
    drafted[1, 2] = -1  # no proposal
    params = [SamplingParams(bad_words=["x"])] * rows
    pen = PenaltyInputs.from_rows(params, [[0]] * rows, outputs, vocab, rows, words).build(vocab)
    got = np.asarray(pen.banned(jnp.asarray(drafted), vocab))  # [B, n, V]
    # the drafts before position i recorded as output: one program per i (op by op, ~100 small ones)
    stepped = jax.jit(lambda pen, d: pen.record(d, d >= 0).banned(None, vocab))
    for i in range(n):
        after = np.asarray(stepped(pen, jnp.asarray(drafted[:, :i]))) if i else np.asarray(pen.banned(None, vocab))
        for b in range(rows):
            ctx = outputs[b] + drafted[b, :i].tolist()
            want = {w[-1] for w in words[b] if len(ctx) >= len(w) - 1 and ctx[len(ctx) - len(w) + 1:] == w[:-1]}
            assert set(np.flatnonzero(got[b, i])) == want, (b, i, ctx, words[b])
            np.testing.assert_array_equal(after[b], got[b, i])
    assert got[0].any(axis=-1).all()  # the single-token word is banned everywhere
    logits = np.asarray(pen.apply(jnp.zeros((rows, n, vocab)), jnp.asarray(drafted)))
    np.testing.assert_array_equal(np.isneginf(logits), got)


@pytest.fixture(scope="module")
def embedded():
    return LLM(max_model_len=256, block_size=8, max_num_seqs=4, **SLOTS)


@pytest.fixture(scope="module")
def embedded_ngram():
    return LLM(max_model_len=256, block_size=8, max_num_seqs=4, **SLOTS,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})


def test_bad_words_are_never_generated_on_any_path(embedded, embedded_ngram):
    """A single-token word ("path", two encodings) and a two-token one ("is a") that greedy
    decoding writes are absent once banned, with the same tokens from the engine, the static loop
    and the engine's n-gram speculation. (The static speculative loop is checked for every drafter
    in test_spec_decode.)"""
    prompt = "import os\n\ndef read_config(path):\n"
    base = embedded.generate([prompt], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].token_ids
    params = SamplingParams(temperature=0, max_tokens=48, bad_words=["path", "is a"])
    seqs = embedded.engine.inputs.bad_words_ids(params)
    assert [652] in seqs and [485] in seqs and [322, 272] in seqs  # " path", "path", " is a"
    assert _contains(base, [652]) and _contains(base, [322, 272])
    out = embedded.generate([prompt], params)[0].outputs[0].token_ids
    assert not any(_contains(out, s) for s in seqs) and len(out) == 48
    assert embedded.generate_static([prompt], params)[0].outputs[0].token_ids == out
    assert embedded_ngram.generate([prompt], params)[0].outputs[0].token_ids == out
    assert embedded_ngram.get_stats().spec_accepted_tokens > 0


def test_structured_outputs_stay_lossless_under_ngram_speculation(embedded, embedded_ngram):
    """The engine's n-gram verification masks each drafted position with the constraint's state
    after the drafts before it (test_structured checks those masks): greedy outputs equal plain
    decoding's and match."""
    prompts = ["import os\n\ndef read_config(path):\n    return ", "# the answer is "]
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=so) for so in (
        {"regex": r"(def|class) [a-z_]{1,10}\((x|y)?\):"}, {"choice": ["yes", "no", "not sure"]})]
    before = embedded_ngram.get_stats().spec_steps
    want = embedded.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in embedded_ngram.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].finish_reason for o in want] == ["stop", "stop"]
    assert want[1].outputs[0].text in ("yes", "no", "not sure")
    assert embedded_ngram.get_stats().spec_steps > before


@pytest.mark.parametrize("value", ["path", [""], ["  "], [3]])
def test_invalid_bad_words_raise_naming_the_field(value):
    with pytest.raises(ValueError, match="SamplingParams.bad_words"):
        SamplingParams(bad_words=value)


def test_bad_words_need_a_tokenizer(tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
        LLM(str(path)).generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2, bad_words=["a"]))
