"""Structured outputs: the token machine allows exactly the tokens that keep a match possible
(checked against the `regex` module's partial matching), and every decoding path emits outputs
that match, with the same tokens."""

import json
import re

import jsonschema
import numpy as np
import pytest
import regex

from jaxinfer import LLM, SamplingParams, StructuredOutputsParams
from jaxinfer.structured import compile_token_fsm, json_schema_regex, token_texts

SCHEMA = {"type": "object", "$defs": {"Tag": {"enum": ["a", "b", 3], "title": "Tag"}},
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "maxItems": 3},
                         "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
          "required": ["name", "age", "tags"]}
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
        jsonschema.validate(json.loads(text), SCHEMA)
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
    good = ['{"name": "ab", "age": 150, "ok": true, "tags": ["a", 3], "score": 1.5e3}',
            '{"name":"","age":0,"ok":false,"tags":[],"score":null}',
            '{"name": "x", "age": 7, "tags": ["b"]}', '{"name": "x", "age": 7, "tags": [], "score": -2}']
    bad = ['{"age": 1, "name": "ab", "ok": true, "tags": [], "score": null}',  # order
           '{"name": "ab", "age": 1.5, "ok": true, "tags": [], "score": null}',  # not an integer
           '{"name": "ab", "age": 151, "tags": []}', '{"name": "ab", "age": -1, "tags": []}',  # maximum, minimum
           '{"name": "ab", "age": 1, "ok": true, "tags": ["a", "a", "a", "a"], "score": null}',  # maxItems
           '{"name": "ab", "age": 1, "tags": ["c"]}',  # the $ref'd enum
           '{"name": "ab", "ok": true, "tags": []}', '{"name": "ab", "age": 1, "tags": [],}',  # required, comma
           '{"name": "abcdefghijklm", "age": 1, "ok": true, "tags": [], "score": null}']  # maxLength
    assert all(re.fullmatch(rx, g) for g in good)
    assert not any(re.fullmatch(rx, b) for b in bad)


def _random_matches(rx: str, rng, num: int, max_len: int = 300) -> list[str]:
    """Random strings of the regex's language: walks over its character DFA, taking live arcs at
    random (and the shortest way out once past max_len)."""
    import interegular
    fsm = interegular.parse_pattern(rx).to_fsm()
    chars = fsm.alphabet.by_transition
    other = next(c for c in "\u00e9\u4e2dZ~" if c not in fsm.alphabet)  # a char of `anything_else`
    dist = {s: 0 for s in fsm.finals}  # arcs to an accepting state
    changed = True
    while changed:
        changed = False
        for s, arcs in fsm.map.items():
            d = min((dist[n] + 1 for n in arcs.values() if n in dist), default=None)
            if d is not None and d < dist.get(s, 1 << 30):
                dist[s], changed = d, True
    out = []
    for _ in range(num):
        state, text = fsm.initial, []
        while True:
            arcs = [(t, n) for t, n in fsm.map.get(state, {}).items() if n in dist]
            if state in fsm.finals and (not arcs or rng.random() < 0.1):
                break
            if len(text) > max_len:
                arcs = [min(arcs, key=lambda a: dist[a[1]])]
            t, state = arcs[rng.integers(len(arcs))]
            c = chars[t][rng.integers(len(chars[t]))]
            text.append(other if c is interegular.fsm.anything_else else c)
        out.append("".join(text))
    return out


