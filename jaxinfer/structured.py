"""Structured outputs (vLLM's `StructuredOutputsParams`): output constrained to a regex, a list of
choices, or a JSON schema, by a token-level finite-state machine.

Legend: S machine states, V vocab.

The constraint becomes a regular expression (a choice list: their alternation; a JSON schema:
`json_schema_regex`), the regex a character DFA (`interegular`), and the DFA a token table
`TokenFSM.table [S, V]`: the state reached from state s by token t's text, or -1 when no match
continues through that text. A token is allowed at a step iff its entry is >= 0; the model's EOS
tokens are allowed exactly in accepting states (and keep the state). States from which no
accepting state can be reached are dropped, so a generation never walks into a dead end. The
table is built once per (constraint, tokenizer) and cached; `sampling.Penalties` carries the
tables of a batch's rows on device, masks logits with them and advances each row's state as
tokens are recorded (speculative verification: along the drafts), so every decoding path
(static loop, engine, fused steps, speculation) follows the same machine.

Tokens whose text is not valid UTF-8 by itself (byte pieces of a multi-byte character) and
special tokens are never allowed inside a constraint. States whose every way to a match needs
such a token are dropped from the token table as well, and a constraint that cannot start
without one is refused when the request is added.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from jaxinfer.json_schema import escape, free_object_regex, json_schema_regex

__all__ = ["StructuredOutputsParams", "TokenFSM", "compile_token_fsm", "json_schema_regex", "token_texts"]


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: json (a JSON schema, as a dict or a JSON string), regex (the whole output
    matches it), choice (the output is one of these strings), json_object=True (the output is a
    JSON object, any keys and values, containers nested up to `json_schema.FREE_FORM_DEPTH`
    levels). vLLM's names."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    json_object: bool | None = None

    def __post_init__(self):
        if self.json_object not in (None, True, False):
            raise ValueError(f"StructuredOutputsParams.json_object={self.json_object!r}: expected True, False or None")
        given = [k for k in ("json", "regex", "choice", "json_object") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams: set exactly one of json, regex, choice, json_object "
                             f"(got {given or 'none'})")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"StructuredOutputsParams.choice={self.choice!r}: expected a non-empty list of "
                                 "non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"StructuredOutputsParams.regex={self.regex!r}: expected a non-empty string")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"StructuredOutputsParams.json: not valid JSON ({e})") from None
            if not isinstance(schema, dict):
                raise ValueError(f"StructuredOutputsParams.json={self.json!r}: expected a JSON schema object")
            object.__setattr__(self, "json", json.dumps(schema))  # hashable; properties keep their order
        _char_fsm(self.to_regex())  # a constraint that cannot compile is refused here, at the boundary

    def to_regex(self) -> str:
        return self._regex

    @functools.cached_property
    def _regex(self) -> str:
        """The constraint as a regex, derived once (every request with these params compiles it)."""
        if self.regex is not None:
            return self.regex
        if self.choice is not None:
            return "|".join(escape(c) for c in self.choice)
        if self.json_object:
            return free_object_regex()
        return json_schema_regex(json.loads(self.json))


@functools.lru_cache(maxsize=64)
def _char_fsm(regex: str):
    import interegular
    try:
        return interegular.parse_pattern(regex).to_fsm()
    except Exception as e:  # noqa: BLE001 -- interegular raises assorted errors on bad patterns
        detail = str(e) or type(e).__name__  # some parse errors carry no message ('(ab')
        raise ValueError(f"structured output regex {regex!r} cannot be compiled: {detail}") from None


RELEASED = -1  # a request's state once a forbidden token was drawn: unconstrained from then on


@dataclasses.dataclass(frozen=True, eq=False)
class TokenFSM:
    """table [S, V] int32: next state (-1: the token is not allowed); state 0 is the start."""

    table: np.ndarray
    final: np.ndarray  # [S] bool: accepting states

    @property
    def num_states(self) -> int:
        return self.table.shape[0]

    def step(self, state: int, token: int) -> int:
        """The state after token. A token the machine forbids (drawn only when other masks, such as
        bad words or allowed_token_ids, left no allowed token) releases the constraint: state
        RELEASED, which allows everything from then on -- what the device does (`Penalties`)."""
        return RELEASED if state == RELEASED else max(int(self.table[state, token]), RELEASED)

    def walk(self, tokens, state: int = 0) -> int:
        """The state after tokens."""
        for t in tokens:
            state = self.step(state, t)
        return state

    def tokens_until_forced_stop(self, stop_ids) -> int | None:
        """The fewest tokens after which the machine may allow nothing but stop tokens (a complete
        match that nothing can extend), or None if that never happens. Stop tokens are not drawn on
        the way (min_tokens blocks them), so min_tokens above this number could leave no token."""
        stop = np.zeros(self.table.shape[1], bool)
        stop[[t for t in stop_ids if 0 <= t < len(stop)]] = True
        dist, frontier = {0: 0}, [0]
        while frontier:
            nxt = []
            for s in frontier:
                targets = self.table[s][(self.table[s] >= 0) & ~stop]
                if targets.size == 0:
                    return dist[s]
                for t in np.unique(targets).tolist():
                    if t not in dist:
                        dist[t] = dist[s] + 1
                        nxt.append(t)
            frontier = nxt
        return None


def token_texts(tokenizer, vocab_size: int) -> list[str | None]:
    """Each token's text (None: special, empty, or not valid UTF-8 by itself). Decoded after an
    anchor token, so decoders that drop a leading space of a lone token keep it."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    base = tokenizer.decode(anchor, skip_special_tokens=False)
    special = tokenizer.all_special_ids
    out = []
    for t in range(vocab_size):
        text = None
        if t not in special and tokenizer.id_to_token(t) is not None:
            full = tokenizer.decode(anchor + [t], skip_special_tokens=False)
            text = full[len(base):] if full.startswith(base) else None
            if not text or "\ufffd" in text:
                text = None
        out.append(text)
    return out


