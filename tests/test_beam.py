"""Beam search: token-for-token parity with transformers' beam search, and its edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import load_hf_model, write_tiny
from jaxinfer import LLM, BeamSearchParams, SamplingParams
from jaxinfer.beam import BeamInputs, BeamStatics, initial_state, select

W, M = 4, 12
PROMPT_LENS = (5, 17, 30)


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tiny_eos(tmp_path_factory):
    """A tiny llama whose eos id is a token its beams actually produce, so beams end both ways."""
    probe = write_tiny("llama", tmp_path_factory.mktemp("probe"))
    outs = LLM(str(probe), dtype="float32").beam_search(
        [{"prompt_token_ids": p} for p in _prompts()], BeamSearchParams(beam_width=W, max_tokens=M, ignore_eos=True))
    counts = np.bincount([t for o in outs for s in o.sequences for t in s.output_token_ids[2:]], minlength=128)
    eos = int(np.argsort(counts)[-3])  # frequent, not the most frequent: some beams still reach M
    path = write_tiny("llama", tmp_path_factory.mktemp("tiny"), eos_token_id=eos)
    return path, load_hf_model(path), eos


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (2.0, "never"), (0.0, True), (-0.5, False)])
def test_beams_match_transformers(tiny_eos, length_penalty, early_stopping):
    path, hf, eos = tiny_eos
    prompts = _prompts()
    outs = LLM(str(path), dtype="float32").beam_search(
        [{"prompt_token_ids": p} for p in prompts],
        BeamSearchParams(beam_width=W, max_tokens=M, length_penalty=length_penalty, early_stopping=early_stopping))
    reasons = set()
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), num_beams=W, num_return_sequences=W, do_sample=False,
                              max_new_tokens=M, length_penalty=length_penalty, early_stopping=early_stopping,
                              eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        assert len(out.sequences) == W
        for j, seq in enumerate(out.sequences):
            ref_tokens = ref.sequences[j].tolist()
            assert seq.tokens == ref_tokens[:len(seq.tokens)], f"beam {j} of prompt {len(p)}"
            assert set(ref_tokens[len(seq.tokens):]) <= {0, eos}  # transformers' fill after a beam ends
            np.testing.assert_allclose(seq.score, float(ref.sequences_scores[j]), atol=1e-4)
            n = len(seq.output_token_ids)
            assert seq.finish_reason == ("stop" if seq.tokens[-1] == eos else "length")
            assert seq.finish_reason == "stop" or n == M
            np.testing.assert_allclose(seq.score, seq.cum_logprob / n ** length_penalty, rtol=1e-5)
            np.testing.assert_allclose(sum(lp[t].logprob for lp, t in zip(seq.logprobs, seq.output_token_ids)),
                                       seq.cum_logprob, atol=1e-4)
            reasons.add(seq.finish_reason)
        assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences), reverse=True)
    # Both ways of ending are exercised, except where a strong length penalty favours the longest beams.
    assert reasons == ({"length"} if length_penalty == 2.0 else {"stop", "length"})


def test_one_beam_without_eos_is_greedy(tiny_eos):
    """48 tokens after a 30-token prompt: the beam cache (64 slots at first) grows mid-search."""
    path, _, _ = tiny_eos
    llm = LLM(str(path), dtype="float32")
    reqs = [{"prompt_token_ids": p} for p in _prompts(1)]
    greedy = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=0))
    beams = llm.beam_search(reqs, BeamSearchParams(beam_width=1, max_tokens=48, ignore_eos=True))
    for g, b in zip(greedy, beams):
        (seq,) = b.sequences
        assert seq.output_token_ids == g.outputs[0].token_ids
        np.testing.assert_allclose(seq.cum_logprob, g.outputs[0].cumulative_logprob, atol=1e-4)


def test_result_does_not_depend_on_batch_mates(tiny_eos):
    path, _, _ = tiny_eos
    prompts = [{"prompt_token_ids": p} for p in _prompts(2)]
    params = BeamSearchParams(beam_width=3, max_tokens=M)
    together = LLM(str(path), dtype="float32").beam_search(prompts, params)
    one_per_call = LLM(str(path), dtype="float32", max_num_seqs=3).beam_search(prompts, params)
    for a, b in zip(together, one_per_call):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_sampled_candidates_are_drawn_without_replacement():
    """temperature 1, one beam, two candidates (no eos), drawn without replacement: the pair {t, u}
    comes with probability p_t p_u / (1 - p_t) + p_u p_t / (1 - p_u), and the kept beam is its more
    likely token. 20,000 rows are 20,000 independent draws."""
    rows, v = 20000, 6
    logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    statics = BeamStatics(max_len=16, max_new=16, beam_width=1, num_candidates=2, early_stopping=False, sampled=True)
    state = initial_state(None, jnp.full((rows,), 3, jnp.int32), 1, 16, jax.random.PRNGKey(0))
    run = BeamInputs(eos_ids=jnp.zeros((0,), jnp.int32), max_new=jnp.int32(16), temperature=jnp.float32(1.0),
                     length_penalty=jnp.float32(1.0))
    out = select(state, jnp.broadcast_to(logits, (rows, v)), statics, run)
    first = np.asarray(out.run_tokens[:, 0, 0])
    p = np.exp(np.asarray(logits))
    expected = np.array([sum(p[a] * p[t] / (1 - p[a]) + p[t] * p[a] / (1 - p[t])
                             for a in range(v) if a != t and p[a] < p[t]) for t in range(v)])
    observed = np.bincount(first, minlength=v) / rows
    np.testing.assert_allclose(observed, expected, atol=0.012)
    assert not bool(jnp.any(out.fin_filled))


def test_sampled_beams_follow_the_seed(tiny_eos):
    path, _, _ = tiny_eos
    llm = LLM(str(path), dtype="float32")
    req = [{"prompt_token_ids": _prompts()[1]}]

    def run(seed):
        out = llm.beam_search(req, BeamSearchParams(beam_width=3, max_tokens=M, temperature=1.0, seed=seed))
        return [s.tokens for s in out[0].sequences]
    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("field,value", [("beam_width", 0), ("max_tokens", 0), ("temperature", -1.0),
                                         ("length_penalty", float("nan")), ("early_stopping", "sometimes"),
                                         ("early_stopping", 1), ("seed", 1.5)])
def test_invalid_params_raise_naming_the_field(field, value):
    kw = dict(beam_width=2, max_tokens=4)
    kw[field] = value
    with pytest.raises(ValueError, match=f"BeamSearchParams.{field}"):
        BeamSearchParams(**kw)


def test_prompt_that_leaves_no_room_is_refused(tiny_eos):
    path, _, _ = tiny_eos
    llm = LLM(str(path), dtype="float32", max_model_len=40)
    with pytest.raises(ValueError, match="max_model_len=40"):
        llm.beam_search([{"prompt_token_ids": [5] * 30}], BeamSearchParams(beam_width=2, max_tokens=11))
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search([{"prompt_token_ids": [5]}], SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.beam_search([{"prompt_token_ids": [5, 999]}], BeamSearchParams(beam_width=2, max_tokens=2))


@pytest.mark.parametrize("loop", ["beam_search", "generate_static"])
def test_decode_loops_hold_no_second_copy_of_the_weights(tmp_path, monkeypatch, loop):
    """bf16 on CPU: the projections are TransposedWeights (model.runtime_layout). Inside a while
    loop XLA:CPU copied every one that is the right operand of a multi-row product into [Din, Dout]
    order, hoisted before the loop: a second copy of the model in the program's temporaries. The
    beam and static decode loops multiply them as the left operand (model.loop_layout), read in
    place, so their temporaries stay well under the weights' bytes."""
    from jaxinfer import beam
    from jaxinfer import generate as gen

    path = write_tiny("llama", tmp_path, hidden_size=256, intermediate_size=2048, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    llm = LLM(str(path), dtype="bfloat16")
    module, name = (beam, "beam_decode") if loop == "beam_search" else (gen, "decode")
    real, calls = getattr(module, name), []

    def spy(*args):
        calls.append(jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, args))
        return real(*args)

    monkeypatch.setattr(module, name, spy)
    reqs = [{"prompt_token_ids": p} for p in _prompts()]
    if loop == "beam_search":
        llm.beam_search(reqs, BeamSearchParams(beam_width=4, max_tokens=8))
    else:
        llm.generate_static(reqs, SamplingParams(temperature=0, max_tokens=8), batch_size=4)
    weights = calls[0][0]
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(weights))
    temp = real.lower(*calls[0]).compile().memory_analysis().temp_size_in_bytes
    assert temp < weight_bytes / 2, (temp, weight_bytes)
