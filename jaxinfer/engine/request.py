"""A request's life in the engine: tokens, pages, progress, stop checks, outputs."""

from __future__ import annotations

import enum
import time

from jaxinfer.kv.allocator import PageKey, page_keys
from jaxinfer.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from jaxinfer.sampling import SamplingParams, request_key
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class EngineRequest:
    """One sequence (one sample of a prompt) scheduled by the engine.

    all_tokens = prompt + output. num_computed tokens already have K/V in `pages`;
    the next step computes all_tokens[num_computed:] (a whole prompt, a chunk of
    it, or the one token sampled last step) and samples a token when it reaches
    the end. With async scheduling, num_inflight tokens were sampled by a step the host has
    dispatched but not read back: they count in num_tokens (the next step feeds the last of
    them from the device) but are not in output_ids yet. Preemption drops the pages and resets
    num_computed to 0 (recompute), or keeps num_computed and their K/V on the host until it
    resumes (swap).
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 seed: int, sample_index: int, stop_ids: list[int], max_tokens: int,
                 tokenizer: Tokenizer | None, arrival: float | None = None,
                 bad_words_ids: list[list[int]] | None = None, fsm=None, lora_request=None,
                 priority: int = 0, order: int = 0):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = seed
        self.sample_index = sample_index
        self.key_data = request_key(seed, sample_index)  # PRNG stream of this sample
        self.stop_ids = stop_ids
        self.bad_words_ids = bad_words_ids or []  # token sequences the output must not contain
        self.fsm = fsm  # structured.TokenFSM of params.structured_outputs (None: unconstrained)
        self.fsm_state = 0  # fsm's state after output_ids, advanced as tokens are appended
        self.lora_request = lora_request  # lora.LoRARequest or None
        self.priority = priority  # scheduling_policy="priority": lower values are served first
        self.order = order  # the engine's count of requests before this one (ties of arrival time)
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] = []
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[PositionLogprobs | None] = [None]
        self.pages: list[int] = []
        self.slot: int | None = None  # per-sequence device slot while running (scheduler)
        self.num_computed = 0
        self.num_inflight = 0  # sampled on device, not read back yet (async scheduling)
        self.num_cached_tokens = 0
        self.page_keys: list[PageKey] = []  # keys of this request's full pages, in order
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # preemption_mode='swap': K/V of the computed tokens held on the host while preempted
        self.swapped = False
        self.swapped_kv = None
        self.metrics = RequestMetrics(arrival_time=arrival if arrival is not None else time.perf_counter(),
                                      num_prompt_tokens=len(prompt_ids))
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens) \
            if tokenizer is not None else None
        self.text = ""
        self._sent_text = 0
        self._sent_tokens = 0

    # ------------------------------------------------------------------ progress

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_known(self) -> int:
        """Prompt and output tokens the host holds (len(all_tokens))."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, the ones still in flight included."""
        return self.num_known + self.num_inflight

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, the ones still in flight included."""
        return len(self.output_ids) + self.num_inflight

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V the next step must compute."""
        return self.num_tokens - self.num_computed

    @property
    def urgency(self) -> tuple:
        """The priority scheduler's order: priority, then arrival, then submission."""
        return self.priority, self.metrics.arrival_time, self.order, self.sample_index

    @property
    def lora_id(self) -> int:
        """The adapter's lora_int_id (0: none)."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def full_page_keys(self, page_size: int, extra) -> list[PageKey]:
        """Keys of every full page of all_tokens (extends the cached list incrementally). An
        adapter's id is part of the key: K/V computed under it serve only requests with it."""
        if self.lora_id:
            extra = (extra, "lora", self.lora_id)
        n_full = self.num_known // page_size
        if len(self.page_keys) < n_full:
            parent = self.page_keys[-1] if self.page_keys else None
            self.page_keys += page_keys(self.all_tokens[:n_full * page_size], page_size, extra, parent,
                                        start_page=len(self.page_keys))
        return self.page_keys[:n_full]

    # ------------------------------------------------------------------ outputs

    def append_token(self, token: int, logprob: PositionLogprobs | None, now: float) -> bool:
        """Record a sampled token; returns True when the request is finished."""
        self.output_ids.append(token)
        self.num_inflight = max(0, self.num_inflight - 1)
        if self.fsm is not None:
            self.fsm_state = self.fsm.step(self.fsm_state, token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.cumulative_logprob += logprob[token].logprob
        m = self.metrics
        m.token_times.append(now)
        if m.first_token_time is None:
            m.first_token_time = now
        n = len(self.output_ids)
        if token in self.stop_ids and n >= self.params.min_tokens:
            self.finish_reason, self.stop_reason = "stop", token
            if self.params.include_stop_str_in_output:
                self._detokenize(token)
            return True
        if self._detokenize(token):
            return True
        if n >= self.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def _detokenize(self, token: int) -> bool:
        """Extend the text; True if a stop string ended it."""
        if self._detok is None:
            return False
        delta = self._detok.add(token)
        stops = self.params.stop
        if stops and delta:
            hit = find_stop(self._detok.text, stops, len(delta))
            if hit is not None and len(self.output_ids) >= self.params.min_tokens:
                start, s = hit
                self._detok.text = self._detok.text[:start + (len(s) if self.params.include_stop_str_in_output
                                                               else 0)]
                self.text = self._detok.text
                self.finish_reason, self.stop_reason = "stop", s
                return True
        self.text = self._detok.text
        return False

    def finish(self, reason: str | None = None, now: float | None = None):
        if reason is not None:
            self.finish_reason = reason
        self.status = Status.FINISHED
        self.metrics.finished_time = now if now is not None else time.perf_counter()
        if self._detok is not None and self.finish_reason == "length":
            self._detok.flush()
            self.text = self._detok.text

    def visible_text(self) -> str:
        """Text safe to stream: a tail that might begin a stop string is held back."""
        if self.status is Status.FINISHED or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[:max(self._sent_text, len(self.text) - hold)]

    def completion(self, delta: bool = False) -> CompletionOutput:
        text = self.visible_text()
        tokens = self.output_ids
        lps = self.logprobs if self.params.logprobs is not None else None
        if delta:
            text, tokens = text[self._sent_text:], tokens[self._sent_tokens:]
            lps = lps[self._sent_tokens:] if lps is not None else None
            self._sent_text += len(text)
            self._sent_tokens += len(tokens)
        return CompletionOutput(
            index=self.sample_index, text=text, token_ids=list(tokens),
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
            logprobs=lps, finish_reason=self.finish_reason if self.status is Status.FINISHED else None,
            stop_reason=self.stop_reason)

    def to_output(self, delta: bool = False) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
            prompt_logprobs=self.prompt_logprobs if self.wants_prompt_logprobs else None,
            outputs=[self.completion(delta)], finished=self.status is Status.FINISHED,
            metrics=self.metrics, num_cached_tokens=self.num_cached_tokens)


__all__ = ["EngineRequest", "Status", "Logprob"]