def compile_token_fsm(params: StructuredOutputsParams, texts: tuple, eos_ids: tuple[int, ...]) -> TokenFSM:
    """The token table of params over token texts (`token_texts`); eos_ids end the output in
    accepting states."""
    return _compile(params.to_regex(), texts, eos_ids)


@functools.lru_cache(maxsize=32)
def _compile(regex: str, texts: tuple, eos_ids: tuple[int, ...]) -> TokenFSM:
    fsm = _char_fsm(regex)
    alphabet = fsm.alphabet
    # Live states: an accepting state is reachable (reverse search over the character DFA).
    preds: dict = {}
    for s, arcs in fsm.map.items():
        for nxt in arcs.values():
            preds.setdefault(nxt, set()).add(s)
    live, todo = set(fsm.finals), list(fsm.finals)
    while todo:
        for p in preds.get(todo.pop(), ()):
            if p not in live:
                live.add(p)
                todo.append(p)
    if fsm.initial not in live:
        raise ValueError(f"structured output regex {regex!r} matches nothing")
    # A character trie of the token texts: one walk per (state, trie node) instead of per token.
    trie: dict = {}
    for t, text in enumerate(texts):
        if text is None:
            continue
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node.setdefault(None, []).append(t)
    index = {fsm.initial: 0}
    order = [fsm.initial]
    rows = []
    i = 0
    while i < len(order):  # breadth-first over the states tokens reach
        state = order[i]
        row = np.full(len(texts), -1, np.int64)
        stack = [(trie, state)]
        while stack:
            node, s = stack.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                nxt = fsm.map.get(s, {}).get(alphabet[ch])
                if nxt is None or nxt not in live:
                    continue
                for t in child.get(None, ()):
                    if nxt not in index:
                        index[nxt] = len(order)
                        order.append(nxt)
                    row[t] = index[nxt]
                stack.append((child, nxt))
        rows.append(row)
        i += 1
    table = np.stack(rows).astype(np.int32)
    final = np.array([s in fsm.finals for s in order])
    table, final = _prune_token_dead_ends(table, final, regex)
    for e in eos_ids:
        if 0 <= e < table.shape[1]:
            table[:, e] = np.where(final, np.arange(len(final)), -1)
    return TokenFSM(table=table, final=final)


def _prune_token_dead_ends(table: np.ndarray, final: np.ndarray, regex: str) -> tuple[np.ndarray, np.ndarray]:
    """(table, final) without the states from which no sequence of tokens reaches an accepting
    state, and without the transitions into them (states renumbered, the start still 0).

    The character DFA is already pruned, but tokens can still strand a generation: a character
    that only byte-piece tokens spell (never allowed) has no token. Left in, such a state allowed
    no token at all, and the sampler's fallback released the constraint (regex '\\u2603+' on the
    embedded target gave '\\n\\ndef _get_data'). A constraint whose start state is stranded is
    refused: no output of this tokenizer can match it."""
    preds: list[set] = [set() for _ in range(len(table))]
    for s, row in enumerate(table):
        for n in np.unique(row[row >= 0]).tolist():
            preds[n].add(s)
    live = final.copy()
    todo = np.flatnonzero(final).tolist()
    while todo:
        for p in preds[todo.pop()]:
            if not live[p]:
                live[p] = True
                todo.append(p)
    if not live[0]:
        raise ValueError(f"structured output regex {regex!r}: no sequence of this tokenizer's tokens matches it "
                         "(a character it needs is spelled only by byte-piece tokens, which a constraint never allows)")
    keep = np.flatnonzero(live)  # includes 0
    new_id = np.full(len(table) + 1, -1, np.int64)  # index -1 (no transition) maps to -1
    new_id[keep] = np.arange(len(keep))
    return new_id[table[keep]].astype(np.int32), final[keep]
