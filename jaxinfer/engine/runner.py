"""ModelRunner: turns scheduled chunks into fixed-shape arrays and runs the jitted step.

Legend: B rows, T tokens per row, pp pages per row, V vocab, N top logprobs.

A step runs a few calls of one jitted function over the paged cache (donated,
updated in place): one for the decode rows ([B, 1]), then the prefill chunks
([B, T]) in calls of rows of similar length (`prefill_calls`). Keeping them apart
keeps decode attention at one query per row and prefill padding under 25%,
instead of padding every row to the longest chunk. Shapes are bucketed (B, T and
the page-table width on a grid of four sizes per doubling) so a long run compiles
a bounded number of programs; `compilations` counts the distinct ones.

With speculative decoding, decode rows instead run `spec_step`: k drafted tokens (host
prompt lookup; a draft model whose paged cache shares the target's page tables; prompt
lookup where every row has a match and the draft model otherwise; or layer skip, EAGLE,
Medusa: engine/drafting.py) verified by one target forward over k + 1 positions. A step in
which no row's context holds a prompt-lookup match decodes plainly (n-gram).

With async scheduling (`enable_async`), `launch` dispatches a step's calls and `collect` reads
them back later: each sequence slot's last sampled token stays on the device (`sampled`), and a
decode row whose token the host has not read yet starts from it (`StepInputs.feed`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.engine import drafting
from jaxinfer.engine.scheduler import ScheduledChunk
from jaxinfer.spec.drafters import draft_widths, lookup_lengths
from jaxinfer.generate import bucket, shape_bucket
from jaxinfer.kv.cache import AttentionMeta, KVCache
from jaxinfer.layers import paged_loop_applies
from jaxinfer.lora import LoRAArrays, with_lora
from jaxinfer.model import Weights, forward
from jaxinfer.outputs import position_logprobs
from jaxinfer.sampling import (Penalties, PenaltyInputs, RowLimits, SamplingTensors, block_stop_tokens, sample,
                               token_logprobs)


@dataclasses.dataclass(frozen=True)
class StepStatics:
    num_logprobs: int = -1  # top-N logprobs of sampled tokens; -1: none
    num_prompt_logprobs: int = -1  # top-N logprobs of prompt tokens; -1: none
    backend: str = "xla"
    # Every row of the call is greedy, a static promise: the program holds no top-k / top-p / min-p
    # filter and no draw (vLLM's all_greedy). Their lax.cond already skipped them at run time; here
    # they are not even compiled, ~30% of an engine_step program's trace, lowering and compile.
    greedy: bool = False


@struct.dataclass
class StepInputs:
    """Fixed-shape inputs of one group of rows: host (numpy) arrays that the jitted call transfers."""

    tokens: jax.Array  # [B, T]
    page_table: jax.Array  # [B, pp]
    kv_lens: jax.Array  # [B] cached tokens after this call's writes
    q_lens: jax.Array  # [B] valid tokens of each row
    counters: jax.Array  # [B] output tokens so far: index of the token sampled next
    st: SamplingTensors
    limits: RowLimits
    next_tokens: jax.Array  # [B, T] the token after each position (prompt logprobs only)
    slots: jax.Array  # [B] each row's sequence slot (padding rows: out of range)
    pen: PenaltyInputs | None = None  # penalties, logit_bias, allowed_token_ids (None: no row has any)
    lora_slots: jax.Array | None = None  # [B] each row's adapter slot (0: none); None: LoRA off
    # async scheduling: [B] 1 where the row's first token is its sequence's last sampled token, which
    # the host has not read back yet (`engine_step` takes it from the device); None: no async scheduling
    feed: jax.Array | None = None

    def meta(self) -> AttentionMeta:
        return AttentionMeta(page_table=self.page_table, kv_lens=self.kv_lens, q_lens=self.q_lens,
                             slots=self.slots)

    def penalty_shapes(self) -> tuple | None:
        """What the penalty inputs add to the compiled program's signature."""
        pen = self.pen
        return None if pen is None else tuple(x.shape for x in (pen.prompt_ids, pen.output_ids, pen.bias_ids,
                                                                pen.allowed_ids, pen.bad_prefix, pen.fsm_table))