def test_json_schema_regex_matches_exactly_the_documents_a_pydantic_model_accepts():
    """A pydantic model's schema ($defs / $ref, optional fields, integer bounds, formats, tuples,
    maps, Literal, Optional): random strings of the regex all parse and validate under both
    jsonschema and pydantic, and the model's own documents (defaults left out or not, values at
    the bounds) match; ones that break a bound or a format do not."""
    import datetime
    import enum
    import ipaddress
    import uuid
    from typing import Literal

    import pydantic

    class Color(enum.Enum):
        RED = "red"
        GREEN = "green"

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=-5, le=20)
        y: int = pydantic.Field(gt=0)

    class Item(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        color: Color
        at: Point
        when: datetime.date
        id: uuid.UUID
        tags: list[str] = pydantic.Field(default_factory=list, max_length=3)
        score: float | None = None
        pair: tuple[int, bool]
        counts: dict[str, int]
        kind: Literal["a", "b"] = "a"
        seen: datetime.datetime | None = None
        host: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.0.1")

    schema = Item.model_json_schema()
    rx = json_schema_regex(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    samples = _random_matches(rx, np.random.default_rng(0), 300)
    for text in samples:
        validator.validate(json.loads(text))
        Item.model_validate_json(text)
    assert len({len(json.loads(t)) for t in samples}) >= 3  # optional fields are left out and given
    item = Item(name="x", color=Color.GREEN, at=Point(x=-5, y=1), when=datetime.date(2024, 2, 29),
                id=uuid.UUID(int=7), tags=["a", "b"], score=-0.5, pair=(12, False), counts={"k": -3, "": 0},
                seen=datetime.datetime(2024, 2, 29, 23, 59, 1, 5000, tzinfo=datetime.UTC))
    for doc in (item, item.model_copy(update={"at": Point(x=20, y=10 ** 12), "tags": [], "counts": {}})):
        assert re.fullmatch(rx, doc.model_dump_json())
        assert re.fullmatch(rx, doc.model_dump_json(exclude_defaults=True))
    text = item.model_dump_json()
    for old, new in [('"x":-5', '"x":-6'), ('"x":-5', '"x":21'), ('"y":1', '"y":0'), ("2024-02-29", "2024-13-01"),
                     ('"name":"x",', ""), ('"kind":"a"', '"kind":"c"'), ("[12,false]", "[12]"),
                     ("00000000-0000", "0000000-00000"), ("23:59:01", "24:59:01"),
                     ("10.0.0.1", "10.0.0.256"), ("10.0.0.1", "10.0.01.1")]:
        assert old in text and not re.fullmatch(rx, text.replace(old, new)), new


def _depth(v) -> int:
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


def test_free_form_json_is_any_json_nested_up_to_the_bound(embedded):
    """Free-form JSON (vLLM's json_object, an object without properties, an array without items,
    `{}` for any value) within a schema: random strings of the regex are JSON of that kind nested
    at most FREE_FORM_DEPTH levels, every such document matches and a deeper one does not; the
    engine's json_object outputs are JSON objects."""
    from jaxinfer.json_schema import FREE_FORM_DEPTH

    schema = {"type": "object", "properties": {"meta": {"type": "object"}, "rows": {"type": "array"},
                                               "any": {}}, "required": ["meta", "rows", "any"]}
    rng = np.random.default_rng(0)
    obj_rx = StructuredOutputsParams(json_object=True).to_regex()
    for rx, kind, num in ((obj_rx, dict, 60), (json_schema_regex({"type": "array"}), list, 30),
                          (json_schema_regex({}), object, 30)):
        for text in _random_matches(rx, rng, num):
            doc = json.loads(text)
            assert isinstance(doc, kind) and _depth(doc) <= FREE_FORM_DEPTH, text
    rx = json_schema_regex(schema)
    deep = {"a": 1}
    for _ in range(FREE_FORM_DEPTH - 1):
        deep = {"k\"\\": deep, "l": ["x", -1.5e3, None], "t": True}
    assert _depth(deep) == FREE_FORM_DEPTH
    assert re.fullmatch(obj_rx, json.dumps(deep)) and re.fullmatch(obj_rx, json.dumps(deep, separators=(",", ":")))
    assert not re.fullmatch(obj_rx, json.dumps({"z": deep}))
    full = {"meta": deep, "rows": [True, deep], "any": deep}  # the array rows is one level too deep
    assert _depth(full["rows"]) == FREE_FORM_DEPTH + 1 and not re.fullmatch(rx, json.dumps(full))
    full["rows"] = [True, deep["l"]]
    assert re.fullmatch(rx, json.dumps(full))
    so = StructuredOutputsParams(json_object=True)
    outs = embedded.generate(PROMPTS + ["config = "], [SamplingParams(max_tokens=48, temperature=t, seed=3,
                                                                      structured_outputs=so) for t in (0.8, 0.8, 0)])
    docs = []
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            docs.append(json.loads(c.text))
            assert isinstance(docs[-1], dict), c.text
        else:
            assert regex.fullmatch(obj_rx, c.text, partial=True), c.text
    assert any(docs), [o.outputs[0].text for o in outs]  # the greedy one has keys: '{"abcd{": {"}": " + "} }'


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "choice"),
    ({"choice": ["a", ""]}, "choice"), ({"regex": "(a"}, "cannot be compiled: InvalidSyntax"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}, r"\$ref"),
    ({"json_object": True, "regex": "a"}, "exactly one"), ({"json_object": False}, "exactly one"),
    ({"json_object": "yes"}, "json_object"), ({"json": {"type": "date"}}, "unsupported type"),
    ({"json": {"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
               "$ref": "#/$defs/N"}}, "recursive"),
    ({"json": {"$ref": "#/$defs/Missing"}}, "points at nothing"),
    ({"json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"type": "number", "minimum": 1}}, "bounds on a number"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 4}}, "no integer"),
    ({"json": {"allOf": [{"type": "integer"}, {"type": "string"}]}}, "allOf"),
    ({"json": {"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}}, r"required \['b'\]")])
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


def test_characters_only_byte_pieces_spell_are_pruned_or_refused(embedded):
    """The embedded tokenizer spells a snowman only with byte-piece tokens, which a constraint never
    allows. A branch that needs one is cut at the token level (before, the state after 'a' in
    'a\u2603|b' allowed no token and the sampler's fallback released the constraint); a constraint
    that needs one to start is refused at the boundary (before: the output '\\n\\ndef _get_data'
    for '\u2603+' on the embedded target)."""
    tok = embedded.get_tokenizer()
    assert len(tok.encode("\u2603", add_special_tokens=False)) > 1
    texts = tuple(token_texts(tok, embedded.cfg.vocab_size))
    fsm = compile_token_fsm(StructuredOutputsParams(regex="a\u2603|b"), texts, tuple(embedded.cfg.eos_token_ids))
    assert {texts[t] for t in np.flatnonzero(fsm.table[0] >= 0)} == {"b"}
    for s in range(fsm.num_states):  # every state keeps a way on: a token, or EOS in an accepting state
        assert (fsm.table[s] >= 0).any()
    out = embedded.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(
        regex="a\u2603|b")))[0].outputs[0]
    assert (out.text, out.finish_reason) == ("b", "stop")
    with pytest.raises(ValueError, match="no sequence of this tokenizer's tokens matches it"):
        embedded.generate(PROMPTS, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="\u2603+")))
    assert not embedded.engine.has_unfinished_requests()
