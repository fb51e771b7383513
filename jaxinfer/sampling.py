"""SamplingParams (vLLM's names) and the on-device sampler.

Legend: B rows, V vocab, N top logprobs.

Per-row parameters live in a SamplingTensors pytree so one compiled sampler
serves a batch that mixes greedy and sampled rows. The filters follow vLLM's
order: temperature, min-p, top-k, then top-p on what is left. Randomness is
seeded per request and folded with the index of the token being drawn, so a
request's output depends only on its own seed, never on its batch-mates.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.structured import StructuredOutputsParams

_MASK = -jnp.inf


def is_list_like(value) -> bool:
    """A list, tuple or other collection of items: not a bare value, a string or a mapping."""
    return hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))


def is_int(value) -> bool:
    """A Python integer that is not a bool (True is an int to Python, not a count or a token id)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request. Field names and defaults follow vLLM.

    temperature 0 is greedy. top_k 0 or -1 disables top-k; top_p 1 and min_p 0
    disable theirs. stop: strings that end the output (excluded from the text
    unless include_stop_str_in_output). logprobs / prompt_logprobs: how many top
    alternatives to return per token (the chosen token is always included).
    bad_words: strings the output must not contain, as vLLM bans them: each word's token
    sequence (as encoded alone and after a space) is never completed, i.e. its last token is
    masked wherever the output so far ends with the tokens before it. truncate_prompt_tokens:
    keep only the prompt's last k tokens (-1: as many as the context leaves room for).
    structured_outputs: the output matches a regex, one of a list of choices, or a JSON schema
    (`jaxinfer.structured`: a token-level state machine masks every step's logits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        def bad(field, allowed):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {allowed}")

        def listed(field, allowed):
            v = getattr(self, field)
            if not is_list_like(v):
                bad(field, allowed)
            return list(v)

        for field in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                bad(field, "must be in [-2, 2]")
        if not (isinstance(self.repetition_penalty, (int, float)) and np.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1: off)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    is_int(t) and t >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
                    for t, v in self.logit_bias.items()):
                bad("logit_bias", "must map token ids >= 0 to biases in [-100, 100]")
            self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = listed("allowed_token_ids", "must be a non-empty list of token ids >= 0 (or None)")
            if not self.allowed_token_ids or any(not is_int(t) or t < 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "must be a non-empty list of token ids >= 0 (or None)")
        if self.bad_words is not None:
            words = listed("bad_words", "must be a list of non-blank strings (or None)")
            if not all(isinstance(w, str) and w.strip() for w in words):
                bad("bad_words", "must be a list of non-blank strings (or None)")
            self.bad_words = words or None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs",
                "must be StructuredOutputsParams(json=... | regex=... | choice=... | json_object=True) or None")
        k = self.truncate_prompt_tokens
        if k is not None and (not is_int(k) or not (k == -1 or k >= 1)):
            bad("truncate_prompt_tokens", "must be None, -1 (the context's room) or an integer >= 1")
        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
                and np.isfinite(self.temperature)):
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        for field in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be True or False")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 (or None: until the context is full)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(self, field)
            if v is not None and (not is_int(v) or v < 0):
                bad(field, "must be None or an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [] if self.stop is None else listed("stop", "must be a string or a list of non-empty strings")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        self.stop_token_ids = ([] if self.stop_token_ids is None
                               else listed("stop_token_ids", "must be a list of non-negative token ids"))
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes_logits(self) -> bool:
        """Penalties, a logit bias, allowed tokens, bad words or a structured output constraint change
        the logits before sampling."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.logit_bias is not None or self.allowed_token_ids is not None or self.bad_words is not None
                or self.structured_outputs is not None)

    def validate_vocab(self, vocab_size: int):
        """Token ids must exist in the model's vocabulary; top logprobs cannot outnumber it."""
        for field in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            for t in getattr(self, field) or ():
                if t >= vocab_size:
                    raise ValueError(f"SamplingParams.{field} contains {t}; vocab_size={vocab_size}")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(self, field)
            if v is not None and v > vocab_size:
                raise ValueError(f"SamplingParams.{field}={v}: at most vocab_size={vocab_size} top logprobs")


@struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters on device."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    keys: jax.Array  # [B, 2] uint32 per-request PRNG keys

    @staticmethod
    def from_params(params: list[SamplingParams], seeds: list[int], vocab_size: int,
                    sample_index: list[int] | None = None) -> "SamplingTensors":
        """One row per entry; the rows of an n > 1 request differ by sample_index."""
        sample_index = sample_index or [0] * len(params)
        keys = request_keys(seeds, sample_index)
        top_k = [0 if p.top_k in (-1, 0) or p.top_k >= vocab_size else p.top_k for p in params]
        return SamplingTensors(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            min_p=jnp.asarray([p.min_p for p in params], jnp.float32),
            keys=jnp.asarray(keys, jnp.uint32),
        )


@struct.dataclass
class PenaltyInputs:
    """Per-row penalty and bias settings and the token ids they look at (host arrays, padded
    with vocab_size, which matches no token)."""

    presence: jax.Array  # [B] float32
    frequency: jax.Array  # [B] float32
    repetition: jax.Array  # [B] float32
    prompt_ids: jax.Array  # [B, Lp] int32
    output_ids: jax.Array  # [B, Lo] int32
    bias_ids: jax.Array  # [B, Lb] int32: logit_bias keys
    bias_values: jax.Array  # [B, Lb] float32
    allowed_ids: jax.Array  # [B, La] int32: allowed_token_ids
    restricted: jax.Array  # [B] bool: the row samples only its allowed ids
    bad_prefix: jax.Array  # [B, W, P] int32: each bad word's tokens but the last, right-aligned; -1: any
    bad_last: jax.Array  # [B, W] int32: each bad word's last token (vocab_size: no word)
    tail: jax.Array  # [B, P] int32: the output's last P tokens, right-aligned; -2: before the output
    fsm_table: jax.Array  # [S, V] int32: the rows' structured-output machines (`fsm_tables`); S = 0: none
    fsm_state: jax.Array  # [B] int32: each row's state in fsm_table (0: unconstrained)

    @staticmethod
    def from_rows(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
                  vocab_size: int, rows: int | None = None,
                  bad_words: list[list[list[int]]] | None = None, fsms: list | None = None,
                  fsm_states: list[int] | None = None) -> "PenaltyInputs":
        """One row per params entry, padded to `rows` rows (padding: no penalty); id widths are
        bucketed (powers of two) so that growing outputs reuse compiled programs. bad_words: each
        row's banned token sequences (`InputProcessor.bad_words_ids`); fsms: each row's
        `structured.TokenFSM` or None (`InputProcessor.token_fsm`), and fsm_states its state after
        the output so far (`EngineRequest.fsm_state`; None: walked from outputs)."""
        from jaxinfer.generate import bucket  # generate imports this module
        rows = rows or len(params)

        def ids(lists):
            out = np.full((rows, bucket(max(map(len, lists), default=0), minimum=16)), vocab_size, np.int32)
            for i, x in enumerate(lists):
                out[i, :len(x)] = x
            return out

        def per_row(field, off):
            return np.asarray([getattr(p, field) for p in params] + [off] * (rows - len(params)), np.float32)

        bad_prefix, bad_last, tail = bad_word_tables(bad_words or [], outputs, vocab_size, rows)
        fsm = fsm_tables(fsms or [], outputs, vocab_size, rows, fsm_states)
        if not any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in params):
            # Nothing reads the token counts: leave the ids out, so that a growing output does not
            # change the program's shapes (bias, allowed tokens, bad words, structured outputs).
            prompts, outputs = [[]] * len(params), [[]] * len(params)
        biases = [p.logit_bias or {} for p in params]
        bias_ids = ids([list(b) for b in biases])
        bias_values = np.zeros(bias_ids.shape, np.float32)
        for i, b in enumerate(biases):
            bias_values[i, :len(b)] = list(b.values())
        return PenaltyInputs(presence=per_row("presence_penalty", 0.0), frequency=per_row("frequency_penalty", 0.0),
                             repetition=per_row("repetition_penalty", 1.0), prompt_ids=ids(prompts),
                             output_ids=ids(outputs), bias_ids=bias_ids, bias_values=bias_values,
                             allowed_ids=ids([p.allowed_token_ids or [] for p in params]),
                             restricted=np.asarray([p.allowed_token_ids is not None for p in params]
                                                   + [False] * (rows - len(params))),
                             bad_prefix=bad_prefix, bad_last=bad_last, tail=tail, **fsm)

    def build(self, vocab_size: int) -> "Penalties":
        """On device: count each row's output tokens, mark its prompt tokens, lay out its bias."""
        b = self.presence.shape[0]

        def scatter(ids, value, dtype):
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
            return jnp.zeros((b, vocab_size), dtype).at[rows, ids].add(value, mode="drop")

        allowed = scatter(self.allowed_ids, 1, jnp.int32) > 0
        bias = scatter(self.bias_ids, jnp.asarray(self.bias_values), jnp.float32)
        bias = jnp.where(jnp.asarray(self.restricted)[:, None] & ~allowed, _MASK, bias)
        return Penalties(presence=jnp.asarray(self.presence), frequency=jnp.asarray(self.frequency),
                         repetition=jnp.asarray(self.repetition),
                         output_counts=scatter(self.output_ids, 1, jnp.int32),
                         in_prompt=scatter(self.prompt_ids, 1, jnp.int32) > 0, bias=bias,
                         bad_prefix=jnp.asarray(self.bad_prefix), bad_last=jnp.asarray(self.bad_last),
                         tail=jnp.asarray(self.tail), fsm_table=jnp.asarray(self.fsm_table),
                         fsm_state=jnp.asarray(self.fsm_state))