def _next_token(logits: jax.Array, inp: StepInputs, counters: jax.Array, statics: StepStatics,
                pen: Penalties | None = None):
    """Each row's next token from logits [B, V] (stop tokens blocked before min_tokens, penalties
    and biases applied, the draw keyed by the output counter) and its logprob extras (None unless asked for;
    the model's logprobs, before penalties, as vLLM reports them)."""
    logits = block_stop_tokens(logits, inp.limits, counters)
    shaped = logits if pen is None else pen.apply(logits)
    tok = sample(shaped, inp.st, counters, statics.greedy)
    lp = token_logprobs(logits, tok, statics.num_logprobs) if statics.num_logprobs >= 0 else None
    return tok, lp


def _all_greedy(inp: StepInputs) -> bool:
    """StepStatics.greedy for a call's inputs (host arrays; padding rows are greedy)."""
    return not np.any(np.asarray(inp.st.temperature) > 0)


def _adapted(weights: Weights, lora: LoRAArrays | None, inp: StepInputs) -> Weights:
    """The target's weights with the rows' LoRA adapters (enable_lora), else as they are."""
    return weights if lora is None else with_lora(weights, lora, inp.lora_slots)


@functools.partial(jax.jit, static_argnames=("cfg", "statics", "draft"),
                   donate_argnames=("kv", "dcache", "sampled"))
def engine_step(weights: Weights, cfg: ModelConfig, statics: StepStatics, kv: KVCache, inp: StepInputs,
                draft: drafting.DraftSpec | None = None, dparams=None, dcache=None, lora: LoRAArrays | None = None,
                sampled: jax.Array | None = None):
    """One forward over tokens [B, T] into the paged cache, then sample each row's next token.

    draft, dparams, dcache: the drafter that speculation drafts with on device, its params and
    its paged state, which `drafting.record` brings up to date. lora: the device adapters (rows
    pick theirs by inp.lora_slots). sampled: async scheduling's last sampled token of every
    sequence slot [max_num_seqs]: rows with inp.feed set start from theirs (their penalties,
    bad-word tails and structured-output states, built on the host from the tokens it has, then
    count it: `Penalties.record`), and every row's draw is stored there (a row that does not
    complete its tokens stores a draw no one reads). Returns (kv,
    draft state, sampled [B], logprob extras or None, prompt-logprob extras or None, the slots'
    tokens or None).
    """
    weights = _adapted(weights, lora, inp)
    meta = inp.meta()
    t = inp.tokens.shape[1]
    tokens = inp.tokens
    if sampled is not None:  # padding rows' slots are out of range: clamped here, dropped below
        tokens = tokens.at[:, 0].set(jnp.where(inp.feed > 0, sampled[jnp.minimum(inp.slots, sampled.shape[0] - 1)],
                                               tokens[:, 0]))
    last = jnp.maximum(inp.q_lens - 1, 0)[:, None]  # [B, 1]
    want_plp = statics.num_prompt_logprobs >= 0
    logits, hidden, kv = forward(weights, cfg, tokens, meta.query_positions(t), kv, meta,
                                 backend=statics.backend, logits_at=None if want_plp else last)
    if draft is not None:
        dcache = drafting.record(draft, dparams, weights, dcache, hidden, tokens, meta, statics.backend)
    plp = None
    if want_plp:
        plp = token_logprobs(logits, inp.next_tokens, statics.num_prompt_logprobs)
        logits = jnp.take_along_axis(logits, last[:, :, None], axis=1)
    pen = None if inp.pen is None else inp.pen.build(cfg.vocab_size)
    if pen is not None and sampled is not None:  # the host built them without the token in flight
        pen = pen.record(tokens[:, 0], inp.feed > 0)
    tok, lp = _next_token(logits[:, 0], inp, inp.counters, statics, pen)
    if sampled is not None:
        sampled = sampled.at[inp.slots].set(tok, mode="drop")
    return kv, dcache, tok, lp, plp, sampled


