"""ModelRunner: turns scheduled chunks into fixed-shape arrays and runs the jitted step.

Legend: B rows, T tokens per row, pp pages per row, V vocab, N top logprobs.

A step runs up to two calls of one jitted function over the paged cache (donated,
updated in place): the decode rows ([B, 1]) and the prefill chunks ([B, T]).
Keeping them apart keeps decode attention at one query per row instead of padding
every decode to the longest chunk. Shapes are bucketed (B, T and the page-table
width to powers of two) so a long run compiles a bounded number of programs;
`compilations` counts the distinct ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.engine.scheduler import ScheduledChunk
from jaxinfer.generate import bucket
from jaxinfer.kv.cache import AttentionMeta, KVCache
from jaxinfer.model import Weights, forward
from jaxinfer.outputs import position_logprobs
from jaxinfer.sampling import RowLimits, SamplingTensors, block_stop_tokens, sample, token_logprobs


@dataclasses.dataclass(frozen=True)
class StepStatics:
    num_logprobs: int = -1  # top-N logprobs of sampled tokens; -1: none
    num_prompt_logprobs: int = -1  # top-N logprobs of prompt tokens; -1: none
    backend: str = "xla"


@functools.partial(jax.jit, static_argnames=("cfg", "statics"), donate_argnames=("kv",))
def engine_step(weights: Weights, cfg: ModelConfig, statics: StepStatics, kv: KVCache,
                tokens: jax.Array, page_table: jax.Array, kv_lens: jax.Array, q_lens: jax.Array,
                st: SamplingTensors, counters: jax.Array, limits: RowLimits, next_tokens: jax.Array):
    """One forward over tokens [B, T] into the paged cache, then sample each row's next token.

    next_tokens [B, T]: the token following each position (for prompt logprobs only).
    Returns (kv, sampled [B], logprob extras or None, prompt-logprob extras or None).
    """
    b, t = tokens.shape
    meta = AttentionMeta(page_table=page_table, kv_lens=kv_lens, q_lens=q_lens)
    positions = meta.query_positions(t)
    last = jnp.maximum(q_lens - 1, 0)[:, None]  # [B, 1]
    want_plp = statics.num_prompt_logprobs >= 0
    logits, _, kv = forward(weights, cfg, tokens, positions, kv, meta, backend=statics.backend,
                            logits_at=None if want_plp else last)
    plp = None
    if want_plp:
        plp = token_logprobs(logits, next_tokens, statics.num_prompt_logprobs)
        logits = jnp.take_along_axis(logits, last[:, :, None], axis=1)
    logits = block_stop_tokens(logits[:, 0], limits, counters)  # [B, V]
    tok = sample(logits, st, counters)
    lp = token_logprobs(logits, tok, statics.num_logprobs) if statics.num_logprobs >= 0 else None
    return kv, tok, lp, plp


class ModelRunner:
    """Owns the device state: weights, the paged KV cache, the compiled step."""

    def __init__(self, weights: Weights, cfg: ModelConfig, kv: KVCache, page_size: int,
                 max_pages_per_seq: int, backend: str = "xla", decode_token=None):
        self.weights, self.cfg, self.kv = weights, cfg, kv
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.backend = backend
        self.decode_token = decode_token
        self.signatures: set[tuple] = set()

    @property
    def compilations(self) -> int:
        return len(self.signatures)

    def execute(self, chunks: list[ScheduledChunk]) -> dict:
        """Run every chunk; returns {request: (token, logprobs dict | None)} for completing chunks,
        and writes prompt logprobs straight into the requests."""
        results = {}
        # Decodes first: they read only pages computed in earlier steps. Prefill chunks and
        # requests admitted this step run after, so any page another row fills this step
        # (a prefix-cache hit registered at scheduling) is written before they read it.
        decodes = [c for c in chunks if c.num_tokens == 1 and not c.admitted]
        prefills = [c for c in chunks if c.num_tokens > 1 or c.admitted]
        for group, min_t in ((decodes, 1), (prefills, 16)):
            if group:
                results.update(self._run_group(group, min_t))
        return results

    def _run_group(self, group: list[ScheduledChunk], min_t: int) -> dict:
        b = bucket(len(group), minimum=1)
        t = bucket(max(c.num_tokens for c in group), minimum=min_t)
        n_pages = max(-(-(c.start + c.num_tokens) // self.page_size) for c in group)
        # Page-table width: a power of two, at least 256 tokens' worth (few programs for short
        # contexts), at most the pages of max_model_len.
        pp = min(bucket(n_pages, minimum=-(-256 // self.page_size)), bucket(self.max_pages_per_seq, minimum=1))
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
        num_lp, num_plp = -1, -1
        for i, c in enumerate(group):
            r, p = c.request, c.request.params
            all_tokens = r.all_tokens
            tokens[i, :c.num_tokens] = all_tokens[c.start:c.start + c.num_tokens]
            if r.wants_prompt_logprobs and c.start < len(r.prompt_ids):
                nxt = all_tokens[c.start + 1:c.start + c.num_tokens + 1]
                next_tokens[i, :len(nxt)] = nxt
                num_plp = max(num_plp, p.prompt_logprobs)
            page_table[i, :len(r.pages)] = r.pages[:pp]
            kv_lens[i] = c.start + c.num_tokens
            q_lens[i] = c.num_tokens
            counters[i] = len(r.output_ids)
            temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
            top_k[i] = 0 if p.top_k in (-1, 0) or p.top_k >= vocab else p.top_k
            keys[i] = r.key_data
            min_tokens[i] = p.min_tokens
            stop_ids[i, :len(r.stop_ids)] = r.stop_ids
            if p.logprobs is not None and c.completes:
                num_lp = max(num_lp, p.logprobs)
        statics = StepStatics(num_lp, num_plp, self.backend)
        self.signatures.add((b, t, pp, statics))
        st = SamplingTensors(temperature=jnp.asarray(temperature), top_k=jnp.asarray(top_k),
                             top_p=jnp.asarray(top_p), min_p=jnp.asarray(min_p), keys=jnp.asarray(keys))
        limits = RowLimits(max_tokens=jnp.zeros((b,), jnp.int32), min_tokens=jnp.asarray(min_tokens),
                           stop_ids=jnp.asarray(stop_ids))
        self.kv, tok, lp, plp = engine_step(
            self.weights, self.cfg, statics, self.kv, jnp.asarray(tokens), jnp.asarray(page_table),
            jnp.asarray(kv_lens), jnp.asarray(q_lens), st, jnp.asarray(counters), limits,
            jnp.asarray(next_tokens))
        tok, lp, plp = jax.device_get((tok, lp, plp))

        results = {}
        for i, c in enumerate(group):
            r = c.request
            if plp is not None and r.wants_prompt_logprobs:
                self._record_prompt_logprobs(c, plp, i)
            if c.completes:
                entry = None
                if lp is not None and r.params.logprobs is not None:
                    n = r.params.logprobs
                    entry = position_logprobs(int(tok[i]), lp[0][i], lp[1][i], lp[2][i, :n], lp[3][i, :n],
                                              self.decode_token)
                results[r] = (int(tok[i]), entry)
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

