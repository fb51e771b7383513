"""Static batching: the whole generation of a padded batch on device, batch after batch.

The fastest path for a uniform batch (one prefill, one `lax.while_loop`), and the
baseline that continuous batching is measured against. Rows are sorted by prompt
length and cut into batches; each batch runs `generate.prefill` + `generate.decode`
over a contiguous cache, then the host replays the tokens through each request's
stop logic (stop strings need the detokenized text).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import generate as gen
from jaxinfer.config import ModelConfig
from jaxinfer.engine.request import EngineRequest, Status
from jaxinfer.kv.cache import grow_contiguous
from jaxinfer.kv.quant import KVQuantSpec
from jaxinfer.model import Weights
from jaxinfer.outputs import position_logprobs
from jaxinfer.sampling import PenaltyInputs, SamplingTensors, row_limits


class StaticBatchGenerator:
    def __init__(self, weights: Weights, cfg: ModelConfig, max_model_len: int, backend: str = "xla",
                 decode_token=None, kv_quant: KVQuantSpec | None = None):
        self.weights, self.cfg = weights, cfg
        self.max_model_len = max_model_len
        self.backend = backend
        self.kv_quant = kv_quant
        self.decode_token = decode_token

    def run(self, seqs: list[EngineRequest], batch_size: int):
        """Generate every sequence (finished in place), batch_size rows at a time."""
        order = sorted(seqs, key=lambda s: len(s.prompt_ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            for state, plp in self.segments(rows, None):
                pass
            self.finish_rows(rows, state, plp)

    def _prepare(self, rows: list[EngineRequest]):
        b = gen.bucket(len(rows), minimum=1)
        lens = [len(r.prompt_ids) for r in rows]
        t = min(gen.fine_bucket(max(lens), minimum=16), gen.round_up(self.max_model_len, 16))
        s = min(gen.round_up(max(n + r.max_tokens for n, r in zip(lens, rows)), 64), self.max_model_len)
        if self.backend == "pallas":  # the Triton kernel takes power-of-two pages (here: one per row)
            s = gen.bucket(s)
        want_lp = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=-1)
        want_plp = max((r.params.prompt_logprobs for r in rows if r.wants_prompt_logprobs), default=-1)
        statics = gen.GenerateStatics(max_len=s, max_new=max(r.max_tokens for r in rows), num_logprobs=want_lp,
                                      num_prompt_logprobs=want_plp, backend=self.backend,
                                      kv_quant=self.kv_quant, greedy=all(r.params.greedy for r in rows))
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :lens[i]] = r.prompt_ids
        pad = b - len(rows)
        params = [r.params for r in rows] + [rows[0].params] * pad
        st = SamplingTensors.from_params(params, [r.seed for r in rows] + [0] * pad, self.cfg.vocab_size,
                                         [r.sample_index for r in rows] + [0] * pad)
        limits = row_limits([r.max_tokens for r in rows] + [1] * pad, [p.min_tokens for p in params],
                            [r.stop_ids for r in rows] + [[]] * pad, self.cfg.vocab_size)
        pen = None
        if any(r.params.shapes_logits for r in rows):
            pen = PenaltyInputs.from_rows([r.params for r in rows], [r.prompt_ids for r in rows],
                                          [r.output_ids for r in rows], self.cfg.vocab_size, b,
                                          [r.bad_words_ids for r in rows], [r.fsm for r in rows],
                                          [r.fsm_state for r in rows])
        return statics, jnp.asarray(tokens), jnp.asarray(lens + [0] * pad, jnp.int32), st, limits, pen

    def segments(self, rows: list[EngineRequest], segment: int | None) -> Iterator:
        """Prefill, then decode `segment` steps at a time (None: as far as the cache allows);
        yields (state, prompt_lp).

        The contiguous cache starts at the longest prompt (rounded up to 64 slots) and
        doubles, up to statics.max_len, whenever the rows would outgrow it: attention reads
        every slot each step, so a cache sized for the end of generation would make every
        early step pay for it. Each cache length is its own (cached) decode program."""
        statics, tokens, prompt_lens, st, limits, pen = self._prepare(rows)
        now = time.perf_counter()
        for r in rows:
            r.metrics.first_scheduled_time = now
        full = statics.max_len
        window = gen.first_cache_window(max(len(r.prompt_ids) for r in rows), full, self.backend)
        statics = dataclasses.replace(statics, max_len=window)
        state, prompt_lp = gen.prefill(self.weights, self.cfg, statics, tokens, prompt_lens, st, limits, pen)
        yield state, prompt_lp
        while bool(jnp.any(state.finish == gen.RUNNING)):
            fits = window - int(jnp.max(jnp.where(state.finish == gen.RUNNING, state.kv_lens, 0)))
            if fits <= 0:  # every running row's next token needs a slot: grow the cache
                window = min(full, 2 * window)
                statics = dataclasses.replace(statics, max_len=window)
                state = state.replace(kv=grow_contiguous(state.kv, window))
                continue
            steps = fits if segment is None else min(fits, segment)
            state = gen.decode(self.weights, self.cfg, statics, state, st, limits, jnp.int32(steps))
            yield state, prompt_lp

    def finish_rows(self, rows: list[EngineRequest], state, prompt_lp):
        """Replay each row's tokens through its request (stop strings, logprobs, finish)."""
        now = time.perf_counter()
        host = jax.device_get({"n": state.num_generated, "tok": state.out_tokens, "lp": state.out_logprobs,
                               "rank": state.out_ranks, "top_ids": state.out_top_ids,
                               "top_lp": state.out_top_logprobs, "plp": prompt_lp})
        for i, r in enumerate(rows):
            if r.wants_prompt_logprobs:
                lp, rank, top_ids, top_lp = host["plp"]
                k = r.params.prompt_logprobs
                r.prompt_logprobs += [position_logprobs(t, lp[i, j], rank[i, j], top_ids[i, j, :k],
                                                        top_lp[i, j, :k], self.decode_token)
                                      for j, t in enumerate(r.prompt_ids[1:])]
            self.replay(r, host, i, int(host["n"][i]), now)

    def replay(self, r: EngineRequest, host, i: int, n: int, now: float):
        k = r.params.logprobs
        for j in range(len(r.output_ids), n):
            t = int(host["tok"][i, j])
            entry = None
            if k is not None:
                entry = position_logprobs(t, host["lp"][i, j], host["rank"][i, j], host["top_ids"][i, j, :k],
                                          host["top_lp"][i, j, :k], self.decode_token)
            if r.append_token(t, entry, now):
                r.finish(now=now)
                return
        if n >= r.max_tokens and r.status is not Status.FINISHED:
            r.finish("length", now)
