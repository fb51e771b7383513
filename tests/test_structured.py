"""Structured outputs: the token machine allows exactly the tokens that keep a match possible
(checked against the `regex` module's partial matching), and every decoding path emits outputs
that match, with the same tokens."""

import json
import re

import numpy as np
import pytest
import regex

from jaxinfer import LLM, SamplingParams, StructuredOutputsParams
from jaxinfer.structured import compile_token_fsm, json_schema_regex, token_texts

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 3},
    "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}
CONSTRAINTS = [StructuredOutputsParams(choice=["yes", "no", "not sure", "no way"]),
               StructuredOutputsParams(regex=r"(def|class) [a-z_]{1,10}\((x|y)?\):"),
               StructuredOutputsParams(json=SCHEMA)]
PROMPTS = ["import os\n\ndef read_config(path):\n    return ", "# the answer is "]


@pytest.fixture(scope="module")
def embedded():
    return LLM("stdlib-draft", max_model_len=256, block_size=8)


def _check(so, text, finish_reason):
    """A finished output matches as a whole; one cut by max_tokens is the start of a match."""
    if finish_reason == "length":
        assert regex.fullmatch(so.to_regex(), text, partial=True), text
        return
    assert finish_reason == "stop" and re.fullmatch(so.to_regex(), text), (text, finish_reason)
    if so.json is not None:
        value = json.loads(text)
        assert list(value) == list(SCHEMA["properties"])
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and isinstance(value["ok"], bool)
        assert set(value["tags"]) <= {"a", "b", 3} and len(value["tags"]) <= 3
        assert value["score"] is None or isinstance(value["score"], (int, float))
    if so.choice is not None:
        assert text in so.choice


@pytest.mark.parametrize("which", [0, 1])
def test_token_table_allows_exactly_the_tokens_that_keep_a_match_possible(embedded, which):
    """From every state (reached by the first token path found), token t is allowed iff the text so
    far plus t's text is a prefix of a match; EOS iff the text so far is a whole match."""
    so = CONSTRAINTS[which]
    tok = embedded.get_tokenizer()
    texts = tuple(token_texts(tok, embedded.cfg.vocab_size))
    fsm = compile_token_fsm(so, texts, (2,))
    pattern = regex.compile(so.to_regex())
    prefix = {0: ""}
    for s in range(fsm.num_states):  # breadth-first order: every state's text is known when reached
        for t in np.flatnonzero(fsm.table[s] >= 0):
            if t != 2:
                prefix.setdefault(int(fsm.table[s, t]), prefix[s] + texts[t])
    assert len(prefix) == fsm.num_states
    for s, text in prefix.items():
        for t, piece in enumerate(texts):
            if t == 2:
                assert (fsm.table[s, t] >= 0) == (pattern.fullmatch(text) is not None) == bool(fsm.final[s])
            elif piece is None:
                assert fsm.table[s, t] < 0
            else:
                assert (fsm.table[s, t] >= 0) == (pattern.fullmatch(text + piece, partial=True) is not None), \
                    (text, piece)


def test_outputs_match_on_every_path_with_the_same_tokens(embedded):
    """Engine and static loop, greedy and seeded sampling, the three kinds of constraint mixed in one batch: every output matches (sampled ones
    may run out of tokens inside an unbounded number: then they are the start of a match), and the
    paths agree token for token."""
    prompts = [p for p in PROMPTS for _ in CONSTRAINTS]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=3, max_tokens=64, structured_outputs=so)
                  for _ in PROMPTS for so in CONSTRAINTS]
        outs = embedded.generate(prompts, params)
        for o, p in zip(outs, params, strict=True):
            for c in o.outputs:
                _check(p.structured_outputs, c.text, c.finish_reason)
                assert c.finish_reason == "stop" or temperature > 0  # greedy: all complete
        ids = [[c.token_ids for c in o.outputs] for o in outs]
        assert [[c.token_ids for c in o.outputs] for o in embedded.generate_static(prompts, params)] == ids
        if temperature == 0:
            greedy = ids
        else:  # sampling explores the constraint
            assert sum(a != b for a, b in zip(ids, greedy)) >= 3
    free = embedded.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert not re.fullmatch(CONSTRAINTS[1].to_regex(), free)  # the constraint did the work