@functools.partial(jax.jit, static_argnames=("cfg", "statics", "num_steps"), donate_argnames=("kv",))
def multi_decode_step(weights: Weights, cfg: ModelConfig, statics: StepStatics, kv: KVCache, inp: StepInputs,
                      steps_left: jax.Array, num_steps: int, lora: LoRAArrays | None = None):
    """num_steps decode steps of rows [B, 1] in one call (vLLM's multi-step scheduling).

    Each step runs every live row's last token through the model, samples the next one on
    device and feeds it to the following step, so the host schedules, transfers and reads
    back once per num_steps tokens instead of once per token. A row stops writing and
    sampling after a stop token or after steps_left[b] steps (its max_tokens; 0 for padding
    rows); the host applies stop strings and everything else after the call and drops what
    a finished row sampled past its end. The draws equal single steps': the PRNG is keyed
    by each row's output counter. Returns (kv, tokens [n, B], live [n, B] (token i of row b
    is valid), logprob extras [n, B, ...] or None).
    """
    logits_at = jnp.zeros((inp.tokens.shape[0], 1), jnp.int32)
    weights = _adapted(weights, lora, inp)

    def step(carry, _):
        kv, tok, kv_lens, counters, live, pen = carry
        q_lens = live.astype(jnp.int32)
        meta = AttentionMeta(page_table=inp.page_table, kv_lens=kv_lens, q_lens=q_lens, slots=inp.slots)
        logits, _, kv = forward(weights, cfg, tok[:, None], meta.query_positions(1), kv, meta,
                                backend=statics.backend, logits_at=logits_at)
        nxt, lp = _next_token(logits[:, 0], inp, counters, statics, pen)
        nxt = jnp.where(live, nxt, tok)
        if pen is not None:  # later fused steps see this token in the counts
            pen = pen.record(nxt, live)
        stopped = jnp.any(nxt[:, None] == inp.limits.stop_ids, axis=-1)
        ran = counters + 1 - inp.counters  # steps this row has run, this one included
        live_next = live & ~stopped & (ran < steps_left)
        return (kv, nxt, kv_lens + live_next, counters + 1, live_next, pen), (nxt, live, lp)

    pen = None if inp.pen is None else inp.pen.build(cfg.vocab_size)
    init = (kv, inp.tokens[:, 0], inp.kv_lens, inp.counters, inp.q_lens > 0, pen)
    (kv, *_), (toks, live, lp) = jax.lax.scan(step, init, None, length=num_steps)
    return kv, toks, live, lp


@functools.partial(jax.jit, static_argnames=("cfg", "statics", "draft", "k", "lookup"),
                   donate_argnames=("kv", "dcache"))
def spec_step(weights: Weights, cfg: ModelConfig, statics: StepStatics, kv: KVCache, inp: StepInputs,
              prev: jax.Array, draft: drafting.DraftSpec | None = None, dparams=None, dcache=None, k: int = 1,
              lora: LoRAArrays | None = None, lookup: bool = False):
    """Speculative decode of rows whose only pending token is the last sampled one.

    inp.tokens [B, k+1] = [last, d_1..d_k] (prompt-lookup drafts from the host: n-gram, or
    ngram_draft_model with lookup=True), or [last, ...] when `draft` proposes d_1..d_k here
    (`drafting.propose`; prev [B]: the token before last, which a draft model re-reads).
    `drafting.commit` then brings the draft's state up to date. One target forward scores all k + 1 positions; `spec.verify.verify` accepts
    (min(1, p/q), residual on rejection, bonus when all pass; greedy: argmax match).
    Rejected positions are rolled back by the host not advancing num_computed.
    Returns (kv, draft state, drafts [B, k], n_acc [B], next [B], logprob extras or None).
    """
    from jaxinfer.spec.verify import verify

    weights = _adapted(weights, lora, inp)  # the target's; a draft model has no adapters
    pen = None if inp.pen is None else inp.pen.build(cfg.vocab_size)
    draft_logits = None
    drafts = inp.tokens[:, 1:]
    if draft is not None and not lookup:
        drafts, draft_logits, kv, dcache = drafting.propose(draft, dparams, weights, cfg, kv, dcache, inp, prev, k,
                                                            pen, statics.backend, statics.greedy)
    # A row that proposes nothing (-1: prompt lookup without a match) feeds its last token there;
    # those positions are rejected and rolled back like any.
    tokens = jnp.concatenate([inp.tokens[:, :1], jnp.where(drafts < 0, inp.tokens[:, :1], drafts)], axis=1)
    meta = inp.meta()
    logits, hidden, kv = forward(weights, cfg, tokens, meta.query_positions(k + 1), kv, meta,
                                 backend=statics.backend)
    n_acc, nxt, blocked = verify(logits, drafts, draft_logits, inp.st, inp.limits, inp.counters, statics.greedy,
                                 pen=pen)
    if draft is not None:
        dcache = drafting.commit(draft, dparams, weights, dcache, hidden, tokens, n_acc, inp, lookup, statics.backend)
    lp = None
    if statics.num_logprobs >= 0:
        i = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(i < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])  # [B, k+1]
        lp = token_logprobs(blocked, emitted, statics.num_logprobs)
    return kv, dcache, drafts, n_acc, nxt, lp


