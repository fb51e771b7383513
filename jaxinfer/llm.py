"""LLM: the offline entry point, following vLLM's `LLM` / `SamplingParams` API."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import generate as gen
from jaxinfer.checkpoint import CheckpointError, load_hf
from jaxinfer.config import ModelConfig
from jaxinfer.layers import ATTENTION_BACKENDS
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput, position_logprobs
from jaxinfer.sampling import SamplingParams, SamplingTensors
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

ASSETS = Path(__file__).parent / "assets" / "models"
DEFAULT_MODEL = "stdlib-target"
_FINISH = {gen.STOPPED: "stop", gen.LENGTH: "length"}


def resolve_model(model: str | None) -> Path:
    """A model directory from a path or the name of an embedded model."""
    name = model or DEFAULT_MODEL
    embedded = ASSETS / name
    if (embedded / "config.json").is_file():
        return embedded
    path = Path(name).expanduser()
    if path.exists():
        return path
    names = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []
    raise CheckpointError(
        f"model {name!r}: no such directory, and not an embedded model "
        f"(embedded: {', '.join(names) or 'none'})")


def default_dtype(requested: str) -> str:
    """'auto' is float32 on CPU (faster there than bf16) and bfloat16 on accelerators."""
    if requested == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return requested


class Request:
    """One prompt with its parameters, as the generate paths see it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, seed: int, arrival: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.metrics = RequestMetrics(arrival_time=arrival, num_prompt_tokens=len(prompt_ids))