def test_verification_masks_follow_the_machine_along_the_drafts(embedded):
    """Speculative verification's position i sees the state after drafts d_1..d_{i-1} (what
    recording them one by one gives), a row without a constraint sees everything, and a draft of
    -1 (no proposal) or one the machine forbids leaves a usable state. (Verification applies these
    masks as it applies every penalty: see test_spec_decode and test_penalties.)"""
    import jax.numpy as jnp

    from jaxinfer.sampling import PenaltyInputs
    tok = embedded.get_tokenizer()
    vocab = embedded.cfg.vocab_size
    fsms = [embedded.engine.inputs.token_fsm(SamplingParams(structured_outputs=so)) for so in CONSTRAINTS] + [None]
    starts = [tok.encode(t, add_special_tokens=False) for t in ("no", "def f", '{"name": "a', "free text")]
    drafts = np.array([(tok.encode(t, add_special_tokens=False) + [2, 2, 2])[:3]  # EOS pads: allowed or not
                       for t in (" way", "(x):", '", "age')] + [[5, 6, 7]], np.int32)
    drafts[3, 1] = -1
    params = [SamplingParams(structured_outputs=so) for so in CONSTRAINTS] + [SamplingParams(logit_bias={3: 1.0})]
    pen = PenaltyInputs.from_rows(params, [[1]] * 4, starts, vocab, 4, fsms=fsms).build(vocab)
    masked = np.isneginf(np.asarray(pen.apply(jnp.zeros((4, 4, vocab)), jnp.asarray(drafts))))  # [B, 4, V]
    for i in range(4):
        stepped = pen
        for j in range(i):
            stepped = stepped.record(jnp.asarray(drafts[:, j]), jnp.asarray(drafts[:, j] >= 0))
        np.testing.assert_array_equal(np.isneginf(np.asarray(stepped.apply(jnp.zeros((4, vocab))))), masked[:, i])
    for b in range(3):
        state = fsms[b].walk(starts[b])
        for i in range(4):
            np.testing.assert_array_equal(~masked[b, i], fsms[b].table[state] >= 0)
            if i < 3:
                state = max(int(fsms[b].table[state, drafts[b, i]]), 0)
    assert not masked[3].any()
    assert masked[0, 1].sum() > masked[0, 0].sum()  # "no" + " way": only EOS is left


def test_json_schema_regex_accepts_what_the_schema_accepts():
    rx = json_schema_regex(SCHEMA)
    good = ['{"name": "ab", "age": -3, "ok": true, "tags": ["a", 3], "score": 1.5e3}',
            '{"name":"","age":0,"ok":false,"tags":[],"score":null}']
    bad = ['{"age": 1, "name": "ab", "ok": true, "tags": [], "score": null}',  # order
           '{"name": "ab", "age": 1.5, "ok": true, "tags": [], "score": null}',  # not an integer
           '{"name": "ab", "age": 1, "ok": true, "tags": ["a", "a", "a", "a"], "score": null}',  # maxItems
           '{"name": "abcdefghijklm", "age": 1, "ok": true, "tags": [], "score": null}']  # maxLength
    assert all(re.fullmatch(rx, g) for g in good)
    assert not any(re.fullmatch(rx, b) for b in bad)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "choice"),
    ({"choice": ["a", ""]}, "choice"), ({"regex": "(a"}, "cannot be compiled"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}, r"\$ref"),
    ({"json": {"type": "object"}}, "needs 'properties'"), ({"json": {"type": "date"}}, "unsupported type")])
def test_invalid_constraints_raise_naming_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_structured_outputs_need_a_tokenizer_and_the_right_type(tmp_path):
    from hf_models import write_tiny
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs"):
        SamplingParams(structured_outputs="yes|no")
    path = write_tiny("llama", tmp_path)
    with pytest.raises(ValueError, match="structured_outputs needs a tokenizer"):
        LLM(str(path)).generate([{"prompt_token_ids": [5, 6]}],
                                SamplingParams(max_tokens=2, structured_outputs={"choice": ["a"]}))


def test_min_tokens_that_a_constraint_cannot_honour_is_refused_and_a_dead_end_releases(embedded):
    """min_tokens past the point where a match is complete and only a stop token may follow is
    refused at the boundary (the engine keeps serving); a constraint that can keep going honours
    it. Other masks that leave no allowed token (here bad words) release the constraint on host and
    device alike instead of failing the call."""
    yes_no = StructuredOutputsParams(choice=["yes", "no"])
    fsm = embedded.engine.inputs.token_fsm(SamplingParams(structured_outputs=yes_no))
    n_end = fsm.tokens_until_forced_stop(embedded.cfg.eos_token_ids)
    assert n_end == min(len(embedded.get_tokenizer().encode(w, add_special_tokens=False)) for w in ("yes", "no"))
    assert fsm.tokens_until_forced_stop([]) is None  # nothing is a stop token: EOS keeps the match going
    with pytest.raises(ValueError, match=f"min_tokens={n_end + 1} conflicts with structured_outputs"):
        embedded.generate(PROMPTS, SamplingParams(max_tokens=8, min_tokens=n_end + 1, structured_outputs=yes_no))
    assert not embedded.engine.has_unfinished_requests()
    digits = StructuredOutputsParams(regex=r"[0-9]+")
    out = embedded.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, min_tokens=6,
                                                       structured_outputs=digits))[0].outputs[0]
    assert len(out.token_ids) >= 6 and re.fullmatch(r"[0-9]+", out.text)
    x = embedded.get_tokenizer().encode("x", add_special_tokens=False)
    assert len(x) == 1  # the constraint's only first token, which the bad word bans
    stuck = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, bad_words=["x"],
                           structured_outputs=StructuredOutputsParams(choice=["x"]))
    out = embedded.generate(PROMPTS[1], stuck)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[0] != x[0]
    assert embedded.engine.inputs.token_fsm(stuck).walk(out.token_ids) == -1