class ModelRunner:
    """Owns the device state: weights, the paged KV cache (and a draft model's), the compiled steps."""

    def __init__(self, weights: Weights, cfg: ModelConfig, kv: KVCache, page_size: int,
                 max_pages_per_seq: int, backend: str = "xla", decode_token=None, spec=None,
                 draft: drafting.DraftSpec | None = None, draft_params=None, draft_cache=None, lora=None,
                 shape_buckets: str = "fine", max_num_seqs: int | None = None):
        self.weights, self.cfg, self.kv = weights, cfg, kv
        self.lora = lora  # lora.LoRAManager (enable_lora) or None
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.backend = backend
        self.decode_token = decode_token
        self.spec = spec  # SpeculativeConfig or None
        # how speculation drafts on device (None: not at all, or n-gram), its params and paged state
        self.draft, self.draft_params, self.draft_cache = draft, draft_params, draft_cache
        self.signatures: set[tuple] = set()
        self.shape_buckets = shape_buckets  # the grid of rows, tokens and table widths (EngineConfig)
        # "slots": decode, fused-decode and speculative calls run this many rows, always
        self.slot_rows = max_num_seqs if shape_buckets == "slots" else None
        # attention that stops at the longest row (see _inputs)
        self.full_width_tables = paged_loop_applies(backend, kv.k[0])
        self.sampled = None  # async scheduling: each sequence slot's last sampled token, on device

    def enable_async(self, num_slots: int):
        """Async scheduling: keep every sequence slot's last sampled token on the device, where
        the next step's decode rows read theirs (`StepInputs.feed`), so that the host can schedule
        and dispatch a step before it has read back the one before."""
        self.sampled = jnp.zeros((num_slots,), jnp.int32)

    @property
    def compilations(self) -> int:
        return len(self.signatures)

    def read_pages(self, pages: list[int]):
        """Host copy of pages (target and draft caches) for preemption by swap."""
        idx = np.zeros((bucket(len(pages), minimum=1),), np.int32)
        idx[:len(pages)] = pages
        self.signatures.add(("swap_out", idx.shape))
        return jax.device_get(_take_pages((self.kv, self.draft_cache), idx)), len(pages)

    def write_pages(self, pages: list[int], host):
        """Put a `read_pages` copy back into pages (a resumed request's fresh pages)."""
        data, n = host
        assert n == len(pages)
        idx = np.full((jax.tree_util.tree_leaves(data)[0].shape[0],), self.kv.num_pages, np.int32)  # pad: dropped
        idx[:n] = pages
        self.signatures.add(("swap_in", idx.shape))
        self.kv, self.draft_cache = _put_pages((self.kv, self.draft_cache), idx, data)


    def execute(self, chunks: list[ScheduledChunk]) -> dict:
        """Run every chunk. Returns {request: (tokens, logprob dicts or None, num_drafted)} for
        chunks that sample (speculative rows may emit several tokens); prompt logprobs are
        written straight into the requests."""
        results = {}
        self._activate_adapters(chunks)
        # Decodes first: they read only pages computed in earlier steps. Prefill chunks and
        # requests admitted this step run after, so any page another row fills this step
        # (a prefix-cache hit registered at scheduling) is written before they read it.
        spec, decodes, prefills = _split(chunks)
        proposals = None
        if spec and self.spec.method in ("ngram", "ngram_draft_model"):
            # Prompt lookup on the host. When no row's context holds a match there is nothing
            # worth verifying, and the rows run as plain decodes instead of paying a (k + 1)-token
            # forward. When some rows match, the others ride along in the same call proposing
            # nothing (-1; `spec_step` feeds their last token at those positions): verification
            # then draws their token as a plain step would, with the same key, so a seeded row's
            # output does not depend on whether a batch-mate had a match. A second call would read
            # every weight again, which costs more than the padding at the batch sizes where
            # speculation pays.
            scale = self.spec.prompt_lookup_scale if self.spec.method == "ngram" else None
            found = [ngram_propose(c.request.all_tokens, c.num_draft, self.spec.prompt_lookup_min,
                                   self.spec.prompt_lookup_max, scale) for c in spec]
            if self.spec.method == "ngram_draft_model":  # lookup if every row has a match, else the model
                proposals = found if all(d is not None for d in found) else None
            else:
                if all(d is None for d in found):
                    decodes, spec = decodes + spec, []
                else:  # verify only as wide as the longest proposal (k, or with scale drafters.draft_widths)
                    need = max(len(d) for d in found if d is not None)
                    k = spec[0].num_draft
                    width = min(w for w in (draft_widths(k) if scale else (k,)) if w >= need)
                    found = [None if d is None else np.pad(d, (0, width - len(d)), constant_values=-1) for d in found]
                    spec = [dataclasses.replace(c, num_draft=width) for c in spec]
                proposals = [np.full(c.num_draft, -1) if d is None else d for c, d in zip(spec, found)]
        if spec:
            results.update(self._run_spec(spec, proposals))
        results.update(self.collect(self._launch_calls(decodes, prefills)))
        return results

    def launch(self, chunks: list[ScheduledChunk]) -> list:
        """Dispatch plain (not speculative) chunks without waiting for them (async scheduling);
        `collect` reads them back. A row's sampled token stays on the device for the next step."""
        self._activate_adapters(chunks)
        spec, decodes, prefills = _split(chunks)
        assert not spec, "speculative rows are verified synchronously (execute)"
        return self._launch_calls(decodes, prefills)

    def _launch_calls(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]) -> list:
        calls = [(decodes, 1)] if decodes else []
        grid = self.shape_buckets
        calls += [(g, shape_bucket(max(c.num_tokens for c in g), 16, grid)) for g in prefill_calls(prefills, grid)]
        # Dispatch every call, then fetch: the host builds the next call's inputs while the
        # device runs the previous one, and waits only once all of the step's calls are queued.
        # Whether a row samples is fixed now: with async scheduling its request's token count
        # changes before the call is read back.
        return [(group, [c.completes for c in group], self._launch(group, t)) for group, t in calls]

    def collect(self, launched: list) -> dict:
        """Read back launched calls: {request: (tokens, logprob dicts or None, 0)}."""
        results = {}
        for group, completes, out in launched:
            results.update(self._collect(group, completes, out))
        return results

    def _activate_adapters(self, chunks: list[ScheduledChunk]):
        """Put the step's LoRA adapters into device slots (enable_lora)."""
        if self.lora is not None:
            self.lora.activate([c.request for c in chunks])

    def lora_arrays(self, inp: StepInputs) -> LoRAArrays | None:
        """The device adapters for a call whose rows use some (else None)."""
        return None if inp.lora_slots is None else self.lora.arrays

    def _inputs(self, group: list[ScheduledChunk], t: int, width=None, lookahead: int = 0,
                decode: bool = False) -> tuple[StepInputs, int, int, int]:
        """Padded arrays for a group; width(c) is a row's token count (default c.num_tokens);
        the page table also covers `lookahead` further tokens (written by later fused steps).
        decode: the group is decode (or speculative) rows, which the "slots" grid pads to every
        sequence slot.

        Returns (inputs, top-N logprobs wanted, prompt top-N wanted, page-table width)."""
        width = width or (lambda c: c.num_tokens)
        # Rows on the shape_buckets grid ("fine": 4 sizes per doubling, at most 25% padding; "pow2":
        # powers of two; "slots": pow2, and decode calls have a row per sequence slot), so a bounded
        # number of programs. The page table: on the XLA path on CPU (`layers.attention_paged_ragged`
        # for decode and verification, `attention_paged_loop` for prefill chunks) attention reads only
        # as far as each row's (or the longest row's) length, so the table always has max_model_len's
        # width and context length never selects a program. Elsewhere (the Pallas kernel, KIVI keys,
        # and the XLA path off CPU, `layers.attention_reference`: all read every slot of the table)
        # its width is on the rows' grid: at least 256 tokens, at most max_model_len.
        b = self.slot_rows if decode and self.slot_rows else shape_bucket(len(group), 1, self.shape_buckets)
        if self.full_width_tables:
            pp = self.max_pages_per_seq
        else:
            n_pages = max(-(-(c.start + width(c) + lookahead) // self.page_size) for c in group)
            pp = min(shape_bucket(n_pages, -(-256 // self.page_size), self.shape_buckets), self.max_pages_per_seq)
        vocab = self.cfg.vocab_size
        tokens = np.zeros((b, t), np.int32)
        next_tokens = np.zeros((b, t), np.int32)
        page_table = np.zeros((b, pp), np.int32)
        kv_lens = np.zeros((b,), np.int32)
        q_lens = np.zeros((b,), np.int32)
        counters = np.zeros((b,), np.int32)
        temperature = np.zeros((b,), np.float32)
        top_k = np.zeros((b,), np.int32)
        top_p = np.ones((b,), np.float32)
        min_p = np.zeros((b,), np.float32)
        keys = np.zeros((b, 2), np.uint32)
        min_tokens = np.zeros((b,), np.int32)
        stop_w = max(1, max(len(c.request.stop_ids) for c in group))
        stop_ids = np.full((b, stop_w), vocab, np.int32)
        slots = np.full((b,), 1 << 30, np.int32)
        feed = np.zeros((b,), np.int32) if self.sampled is not None else None
        num_lp, num_plp = -1, -1
        for i, c in enumerate(group):
            r, p = c.request, c.request.params
            all_tokens = r.all_tokens
            known = all_tokens[c.start:c.start + c.num_tokens]
            tokens[i, :len(known)] = known
            if len(known) < c.num_tokens:  # async scheduling: the token sampled last step, still on device
                assert feed is not None and c.num_tokens == 1 and c.start == len(all_tokens), \
                    "only a decode row starts from a token in flight"
                feed[i] = 1
            if r.wants_prompt_logprobs and c.start < len(r.prompt_ids):
                nxt = all_tokens[c.start + 1:c.start + c.num_tokens + 1]
                next_tokens[i, :len(nxt)] = nxt
                num_plp = max(num_plp, p.prompt_logprobs)
            page_table[i, :len(r.pages)] = r.pages[:pp]
            kv_lens[i] = c.start + width(c)
            q_lens[i] = width(c)
            counters[i] = r.num_outputs
            temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
            top_k[i] = 0 if p.top_k in (-1, 0) or p.top_k >= vocab else p.top_k
            keys[i] = r.key_data
            min_tokens[i] = p.min_tokens
            stop_ids[i, :len(r.stop_ids)] = r.stop_ids
            slots[i] = r.slot
            if p.logprobs is not None and c.completes:
                num_lp = max(num_lp, p.logprobs)
        # Host (numpy) arrays: the jitted call transfers them in its C++ dispatch. (One jnp.asarray
        # per array took ~0.17 ms each while the previous call kept both cores busy; the transfers
        # cost about the same inside the call, and serving throughput did not change in an A/B.)
        st = SamplingTensors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, keys=keys)
        limits = RowLimits(max_tokens=np.zeros((b,), np.int32), min_tokens=min_tokens, stop_ids=stop_ids)
        pen = None
        if any(c.request.params.shapes_logits for c in group):
            pen = PenaltyInputs.from_rows([c.request.params for c in group], [c.request.prompt_ids for c in group],
                                          [c.request.output_ids for c in group], vocab, b,
                                          [c.request.bad_words_ids for c in group], [c.request.fsm for c in group],
                                          [c.request.fsm_state for c in group])
        lora_slots = None  # a call without adapter rows runs the base model's program
        if self.lora is not None and any(c.request.lora_id for c in group):
            lora_slots = np.zeros((b,), np.int32)
            for i, c in enumerate(group):
                lora_slots[i] = self.lora.slot_of(c.request.lora_id)
        inp = StepInputs(tokens, page_table, kv_lens, q_lens, counters, st, limits, next_tokens, slots, pen,
                         lora_slots, feed)
        return inp, num_lp, num_plp, pp

    def execute_multi(self, chunks: list[ScheduledChunk], num_steps: int) -> dict:
        """num_steps fused decode steps for decode-only chunks (pages for them already granted).

        Returns {request: (tokens, logprob dicts, 0)} with up to num_steps tokens per row."""
        self._activate_adapters(chunks)
        inp, num_lp, _, pp = self._inputs(chunks, 1, lookahead=num_steps - 1, decode=True)
        steps_left = np.zeros((inp.tokens.shape[0],), np.int32)
        for i, c in enumerate(chunks):
            steps_left[i] = min(num_steps, c.request.max_tokens - len(c.request.output_ids))
        statics = StepStatics(num_lp, -1, self.backend, _all_greedy(inp))
        self.signatures.add(("multi", inp.tokens.shape, pp, statics, num_steps, inp.penalty_shapes(),
                             inp.lora_slots is not None))
        self.kv, toks, live, lp = multi_decode_step(self.weights, self.cfg, statics, self.kv, inp, steps_left,
                                                    num_steps=num_steps, lora=self.lora_arrays(inp))
        toks, live, lp = jax.device_get((toks, live, lp))
        results = {}
        for i, c in enumerate(chunks):
            r, n = c.request, int(live[:, i].sum())
            tokens = [int(x) for x in toks[:n, i]]
            results[r] = (tokens, [self._logprob_entry(r, t, lp, j, i) for j, t in enumerate(tokens)], 0)
        return results

    def _logprob_entry(self, r, token: int, lp, i: int, j: int | None = None):
        if lp is None or r.params.logprobs is None:
            return None
        n = r.params.logprobs
        at = (i,) if j is None else (i, j)
        return position_logprobs(token, lp[0][at], lp[1][at], lp[2][at][:n], lp[3][at][:n], self.decode_token)

    def _launch(self, group: list[ScheduledChunk], t: int) -> tuple:
        """Dispatch one engine_step over the group's rows, each padded to t tokens; returns its
        (device) sampled tokens and logprob extras without waiting for them."""
        inp, num_lp, num_plp, pp = self._inputs(group, t, decode=t == 1)  # prefill calls have >= 16
        statics = StepStatics(num_lp, num_plp, self.backend, _all_greedy(inp))
        self.signatures.add(("step", inp.tokens.shape, pp, statics, inp.penalty_shapes(),
                             inp.lora_slots is not None))
        self.kv, self.draft_cache, tok, lp, plp, self.sampled = engine_step(
            self.weights, self.cfg, statics, self.kv, inp, self.draft, self.draft_params, self.draft_cache,
            self.lora_arrays(inp), self.sampled)
        return tok, lp, plp

    def _collect(self, group: list[ScheduledChunk], completes: list[bool], out: tuple) -> dict:
        """Fetch a launched call's results; record prompt logprobs; {request: (tokens, logprobs, 0)}
        for the rows that sample (completes)."""
        tok, lp, plp = jax.device_get(out)
        results = {}
        for i, c in enumerate(group):
            r = c.request
            if plp is not None and r.wants_prompt_logprobs:
                self._record_prompt_logprobs(c, plp, i)
            if completes[i]:
                results[r] = ([int(tok[i])], [self._logprob_entry(r, int(tok[i]), lp, i)], 0)
        return results

    def _run_spec(self, group: list[ScheduledChunk], proposals: list[np.ndarray] | None = None) -> dict:
        """Verify k drafts per row: the n-gram proposals given (one per row), or, without
        them, those drafted on device (draft model, layer skip, EAGLE, Medusa)."""
        k = group[0].num_draft
        inp, num_lp, _, pp = self._inputs(group, k + 1, width=lambda c: 1 + c.num_draft, decode=True)
        prev = np.zeros((inp.tokens.shape[0],), np.int32)
        if proposals is not None:
            for i, d in enumerate(proposals):  # inp.tokens is a host array
                inp.tokens[i, 1:] = d
        else:
            for i, c in enumerate(group):
                prev[i] = c.request.all_tokens[c.start - 1]
        statics = StepStatics(num_lp, -1, self.backend, _all_greedy(inp))
        lookup = proposals is not None
        self.signatures.add(("spec", inp.tokens.shape, pp, statics, inp.penalty_shapes(),
                             inp.lora_slots is not None, lookup))
        self.kv, self.draft_cache, drafts, n_acc, nxt, lp = spec_step(
            self.weights, self.cfg, statics, self.kv, inp, prev, self.draft, self.draft_params, self.draft_cache,
            k=k, lora=self.lora_arrays(inp), lookup=lookup)
        drafts, n_acc, nxt, lp = jax.device_get((drafts, n_acc, nxt, lp))
        results = {}
        for i, c in enumerate(group):
            r, n = c.request, int(n_acc[i])
            toks = [int(x) for x in drafts[i, :n]] + [int(nxt[i])]
            entries = [self._logprob_entry(r, t, lp, i, j) for j, t in enumerate(toks)]
            results[r] = (toks, entries, int(np.sum(drafts[i] >= 0)))  # drafted tokens, for the stats
        return results

    def _record_prompt_logprobs(self, c: ScheduledChunk, plp, i: int):
        r = c.request
        n = r.params.prompt_logprobs
        lp, rank, top_ids, top_lp = plp
        for j in range(c.num_tokens):
            pos = c.start + j + 1  # the prompt token predicted at this position
            if pos >= len(r.prompt_ids) or pos < len(r.prompt_logprobs):
                continue
            r.prompt_logprobs.append(position_logprobs(r.prompt_ids[pos], lp[i, j], rank[i, j],
                                                       top_ids[i, j, :n], top_lp[i, j, :n], self.decode_token))


@jax.jit
def _take_pages(caches, idx: jax.Array):
    return jax.tree_util.tree_map(lambda x: x[idx], caches)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_pages(caches, idx: jax.Array, data):
    return jax.tree_util.tree_map(lambda x, d: x.at[idx].set(d, mode="drop"), caches, data)


def _split(chunks: list[ScheduledChunk]):
    """A step's chunks as (speculative rows, plain decode rows, prefill chunks); a request admitted
    this step is a prefill chunk even with one token (it may read pages others write this step)."""
    spec = [c for c in chunks if c.num_draft]
    decodes = [c for c in chunks if c.num_tokens == 1 and not c.admitted and not c.num_draft]
    prefills = [c for c in chunks if (c.num_tokens > 1 or c.admitted) and not c.num_draft]
    return spec, decodes, prefills


def prefill_calls(chunks: list[ScheduledChunk], grid: str = "fine") -> list[list[ScheduledChunk]]:
    """Split a step's prefill chunks into calls of rows with similar lengths.

    Rows of one call are padded to its longest (bucketed) chunk, and on a CPU a padded token
    costs what a real one does (a prefill token of the embedded target ~0.14 ms, a call's
    fixed cost ~2 ms): one call over chunks of 40 and 460 tokens computed 2.3x the tokens it
    needed. Chunks are grouped by their bucket on `grid` (`shape_bucket`). Order matters
    where a chunk admitted with prefix-cache hits may read pages that an earlier chunk of
    this step writes (hashes are registered at scheduling): such a chunk starts a new round
    of calls, after every call holding an earlier chunk.
    """
    calls: list[list[ScheduledChunk]] = []
    by_len: dict[int, list[ScheduledChunk]] = {}
    for c in chunks:
        if c.admitted and c.start > 0 and by_len:  # reads cached pages: run after what came before
            calls += by_len.values()
            by_len = {}
        by_len.setdefault(shape_bucket(c.num_tokens, 16, grid), []).append(c)
    return calls + list(by_len.values())


def ngram_propose(tokens: list[int], k: int, n_min: int, n_max: int, scale: int | None = None) -> np.ndarray | None:
    """Prompt lookup: the k tokens that followed the most recent earlier occurrence of the
    last n tokens (n from n_max down to n_min), padded with the last of them when fewer
    follow; None without a match. scale: a match of n tokens proposes only
    `drafters.lookup_lengths(k, n_max, scale)[n]` of them (`prompt_lookup_scale`)."""
    seq = np.asarray(tokens, np.int64)
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        suffix = seq[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # starts 0 .. len-1-n
        hits = np.flatnonzero(np.all(windows == suffix, axis=1))
        if hits.size:
            follow = seq[hits[-1] + n:hits[-1] + n + k]
            follow = np.pad(follow, (0, k - len(follow)), mode="edge")  # a hit leaves >= 1 token after it
            return follow if scale is None else follow[:lookup_lengths(k, n_max, scale)[n]]
    return None