class LLM:
    """Load a model once, then generate for batches of prompts.

    >>> llm = LLM(model="path/to/hf_dir", dtype="float32")
    >>> outs = llm.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=32))
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 seed: int = 0, attention_backend: str = "xla", max_model_len: int | None = None,
                 max_num_seqs: int = 32):
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs!r} must be a positive integer")
        self.model_dir = resolve_model(model)
        self.dtype = default_dtype(dtype)
        self.cfg, self.weights = load_hf(self.model_dir, self.dtype)
        cfg = self.cfg
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if not (isinstance(self.max_model_len, int) and 1 < self.max_model_len <= cfg.max_position_embeddings):
            raise ValueError(f"max_model_len={max_model_len!r} must be in [2, {cfg.max_position_embeddings}] "
                             "(the model's max_position_embeddings)")
        tok_dir = Path(tokenizer) if tokenizer else self.model_dir
        self.tokenizer = Tokenizer.from_dir(tok_dir, cfg.bos_token_id, cfg.eos_token_ids)
        if tokenizer and self.tokenizer is None:
            raise CheckpointError(f"{tok_dir}: no tokenizer.json")
        self.backend = attention_backend
        self.max_num_seqs = max_num_seqs
        self._rng = random.Random(seed)
        self._counter = 0

    # ------------------------------------------------------------------ API

    def get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer.json; pass prompts as token ids")
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt: a string, {"prompt": str}, {"prompt_token_ids": [...]}, or a list."""
        requests = self._make_requests(prompts, sampling_params)
        rows = [(r, i) for r in requests for i in range(r.params.n)]
        rows.sort(key=lambda ri: len(ri[0].prompt_ids))
        results: dict[tuple[str, int], CompletionOutput] = {}
        prompt_lps: dict[str, list] = {}
        for start in range(0, len(rows), self.max_num_seqs):
            chunk = rows[start:start + self.max_num_seqs]
            for (req, idx), comp, plp in self._run_static_batch(chunk):
                results[(req.request_id, idx)] = comp
                if plp is not None:
                    prompt_lps[req.request_id] = plp
        return [RequestOutput(
            request_id=r.request_id, prompt=r.prompt, prompt_token_ids=r.prompt_ids,
            prompt_logprobs=prompt_lps.get(r.request_id),
            outputs=[results[(r.request_id, i)] for i in range(r.params.n)], finished=True,
            metrics=r.metrics) for r in requests]

    def stream(self, prompt, sampling_params: SamplingParams | None = None,
               segment: int = 4) -> Iterator[str]:
        """Yield the text of one request as it is generated (decode runs in segments)."""
        params = sampling_params or SamplingParams()
        (req,) = self._make_requests([prompt], [params])
        if params.n != 1:
            raise ValueError("stream() takes SamplingParams.n == 1")
        detok = IncrementalDetokenizer(self.get_tokenizer(), req.prompt_ids, params.skip_special_tokens)
        emitted, text_len, shown = 0, 0, 0
        for state, _ in self._decode_segments([(req, 0)], segment):
            n = int(state.num_generated[0])
            stopped_by_token = int(state.finish[0]) == gen.STOPPED
            for k, t in enumerate(np.asarray(state.out_tokens[0, emitted:n]), start=emitted):
                if stopped_by_token and k == n - 1 and not params.include_stop_str_in_output:
                    continue
                detok.add(int(t))
            emitted = n
            if int(state.finish[0]) != gen.RUNNING:
                detok.flush()
            hit = find_stop(detok.text, params.stop, len(detok.text) - text_len)
            text_len = len(detok.text)
            visible = detok.text
            if hit is not None:
                visible = detok.text[:hit[0] + (len(hit[1]) if params.include_stop_str_in_output else 0)]
            elif params.stop:  # hold back a possible stop-string prefix
                hold = max(len(s) for s in params.stop) - 1
                visible = detok.text[:max(shown, len(detok.text) - hold)]
                if int(state.finish[0]) != gen.RUNNING:
                    visible = detok.text
            if len(visible) > shown:
                yield visible[shown:]
                shown = len(visible)
            if hit is not None:
                return

    # ------------------------------------------------------------------ helpers

    def _make_requests(self, prompts, sampling_params) -> list[Request]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        now = time.perf_counter()
        requests = []
        for p, sp in zip(prompts, params_list):
            text, ids = self._prompt_ids(p)
            sp = self._checked_params(sp, len(ids))
            seed = sp.seed if sp.seed is not None else self._rng.getrandbits(31)
            requests.append(Request(str(self._counter), text, ids, sp, seed, now))
            self._counter += 1
        return requests

    def _prompt_ids(self, p) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            return p, self.get_tokenizer().encode(p)
        if isinstance(p, dict) and "prompt_token_ids" in p:
            ids = [int(t) for t in p["prompt_token_ids"]]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains {bad[0]}; token ids must be in "
                                 f"[0, {self.cfg.vocab_size})")
            return p.get("prompt"), ids
        if isinstance(p, dict) and "prompt" in p:
            return p["prompt"], self.get_tokenizer().encode(p["prompt"])
        raise ValueError(f"prompt {p!r}: expected a string, {{'prompt': str}} or {{'prompt_token_ids': list}}")

    def _checked_params(self, sp: SamplingParams, prompt_len: int) -> SamplingParams:
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        if prompt_len == 0:
            raise ValueError("prompt is empty (0 tokens)")
        if prompt_len >= self.max_model_len:
            raise ValueError(f"prompt has {prompt_len} tokens; max_model_len={self.max_model_len} "
                             f"leaves room for prompts of at most {self.max_model_len - 1}")
        sp.validate_vocab(self.cfg.vocab_size)
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        return sp

    def _stop_ids(self, p: SamplingParams) -> list[int]:
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids += [e for e in self.cfg.eos_token_ids if e not in ids]
        return ids

    def _prepare(self, rows: list[tuple[Request, int]]):
        """Device inputs and statics for one static batch of rows."""
        b = gen.bucket(len(rows), minimum=1)
        lens = [len(r.prompt_ids) for r, _ in rows]
        t = min(gen.bucket(max(lens)), gen.round_up(self.max_model_len, 16))
        max_tokens = [min(r.params.max_tokens or self.max_model_len, self.max_model_len - n)
                      for (r, _), n in zip(rows, lens)]
        s = min(gen.round_up(max(n + m for n, m in zip(lens, max_tokens)), 64), self.max_model_len)
        want_lp = max((r.params.logprobs for r, _ in rows if r.params.logprobs is not None), default=-1)
        want_plp = max((r.params.prompt_logprobs for r, _ in rows if r.params.prompt_logprobs is not None),
                       default=-1)
        statics = gen.GenerateStatics(max_len=s, max_new=max(max_tokens), num_logprobs=want_lp,
                                      num_prompt_logprobs=want_plp, backend=self.backend)
        tokens = np.zeros((b, t), np.int32)
        for i, n in enumerate(lens):
            tokens[i, :n] = rows[i][0].prompt_ids
        pad = b - len(rows)
        params = [r.params for r, _ in rows] + [SamplingParams(temperature=0)] * pad
        st = SamplingTensors.from_params(params, [r.seed for r, _ in rows] + [0] * pad,
                                         self.cfg.vocab_size, [i for _, i in rows] + [0] * pad)
        limits = gen.row_limits(max_tokens + [1] * pad, [p.min_tokens for p in params],
                                [self._stop_ids(p) for p in params], self.cfg.vocab_size)
        prompt_lens = jnp.asarray(lens + [0] * pad, jnp.int32)
        return statics, jnp.asarray(tokens), prompt_lens, st, limits

    def _decode_segments(self, rows, segment: int | None):
        """Prefill, then decode in segments of `segment` steps (None: all at once)."""
        statics, tokens, prompt_lens, st, limits = self._prepare(rows)
        for r, _ in rows:
            r.metrics.first_scheduled_time = time.perf_counter()
        state, prompt_lp = gen.prefill(self.weights, self.cfg, statics, tokens, prompt_lens, st, limits)
        yield state, prompt_lp
        steps = statics.max_new if segment is None else segment
        while bool(jnp.any(state.finish == gen.RUNNING)):
            state = gen.decode(self.weights, self.cfg, statics, state, st, limits, jnp.int32(steps))
            yield state, prompt_lp

    def _run_static_batch(self, rows):
        for state, prompt_lp in self._decode_segments(rows, None):
            pass
        now = time.perf_counter()
        host = jax.device_get({"n": state.num_generated, "finish": state.finish, "tok": state.out_tokens,
                               "lp": state.out_logprobs, "rank": state.out_ranks,
                               "top_ids": state.out_top_ids, "top_lp": state.out_top_logprobs,
                               "plp": prompt_lp})
        out = []
        for i, (req, idx) in enumerate(rows):
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.finished_time = now
            comp = self._completion(req, idx, host, i)
            req.metrics.token_times = [now] * len(comp.token_ids)
            plp = self._prompt_logprobs(req, host["plp"], i) if req.params.prompt_logprobs is not None else None
            out.append(((req, idx), comp, plp))
        return out

    def _decode_token(self, t: int) -> str | None:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer else None

    def _completion(self, req: Request, idx: int, host, i: int) -> CompletionOutput:
        p = req.params
        n = int(host["n"][i])
        ids = [int(t) for t in host["tok"][i, :n]]
        finish = _FINISH.get(int(host["finish"][i]), "length")
        stop_reason = ids[-1] if finish == "stop" else None
        text = ""
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, p.skip_special_tokens)
            # As in vLLM, a stop token (eos or stop_token_ids) is not detokenized.
            text_ids = ids[:-1] if finish == "stop" and not p.include_stop_str_in_output else ids
            for k, t in enumerate(text_ids):
                delta = detok.add(t)
                hit = find_stop(detok.text, p.stop, len(delta)) if p.stop and delta else None
                if hit is not None:
                    start, s = hit
                    ids = ids[:k + 1]
                    detok.text = detok.text[:start + (len(s) if p.include_stop_str_in_output else 0)]
                    finish, stop_reason = "stop", s
                    break
            else:
                detok.flush()
            text = detok.text
        logprobs, cum = None, None
        if p.logprobs is not None:
            lps = host["lp"][i, :len(ids)]
            cum = float(np.sum(lps))
            logprobs = [position_logprobs(t, host["lp"][i, k], host["rank"][i, k],
                                          host["top_ids"][i, k, :p.logprobs],
                                          host["top_lp"][i, k, :p.logprobs], self._decode_token)
                        for k, t in enumerate(ids)]
        return CompletionOutput(index=idx, text=text, token_ids=ids, cumulative_logprob=cum,
                                logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)

    def _prompt_logprobs(self, req: Request, plp, i: int):
        lp, rank, top_ids, top_lp = plp
        k = req.params.prompt_logprobs
        out: list = [None]
        for j, t in enumerate(req.prompt_ids[1:]):
            out.append(position_logprobs(t, lp[i, j], rank[i, j], top_ids[i, j, :k], top_lp[i, j, :k],
                                         self._decode_token))
        return out


__all__ = ["LLM", "ModelConfig", "resolve_model"]