def bad_word_tables(words: list[list[list[int]]], outputs: list[list[int]], vocab_size: int,
                    rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host arrays of `PenaltyInputs`' bad-word fields for rows whose banned token sequences are
    `words` (rows beyond it: none). W (words per row) and P (the longest word's tokens but the last)
    are bucketed; both are 0 when no row bans anything, and the step then does no bad-word work."""
    from jaxinfer.generate import bucket  # generate imports this module
    most = max((len(ws) for ws in words), default=0)
    longest = max((len(w) - 1 for ws in words for w in ws), default=0)
    w_width = bucket(most, minimum=4) if most else 0
    p_width = bucket(longest, minimum=4) if longest else 0
    prefix = np.full((rows, w_width, p_width), -1, np.int32)
    last = np.full((rows, w_width), vocab_size, np.int32)
    tail = np.full((rows, p_width), -2, np.int32)
    for i, ws in enumerate(words):
        for j, w in enumerate(ws):
            last[i, j] = w[-1]
            if len(w) > 1:
                prefix[i, j, p_width - len(w) + 1:] = w[:-1]
        if p_width and ws:
            recent = outputs[i][-p_width:]
            tail[i, p_width - len(recent):] = recent
    return prefix, last, tail


_FSM_TABLES: dict = {}  # the last few batches' stacked tables, by the machines they hold


def fsm_tables(fsms: list, outputs: list[list[int]], vocab_size: int, rows: int,
               states: list[int] | None = None) -> dict:
    """Host arrays of `PenaltyInputs`' structured-output fields: the distinct machines of the rows
    stacked into one table behind state 0, which allows every token and stays put (rows without a
    constraint sit there), and each row's state after its output so far (given, or walked from
    the outputs). The table's height is
    bucketed; it is empty when no row is constrained (the step then does no work for it). The
    stacked table is kept on device for the next steps of the same rows."""
    from jaxinfer.generate import bucket  # generate imports this module
    state = np.zeros((rows,), np.int32)
    distinct = list({id(f): f for f in fsms if f is not None}.values())
    if not distinct:
        return {"fsm_table": np.zeros((0, vocab_size), np.int32), "fsm_state": state}
    key = tuple(id(f) for f in distinct)
    if key not in _FSM_TABLES:
        height = bucket(1 + sum(f.num_states for f in distinct), minimum=16)
        table = np.full((height, vocab_size), -1, np.int32)
        table[0] = 0
        offsets, at = {}, 1
        for f in distinct:
            offsets[id(f)] = at
            table[at:at + f.num_states] = np.where(f.table >= 0, f.table + at, -1)
            at += f.num_states
        if len(_FSM_TABLES) >= 8:
            _FSM_TABLES.pop(next(iter(_FSM_TABLES)))
        # On device once: the engine passes the same table every step. distinct keeps the ids alive.
        _FSM_TABLES[key] = (jax.device_put(table), offsets, distinct)
    table, offsets, _ = _FSM_TABLES[key]
    for i, f in enumerate(fsms):
        if f is not None:
            at = f.walk(outputs[i]) if states is None else states[i]
            state[i] = 0 if at < 0 else offsets[id(f)] + at  # released (-1): the free state
    return {"fsm_table": table, "fsm_state": state}


@struct.dataclass
class Penalties:
    """vLLM's presence / frequency / repetition penalties of each row, with the token statistics
    they read (how often each token was generated, whether it occurs in the prompt), its logit
    bias (-inf outside allowed_token_ids), and its bad words with the output's last tokens."""

    presence: jax.Array  # [B]
    frequency: jax.Array  # [B]
    repetition: jax.Array  # [B]
    output_counts: jax.Array  # [B, V] int32
    in_prompt: jax.Array  # [B, V] bool
    bias: jax.Array  # [B, V] float32 added last
    bad_prefix: jax.Array  # [B, W, P] int32 (PenaltyInputs)
    bad_last: jax.Array  # [B, W] int32
    tail: jax.Array  # [B, P] int32: the last P tokens generated, right-aligned (-2: none)
    fsm_table: jax.Array  # [S, V] int32: structured-output machines, next state or -1 (S = 0: none)
    fsm_state: jax.Array  # [B] int32

    def apply(self, logits: jax.Array, drafted: jax.Array | None = None) -> jax.Array:
        """logits [B, V] as vLLM (and transformers' repetition penalty) shape them: a token seen in
        the prompt or the output has a positive logit divided by repetition_penalty, a negative
        one multiplied by it; then each generated token loses frequency_penalty per occurrence
        and presence_penalty once; then logit_bias is added (and tokens outside
        allowed_token_ids are masked); last, a bad word's final token is masked where the
        output ends with the word's other tokens.

        drafted [B, n-1] (speculative verification): logits are [B, n, V], one row per verified
        position, and position i counts drafted[:, :i] as generated on top of the recorded
        output, since it is only ever used when those drafts are accepted (for bad words too:
        its recent tokens end with those drafts). A draft of -1 (no proposal) counts as nothing."""
        counts, in_prompt, bias = self.output_counts, self.in_prompt, self.bias
        if drafted is not None:
            hot = jax.nn.one_hot(drafted, logits.shape[-1], dtype=jnp.int32)  # [B, n-1, V]; -1: zeros
            before = jnp.cumsum(jnp.pad(hot, ((0, 0), (1, 0), (0, 0))), axis=1)  # [B, n, V] drafts before i
            counts, in_prompt, bias = counts[:, None] + before, in_prompt[:, None], bias[:, None]
        per_row = (slice(None),) + (None,) * (logits.ndim - 1)  # [B] -> [B, 1(, 1)]
        seen = in_prompt | (counts > 0)
        rep = self.repetition[per_row]
        x = logits.astype(jnp.float32)
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        x = x - self.frequency[per_row] * counts - self.presence[per_row] * (counts > 0) + bias
        if self.bad_last.shape[1]:  # some row bans words
            x = jnp.where(self.banned(drafted, logits.shape[-1]), _MASK, x)
        if self.fsm_table.shape[0]:  # some row is constrained: its state's allowed tokens only
            x = jnp.where(self.fsm_table[self.fsm_states(drafted)] >= 0, x, _MASK)
        return x

    def fsm_states(self, drafted: jax.Array | None) -> jax.Array:
        """[B] states (or [B, n] with drafted [B, n-1]: position i after drafted[:, :i])."""
        if drafted is None:
            return self.fsm_state
        states = [self.fsm_state]
        for i in range(drafted.shape[1]):
            states.append(self._advance(states[-1], drafted[:, i], drafted[:, i] >= 0))
        return jnp.stack(states, axis=1)

    def _advance(self, state: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
        """The states after tokens [B] (where active). A token the machine forbids (only drawn
        when something else left no allowed token, or as a draft that verification rejects)
        leads to state 0, which constrains nothing, so that no row is left without a token."""
        nxt = self.fsm_table[state, jnp.maximum(tokens, 0)]
        return jnp.where(active, jnp.maximum(nxt, 0), state)

    def banned(self, drafted: jax.Array | None, vocab: int) -> jax.Array:
        """[B, V] (or [B, n, V] with drafted [B, n-1]) bool: the bad words' last tokens whose other
        tokens end the output (at position i: the output, then drafted[:, :i])."""
        p = self.tail.shape[1]
        if drafted is None:
            recent = self.tail[:, None]  # [B, 1, P]
        else:
            ext = jnp.concatenate([self.tail, drafted.astype(jnp.int32)], axis=1)  # [B, P + n - 1]
            recent = jnp.stack([ext[:, i:i + p] for i in range(drafted.shape[1] + 1)], axis=1)  # [B, n, P]
        prefix = self.bad_prefix[:, None]  # [B, 1, W, P]
        ends = jnp.all((prefix == recent[:, :, None, :]) | (prefix < 0), axis=-1)  # [B, n, W]
        hit = jnp.where(ends, self.bad_last[:, None, :], vocab)  # [B, n, W]; vocab: dropped
        b, n = hit.shape[:2]
        rows = jnp.arange(b)[:, None, None]
        pos = jnp.arange(n)[None, :, None]
        out = jnp.zeros((b, n, vocab), bool).at[rows, pos, hit].set(True, mode="drop")
        return out if drafted is not None else out[:, 0]

    def record(self, tokens: jax.Array, active: jax.Array) -> "Penalties":
        """Count tokens [B] (or [B, n], with active [B, n]) just generated by the active rows, and
        shift them into the recent tokens that bad words look at."""
        rows = jnp.arange(tokens.shape[0]).reshape((-1,) + (1,) * (tokens.ndim - 1))  # broadcast to tokens
        tail, state = self.tail, self.fsm_state
        toks, act = tokens.reshape(tokens.shape[0], -1), active.reshape(tokens.shape[0], -1)
        for j in range(toks.shape[1]):  # in order: position j follows j - 1
            if tail.shape[1]:
                shifted = jnp.concatenate([tail[:, 1:], toks[:, j:j + 1].astype(jnp.int32)], axis=1)
                tail = jnp.where(act[:, j:j + 1], shifted, tail)
            if self.fsm_table.shape[0]:
                state = self._advance(state, toks[:, j], act[:, j])
        return self.replace(output_counts=self.output_counts.at[rows, tokens].add(active.astype(jnp.int32)),
                            tail=tail, fsm_state=state)


def seed_key(seed: int) -> jax.Array:
    """A PRNG key that depends on every bit of an integer seed of any size or sign.

    `jax.random.key` keeps only a seed's low 32 bits (without jax_enable_x64; 0 and 2**32 gave
    the same key, as did -1 and 2**32 - 1) and raised OverflowError outside the int64 range. Seeds
    in [0, 2**32) keep that key. Any other seed starts from the key of its magnitude's low 32 bits
    and folds in the magnitude's higher 32-bit chunks, lowest first, then its sign. The last fold
    is always the sign, and the chunks before it are the magnitude's digits without leading zeros,
    so no two seeds fold the same sequence."""
    if 0 <= seed < 2**32:
        return jax.random.key(seed)
    mag = abs(seed)
    key = jax.random.key(mag & 0xFFFFFFFF)
    rest = mag >> 32
    while rest:
        key = jax.random.fold_in(key, rest & 0xFFFFFFFF)
        rest >>= 32
    return jax.random.fold_in(key, int(seed < 0))


def request_key(seed: int, sample_index: int = 0) -> np.ndarray:
    """PRNG key data [2] uint32 of one request's sample stream."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(seed_key(seed), sample_index)))


@jax.jit
def _request_keys_u32(seeds: jax.Array, sample_index: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, i: jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)))(seeds, sample_index)


def request_keys(seeds: list[int], sample_index: list[int]) -> np.ndarray:
    """`request_key` of each (seed, sample_index) pair, [n, 2] uint32. Seeds in [0, 2**32) take one
    device call for all rows (one call per row cost ~0.6 ms: 12 s for 20,000 rows); any other
    seed takes `request_key`'s path. Rows are padded to a power of two (few programs)."""
    fits = np.array([0 <= s < 2**32 and 0 <= i < 2**32 for s, i in zip(seeds, sample_index)], bool)
    rows = np.flatnonzero(fits)
    out = np.zeros((len(seeds), 2), np.uint32)
    if rows.size:
        s32 = np.zeros((1 << (rows.size - 1).bit_length(),), np.uint32)
        i32 = np.zeros_like(s32)
        s32[:rows.size] = [seeds[r] for r in rows]
        i32[:rows.size] = [sample_index[r] for r in rows]
        out[rows] = np.asarray(_request_keys_u32(s32, i32))[:rows.size]
    for r in np.flatnonzero(~fits):
        out[r] = request_key(seeds[r], sample_index[r])
    return out


@struct.dataclass
class RowLimits:
    """Per-row stopping rules that act on device."""

    max_tokens: jax.Array  # [B] int32
    min_tokens: jax.Array  # [B] int32
    stop_ids: jax.Array  # [B, E] int32, padded with vocab_size (never matches)


def row_limits(max_tokens: list[int], min_tokens: list[int], stop_ids: list[list[int]],
               vocab_size: int) -> RowLimits:
    width = max(1, max(len(s) for s in stop_ids))
    padded = np.full((len(stop_ids), width), vocab_size, np.int32)
    for i, s in enumerate(stop_ids):
        padded[i, :len(s)] = s
    return RowLimits(max_tokens=jnp.asarray(max_tokens, jnp.int32),
                     min_tokens=jnp.asarray(min_tokens, jnp.int32), stop_ids=jnp.asarray(padded))


def block_stop_tokens(logits: jax.Array, limits: RowLimits, num_generated: jax.Array) -> jax.Array:
    """Before min_tokens, stop tokens cannot be drawn: their logits [B, V] become -inf."""
    blocked = (num_generated < limits.min_tokens)[:, None]  # [B, 1]
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], limits.stop_ids.shape)
    cols = jnp.where(blocked, limits.stop_ids, logits.shape[-1])  # out of range -> dropped
    return logits.at[rows, cols].set(-jnp.inf, mode="drop")


