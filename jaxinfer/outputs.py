"""Result types, shaped like vLLM's offline API."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's logprobs: {token_id: Logprob}, the chosen token always included.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter seconds) and the derived vLLM serving metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2el(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1), as `vllm bench serve` defines it."""
        n = len(self.token_times)
        if n < 2 or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (n - 1)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive streamed tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


def position_logprobs(chosen: int, logprob: float, rank: int, top_ids, top_lps,
                      decode=None) -> PositionLogprobs:
    """{token: Logprob} for one position: the top alternatives plus the chosen token."""
    dec = decode or (lambda i: None)
    out = {int(t): Logprob(float(lp), r + 1, dec(int(t))) for r, (t, lp) in enumerate(zip(top_ids, top_lps))}
    if chosen not in out or out[chosen].rank != rank:
        out[int(chosen)] = Logprob(float(logprob), int(rank), dec(int(chosen)))
    return out


def perplexity(prompt_logprobs: list[PositionLogprobs | None], token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of token_ids under their prompt logprobs."""
    nll = [-pl[t].logprob for pl, t in zip(prompt_logprobs, token_ids) if pl is not None]
    return math.exp(sum(nll) / len(nll))
