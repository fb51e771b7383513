"""Engine statistics and `vllm bench serve`-style summaries of request metrics."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.outputs import RequestOutput

PERCENTILES = (50, 90, 95, 99)


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of pages in use (cached-but-unreferenced pages count as free)
    num_pages: int
    num_free_pages: int
    num_cached_pages: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    compilations: int
    num_steps: int  # engine steps (schedule, one device call per group of rows, outputs)
    num_prompt_tokens_computed: int
    num_generated_tokens: int
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_steps: int = 0  # speculative row-steps (one target forward over k + 1 positions each)
    num_fused_steps: int = 0  # decode steps run inside fused multi-step calls (num_scheduler_steps > 1)
    num_tokens_computed: int = 0  # tokens run through the model: prompts, outputs fed back, recomputation
    num_swapped_out: int = 0  # preemptions by swap (preemption_mode="swap"); the rest recompute
    num_lora_loads: int = 0  # LoRA adapters written into a device slot (enable_lora)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_drafted_tokens if self.spec_drafted_tokens else 0.0

    @property
    def spec_mean_tokens_per_step(self) -> float:
        """tau: tokens emitted per speculative row-step (accepted drafts + the bonus/corrected one)."""
        return (self.spec_accepted_tokens + self.spec_steps) / self.spec_steps if self.spec_steps else 0.0


def distribution(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """mean / median / p90 / p95 / p99 in milliseconds (scale 1e3)."""
    if not values:
        return {k: float("nan") for k in ("mean", "median", *(f"p{p}" for p in PERCENTILES[1:]))}
    a = np.asarray(values) * scale
    out = {"mean": float(a.mean()), "median": float(np.median(a))}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES[1:]})
    return out


def summarize(outputs: list[RequestOutput], duration: float) -> dict:
    """Serving summary with vLLM's definitions.

    TTFT = first token - arrival; TPOT = (E2EL - TTFT) / (output tokens - 1) per request;
    ITL = every gap between consecutive tokens of a request; E2EL = finish - arrival.
    """
    ttft, tpot, itl, e2el = [], [], [], []
    n_out = n_in = 0
    for o in outputs:
        for comp in o.outputs:
            n_out += len(comp.token_ids)
        n_in += len(o.prompt_token_ids)
        m = o.metrics
        if m is None:
            continue
        if m.ttft is not None:
            ttft.append(m.ttft)
        if m.tpot is not None:
            tpot.append(m.tpot)
        itl += m.itl
        if m.e2el is not None:
            e2el.append(m.e2el)
    return {
        "num_requests": len(outputs), "duration_s": duration,
        "request_throughput": len(outputs) / duration,
        "output_throughput": n_out / duration, "total_token_throughput": (n_in + n_out) / duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "ttft_ms": distribution(ttft), "tpot_ms": distribution(tpot), "itl_ms": distribution(itl),
        "e2el_ms": distribution(e2el),
    }


def format_summary(s: dict) -> str:
    lines = [f"requests {s['num_requests']}  duration {s['duration_s']:.2f}s  "
             f"req/s {s['request_throughput']:.2f}  out tok/s {s['output_throughput']:.1f}  "
             f"total tok/s {s['total_token_throughput']:.1f}"]
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = s[k]
        lines.append(f"  {k[:-3].upper():5s} ms  mean {d['mean']:8.1f}  median {d['median']:8.1f}  "
                     f"p90 {d['p90']:8.1f}  p95 {d['p95']:8.1f}  p99 {d['p99']:8.1f}")
    return "\n".join(lines)