def filter_logits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """Temperature-scaled logits [B, V] with min-p, top-k and top-p masked to -inf.

    softmax of the result is the distribution a non-greedy row samples from (and
    the p or q of speculative verification). Greedy rows come back unscaled.

    top-k and top-p need the k-th largest logit and the smallest logit of the top-p
    prefix. Both are found by an exact bisection over the 2^32 float keys (32 masked
    reductions over [B, V]) instead of sorting each row: XLA:CPU sorts a 4,096-token row
    in ~0.44 ms, longer than a whole decode step of the embedded target at batch 1. Each
    filter runs only when some row of the batch enables it.
    """
    t = jnp.where(st.temperature > 0, st.temperature, 1.0)[:, None]
    x = logits.astype(jnp.float32) / t
    vocab = x.shape[-1]
    # min-p: drop tokens whose probability is below min_p * the top probability.
    top = jnp.max(x, axis=-1, keepdims=True)
    min_p = st.min_p[:, None]
    x = jnp.where((min_p > 0) & (x - top < jnp.log(jnp.maximum(min_p, 1e-38))), _MASK, x)

    def top_k(x):  # keep the k largest (and every token tied with the k-th)
        on = st.top_k > 0
        k = jnp.where(on, jnp.minimum(st.top_k, vocab), vocab).astype(jnp.float32)
        keys = _ordered_keys(x)
        kth = _largest_key_reaching(keys, jnp.ones_like(x), k)
        return jnp.where(on[:, None] & (keys < kth[:, None]), _MASK, x)

    def top_p(x):  # keep the smallest set of largest tokens whose mass reaches p (and ties)
        on = st.top_p < 1
        keys = _ordered_keys(x)
        pth = _largest_key_reaching(keys, jax.nn.softmax(x, axis=-1), jnp.where(on, st.top_p, 0.0))
        return jnp.where(on[:, None] & (keys < pth[:, None]), _MASK, x)

    x = jax.lax.cond(jnp.any(st.top_k > 0), top_k, lambda x: x, x)
    return jax.lax.cond(jnp.any(st.top_p < 1), top_p, lambda x: x, x)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys with the same order (-inf lowest): sign-magnitude to offset binary."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row of keys [B, V]: the largest key K with sum(weights[keys >= K]) >= target [B].

    The sum only shrinks as K grows, so a bisection over all 2^32 keys finds K exactly in 32
    steps, and K is always one of the row's keys (the sum changes only at them). Key 0 is
    the answer when even the whole row falls short of the target (keep everything).
    """
    def step(_, bounds):
        lo, hi = bounds  # invariant: sum(weights[keys >= lo]) >= target; the answer is in [lo, hi]
        half = hi - lo
        mid = lo + (half >> 1) + (half & 1)  # upper middle, > lo while lo < hi; no uint32 overflow
        ok = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0.0), axis=-1) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    rows = keys.shape[0]
    lo = jnp.zeros((rows,), jnp.uint32)
    hi = jnp.full((rows,), 0xFFFFFFFF, jnp.uint32)
    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


def row_keys(st: SamplingTensors, counter: jax.Array) -> jax.Array:
    """Key for drawing token number counter[b] of row b: [B, 2] uint32."""
    return jax.vmap(lambda k, c: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(k), c)))(st.keys, counter)


def greedy_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, axis=-1) as int32 (the first of equal maxima), as a max and then a min of
    the indices where the max sits: two plain reductions XLA:CPU vectorizes, 3-7x faster than its
    argmax (a reduction over (value, index) pairs) on [1-32, 4096-8192] logits
    (runs/s23/argmax.py). A row of NaNs gives 0."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == top, jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1), v),
                  axis=-1)
    return jnp.where(idx == v, 0, idx)


def sample(logits: jax.Array, st: SamplingTensors, counter: jax.Array, greedy_only: bool = False) -> jax.Array:
    """Draw one token per row from logits [B, V]; counter [B] indexes the draw. -> [B] int32.

    greedy_only: every row is greedy (static; vLLM's all_greedy): the argmax alone, with no filter
    or draw compiled (a lax.cond skips them at run time otherwise, but they are still compiled)."""
    greedy_tokens = greedy_argmax(logits)
    if greedy_only:
        return greedy_tokens

    def draw(_):
        filtered = filter_logits(logits, st)
        keys = row_keys(st, counter)
        drawn = jax.vmap(lambda k, l: jax.random.categorical(jax.random.wrap_key_data(k), l))(
            keys, filtered).astype(jnp.int32)
        return jnp.where(st.temperature > 0, drawn, greedy_tokens)

    return jax.lax.cond(jnp.all(st.temperature == 0), lambda _: greedy_tokens, draw, None)


def token_logprobs(logits: jax.Array, tokens: jax.Array, num_top: int):
    """Log-probabilities of the model's raw distribution (vLLM's default mode).

    logits [..., V], tokens [...] -> (logprob [...], rank [...] (1 = most likely),
    top_ids [..., N], top_logprobs [..., N]).
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    rank = jnp.sum(lp > chosen[..., None], axis=-1) + 1
    if num_top > 0:
        top_lp, top_ids = jax.lax.top_k(lp, num_top)
    else:
        top_lp = jnp.zeros(tokens.shape + (0,), jnp.float32)
        top_ids = jnp.zeros(tokens.shape + (0,), jnp.int32)
    return chosen, rank.astype(jnp.int32), top_ids.astype(jnp.int32), top_lp
