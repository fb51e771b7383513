"""LLMEngine: add requests, step, stream outputs. Plain Python around one jitted step.

    engine = LLMEngine(cfg, weights, tokenizer, EngineConfig(...))
    engine.add_request("r0", "def add(a, b):", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            ...
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.engine.drafting import DraftSpec, init_cache
from jaxinfer.engine.inputs import InputProcessor
from jaxinfer.engine.metrics import EngineStats
from jaxinfer.engine.request import EngineRequest, Status
from jaxinfer.engine.runner import ModelRunner
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.generate import SHAPE_BUCKETS
from jaxinfer.kv.allocator import PageAllocator
from jaxinfer.kv.cache import init_paged
from jaxinfer.kv.kivi import KIVI_KEY_GROUP
from jaxinfer.kv.quant import KVQuantSpec, page_bytes_per_token
from jaxinfer.lora import LoRAManager, LoRARequest
from jaxinfer.model import Weights
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling import SamplingParams, is_int
from jaxinfer.tokenizer import Tokenizer

DEFAULT_KV_CACHE_MEMORY_BYTES = 512 << 20
KV_CACHE_MEMORY_ENV = "JAXINFER_KV_CACHE_MEMORY_BYTES"  # the default budget, as VLLM_CPU_KVCACHE_SPACE sets vLLM's
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority")


def default_kv_cache_memory_bytes() -> int:
    """The KV pool an engine takes when given neither num_kv_pages nor kv_cache_memory_bytes:
    $JAXINFER_KV_CACHE_MEMORY_BYTES (a positive integer number of bytes) if set, else 512 MiB.
    Raises ValueError naming the variable when its value is not a positive integer."""
    env = os.environ.get(KV_CACHE_MEMORY_ENV, "").strip()
    if not env:
        return DEFAULT_KV_CACHE_MEMORY_BYTES
    try:
        value = int(env)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{KV_CACHE_MEMORY_ENV}={env!r} must be a positive integer number of bytes")
    return value


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine options; names follow vLLM's engine arguments."""

    max_model_len: int
    block_size: int = 16
    num_kv_pages: int | None = None
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    attention_backend: str = "xla"
    kv_cache_dtype: str = "auto"
    speculative_config: object = None  # spec.config.SpeculativeConfig (any method)
    num_scheduler_steps: int = 1  # decode steps fused into one device call when only decodes run
    preemption_mode: str = "recompute"  # or "swap": a preempted request's K/V waits on the host
    swap_space: float = 4.0  # GiB of host memory for swapped K/V (vLLM's name); beyond it: recompute
    lora_config: object = None  # lora.LoRAConfig (enable_lora) or None
    scheduling_policy: str = "fcfs"  # or "priority": requests' priority values (lower first) order the queues
    # schedule and dispatch each step before reading back the one before (vLLM's async_scheduling)
    async_scheduling: bool = False
    # the grid that an engine call's rows, prefill tokens and page-table width are padded to: "fine"
    # (4 sizes per doubling: at most 25% padding) or "pow2" (powers of two: about half the compiled
    # programs, up to 2x padding; where a padded row costs little, or warm-up matters more) or
    # "slots" (pow2, and every decode, fused-decode and speculative call has max_num_seqs rows: one
    # decode program, as a fixed set of decode slots has; where a padded decode row costs little)
    shape_buckets: str = "fine"

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_scheduler_steps"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.num_kv_pages is not None and (not is_int(self.num_kv_pages) or self.num_kv_pages < 1):
            raise ValueError(f"num_kv_pages={self.num_kv_pages!r} must be a positive integer (or None)")
        b = self.kv_cache_memory_bytes
        if b is not None:  # a byte count; 0.5e9 reads as one
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 1:
                raise ValueError(f"kv_cache_memory_bytes={b!r} must be a positive number of bytes (or None)")
            object.__setattr__(self, "kv_cache_memory_bytes", int(b))
        for name in ("enable_prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.async_scheduling and self.speculative_config is not None:
            raise ValueError("async_scheduling=True cannot be combined with speculative_config: a speculative "
                             "step's accepted tokens decide what the next step computes")
        if self.async_scheduling and self.num_scheduler_steps > 1:
            raise ValueError(f"async_scheduling=True and num_scheduler_steps={self.num_scheduler_steps} are two ways "
                             "to hide the host's work between steps; choose one")
        if self.num_scheduler_steps > 1 and self.speculative_config is not None:
            raise ValueError(f"num_scheduler_steps={self.num_scheduler_steps} fuses plain decode steps; it cannot "
                             "be combined with speculative_config (use num_scheduler_steps=1)")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r}; choose one of {SCHEDULING_POLICIES}")
        if self.shape_buckets not in SHAPE_BUCKETS:
            raise ValueError(f"shape_buckets={self.shape_buckets!r}; choose one of {SHAPE_BUCKETS}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={self.preemption_mode!r}; choose one of {PREEMPTION_MODES}")
        if not (isinstance(self.swap_space, (int, float)) and self.swap_space >= 0):
            raise ValueError(f"swap_space={self.swap_space!r} must be a number of GiB >= 0")
        if self.preemption_mode == "swap" and self.kv_cache_dtype == "int4_kivi":
            raise ValueError("preemption_mode='swap' copies pages; kv_cache_dtype='int4_kivi' also keeps per-sequence "
                             "residual keys outside them (use preemption_mode='recompute')")
        if self.num_kv_pages is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError("give num_kv_pages or kv_cache_memory_bytes, not both")


def kv_bytes_per_page(cfg: ModelConfig, block_size: int, itemsize: int, quant: KVQuantSpec | None = None) -> int:
    """K and V of every layer for one page of tokens (codes and scales for quantized KV)."""
    per_token = page_bytes_per_token(quant, cfg.head_dim, itemsize)
    return int(2 * cfg.num_layers * cfg.num_kv_heads * per_token * block_size)


def _load_draft(spec, cfg: ModelConfig, dtype, weights: Weights | None = None) -> tuple[DraftSpec | None, object]:
    """How the engine drafts on device for speculative_config, and the draft's params (a draft
    model's weights, a head's params; layer skip: None). (None, None) for n-gram or no speculation."""
    if spec is None or spec.method == "ngram":
        return None, None
    from jaxinfer.spec.config import build_drafter
    drafter, params = build_drafter(spec, cfg, dtype, target=weights)  # loads and checks the draft model or head
    method = "draft_model" if spec.method == "ngram_draft_model" else spec.method
    return DraftSpec(method, drafter.cfg, getattr(drafter, "num_layers", 0)), params


class LLMEngine:
    def __init__(self, cfg: ModelConfig, weights: Weights, tokenizer: Tokenizer | None,
                 config: EngineConfig, model_id: str = ""):
        self.cfg, self.config, self.tokenizer = cfg, config, tokenizer
        dtype = weights.dtype
        itemsize = jnp.dtype(dtype).itemsize
        bs = config.block_size
        self.kv_quant = KVQuantSpec.parse(config.kv_cache_dtype, cfg.head_dim)
        spec = config.speculative_config
        draft, draft_params = _load_draft(spec, cfg, dtype, weights)
        # One page holds block_size tokens of K and V for every layer, and the draft's state for
        # them (a draft model's K/V, a head's features): its pages mirror the target's, same
        # ids, same page tables.
        page_bytes = kv_bytes_per_page(cfg, bs, itemsize, self.kv_quant)
        if draft is not None:
            page_bytes += draft.bytes_per_page(cfg, bs, itemsize)
        # KIVI keeps one full-precision residual key group per running sequence, beside the pages.
        resid_bytes = 0
        if self.kv_quant is not None and self.kv_quant.kivi:
            resid_bytes = cfg.num_layers * config.max_num_seqs * cfg.num_kv_heads * KIVI_KEY_GROUP * cfg.head_dim \
                * itemsize
        if config.num_kv_pages is not None:
            num_pages = config.num_kv_pages
        else:
            budget = config.kv_cache_memory_bytes or default_kv_cache_memory_bytes()
            num_pages = (budget - resid_bytes) // page_bytes
            if num_pages < 1:
                raise ValueError(f"kv_cache_memory_bytes={budget} is smaller than one page ({page_bytes} bytes at "
                                 f"block_size={bs}{' plus the KIVI residuals' if resid_bytes else ''})")
        self.num_pages = num_pages
        self.kv_cache_bytes = num_pages * page_bytes + resid_bytes
        kv = init_paged(cfg.num_layers, num_pages, bs, cfg.num_kv_heads, cfg.head_dim, dtype, self.kv_quant,
                        num_slots=config.max_num_seqs)
        draft_cache = init_cache(draft, cfg, num_pages, bs, dtype) if draft is not None else None
        assert kv.nbytes() + (draft_cache.nbytes() if draft_cache is not None else 0) == self.kv_cache_bytes, \
            "KV byte count"
        k = spec.k if spec is not None else 0
        self.allocator = PageAllocator(num_pages, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   cache_extra=(model_id, str(dtype), config.kv_cache_dtype), speculative_tokens=k,
                                   disable_by_batch_size=spec.disable_by_batch_size if spec is not None else None,
                                   preemption_mode=config.preemption_mode,
                                   swap_pages=int(config.swap_space * 2**30) // page_bytes,
                                   max_loras=config.lora_config.max_loras if config.lora_config else None,
                                   policy=config.scheduling_policy)
        self.lora = LoRAManager(cfg, config.lora_config, dtype) if config.lora_config is not None else None
        max_pages = -(-(config.max_model_len + k) // config.block_size)
        decode_token = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else None
        self.runner = ModelRunner(weights, cfg, kv, config.block_size, max_pages, config.attention_backend,
                                  decode_token, spec=spec, draft=draft, draft_params=draft_params,
                                  draft_cache=draft_cache, lora=self.lora, shape_buckets=config.shape_buckets,
                                  max_num_seqs=config.max_num_seqs)
        if config.async_scheduling:
            self.runner.enable_async(config.max_num_seqs)
        # async scheduling: the step dispatched last, not read back yet: (its chunks, its calls)
        self.inflight: tuple[list, list] | None = None
        self.inputs = InputProcessor(cfg, tokenizer, config.max_model_len, num_pages * config.block_size - k)
        self.groups: dict[str, list[EngineRequest]] = {}
        self.num_requests = 0  # requests made so far (the priority scheduler's tie-break)
        self.num_steps = 0
        self.num_fused_steps = 0  # decode steps run by multi-step calls
        self.num_prompt_tokens_computed = 0
        self.num_tokens_computed = 0  # every token run through the model (prompt, output, recomputed)
        self.num_swapped_out = 0
        self.num_generated_tokens = 0
        self.spec_drafted = 0
        self.spec_accepted = 0
        self.spec_steps = 0

    # ------------------------------------------------------------------ requests

    def make_requests(self, request_id: str, prompt, params: SamplingParams, seed: int,
                      arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                      priority: int = 0) -> list[EngineRequest]:
        """Validate and build the sequences of one request (n of them); raises ValueError."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r} must be a string")
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not is_int(priority):
            raise ValueError(f"priority={priority!r} must be an integer")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority={priority} needs scheduling_policy='priority' (this engine is "
                             f"{self.config.scheduling_policy!r})")
        p = self.inputs.process(prompt, params)
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
            if self.lora is None:
                raise ValueError("lora_request needs an engine with LoRA enabled (LLM(..., enable_lora=True))")
            self.lora.register(lora_request)  # reads and checks the adapter now, at the boundary
        self.num_requests += 1
        return [EngineRequest(request_id, p.text, p.token_ids, params, seed, i, p.stop_ids, p.max_tokens,
                              self.tokenizer, arrival_time, p.bad_words_ids, p.fsm, lora_request, priority,
                              self.num_requests) for i in range(params.n)]

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    seed: int | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None, priority: int = 0):
        """Queue a request. Invalid input raises ValueError here; nothing else is affected.
        priority: with scheduling_policy="priority", lower values are scheduled first."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or None, got {type(params).__name__}")
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed={seed!r} must be an integer or None")
        seed = params.seed if params.seed is not None else (seed if seed is not None else 0)
        self.add_sequences(self.make_requests(request_id, prompt, params, seed, arrival_time, lora_request,
                                              priority))

    def add_sequences(self, seqs: list[EngineRequest]):
        self.groups[seqs[0].request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its pages return to the pool at once."""
        seqs = self.groups.pop(request_id, None)
        if seqs is None:
            return None
        now = time.perf_counter()
        for s in seqs:
            if s.status is not Status.FINISHED:
                self.scheduler.remove(s)
                s.finish("abort", now)
        if self.inflight is not None and all(c.request.status is Status.FINISHED for c in self.inflight[0]):
            self.inflight = None  # async: nothing in flight is wanted any more; its results go unread
        return self._group_output(seqs)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None

    # ------------------------------------------------------------------ stepping

    def step(self, delta: bool = False) -> list[RequestOutput]:
        """Schedule, run the model once, and return the requests that progressed.

        With async_scheduling, the step is dispatched before the previous one is read back, and
        what is returned is the previous step's progress: a request's tokens arrive one step
        later, and a request that stops on a stop token or string has one more token computed
        (and dropped) than it would have synchronously."""
        if self.config.async_scheduling:
            return self._step_async(delta)
        sched = self._schedule()
        if sched is None:
            return []
        self._count(sched.chunks)
        n_steps = self._fused_steps(sched)
        sampled = self.runner.execute_multi(sched.chunks, n_steps) if n_steps > 1 else \
            self.runner.execute(sched.chunks)
        self.num_steps += 1
        self.num_fused_steps += n_steps if n_steps > 1 else 0
        for c in sched.chunks:
            c.request.num_computed = c.start + c.num_tokens
        return self._record(sched.chunks, sampled, delta)

    def _step_async(self, delta: bool) -> list[RequestOutput]:
        """Schedule step N + 1 while step N runs (its requests' tokens in flight: each counts
        one token more than it holds, `EngineRequest.num_inflight`), dispatch it, then read
        back step N. A decode row of N + 1 starts from its token of step N, which stays on the
        device (`ModelRunner.enable_async`; its penalties, bad words and structured-output state
        count that token there). Only a decode row ever needs a token in flight: a request
        preempted meanwhile is admitted again once its tokens are read back."""
        prev, self.inflight = self.inflight, None
        sched = self._schedule(quiet=prev is not None)  # a step in flight may still finish requests
        if sched is None:
            return [] if prev is None else self._read_back(prev, delta)
        self._count(sched.chunks)
        launched = self.runner.launch(sched.chunks)
        for c in sched.chunks:
            c.request.num_computed = c.start + c.num_tokens
        for group, completes, _ in launched:
            for c, f in zip(group, completes):
                c.request.num_inflight += f
        self.inflight = (sched.chunks, launched)
        self.num_steps += 1
        return [] if prev is None else self._read_back(prev, delta)

    def _read_back(self, step: tuple[list, list], delta: bool) -> list[RequestOutput]:
        """Record an async step (its chunks, its launched calls) once its results are read back."""
        chunks, launched = step
        return self._record(chunks, self.runner.collect(launched), delta)

    def _schedule(self, quiet: bool = False):
        """The scheduler's next step, with its swaps done; None when nothing can run (quiet: that
        is not an error -- a step in flight may finish requests and free pages)."""
        sched = self.scheduler.schedule()
        # Preemption by swap: copy the victims' pages out before this step's calls can write them
        # (they are back in the pool), and fill resumed requests' fresh pages before they are read.
        for r, pages in sched.swap_out:
            r.swapped_kv = self.runner.read_pages(pages)
            self.num_swapped_out += 1
        for r, pages in sched.swap_in:
            self.runner.write_pages(pages, r.swapped_kv)
            r.swapped_kv = None
        if not sched.chunks:
            if self.scheduler.has_work() and not quiet:
                raise RuntimeError("scheduler made no progress (no request fits in the free pages)")
            return None
        return sched

    def _count(self, chunks):
        """Keep the counts of what runs: first scheduling times, prompt and computed tokens."""
        now = time.perf_counter()
        for c in chunks:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now
            self.num_prompt_tokens_computed += max(0, min(c.start + c.num_tokens, len(c.request.prompt_ids))
                                                   - c.start)
            self.num_tokens_computed += c.num_tokens

    def _record(self, chunks, sampled: dict, delta: bool) -> list[RequestOutput]:
        """Append what a step sampled ({request: (tokens, logprobs, drafted)}) and return the
        outputs of the requests it touched."""
        now = time.perf_counter()
        touched = {}
        for c in chunks:
            r = c.request
            if r in sampled and r.status is not Status.FINISHED:  # async: finished or aborted meanwhile
                tokens, logprobs, drafted = sampled[r]
                # Every token but the last was fed back: accepted drafts (their K/V stay, the
                # rest roll back) or the tokens of fused decode steps.
                r.num_computed += len(tokens) - 1
                if drafted:
                    self.spec_steps += 1
                    self.spec_drafted += drafted
                    self.spec_accepted += len(tokens) - 1
                for token, lp in zip(tokens, logprobs):
                    self.num_generated_tokens += 1
                    if r.append_token(token, lp, now):
                        self.scheduler.remove(r)
                        r.finish(now=now)
                        break
            touched[r.request_id] = self.groups.get(r.request_id)
        outputs = []
        for rid, seqs in touched.items():
            if seqs is None:
                continue
            outputs.append(self._group_output(seqs, delta))
            if all(s.status is Status.FINISHED for s in seqs):
                del self.groups[rid]
        return outputs

    def _fused_steps(self, sched) -> int:
        """How many decode steps to fuse into this step's device call (vLLM's multi-step
        scheduling). Only when the step holds nothing but plain decodes (no prefill chunk, no
        admission, no preemption, no drafts): a request that arrives meanwhile waits at most
        num_scheduler_steps steps for its prefill."""
        n = self.config.num_scheduler_steps
        if n <= 1 or sched.preempted or not all(
                c.num_tokens == 1 and c.completes and not c.admitted and not c.num_draft for c in sched.chunks):
            return 1
        return self.scheduler.reserve_steps(sched.chunks, n)

    def _group_output(self, seqs: list[EngineRequest], delta: bool = False) -> RequestOutput:
        out = seqs[0].to_output(delta)
        out.outputs = [s.completion(delta) if i else out.outputs[0] for i, s in enumerate(seqs)]
        out.finished = all(s.status is Status.FINISHED for s in seqs)
        if len(seqs) > 1:  # the request's metrics span all of its samples
            out.metrics = dataclasses.replace(seqs[0].metrics)
            times = [s.metrics.finished_time for s in seqs]
            out.metrics.finished_time = max(times) if all(t is not None for t in times) else None
        return out

    def get_stats(self) -> EngineStats:
        a = self.allocator
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=a.num_used / a.num_pages, num_pages=a.num_pages, num_free_pages=a.num_free,
            num_cached_pages=a.num_cached, prefix_cache_queries=a.queries, prefix_cache_hits=a.hits,
            num_preemptions=self.scheduler.num_preemptions, compilations=self.runner.compilations,
            num_steps=self.num_steps, num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            num_generated_tokens=self.num_generated_tokens, spec_drafted_tokens=self.spec_drafted,
            spec_accepted_tokens=self.spec_accepted, spec_steps=self.spec_steps,
            num_fused_steps=self.num_fused_steps, num_tokens_computed=self.num_tokens_computed,
            num_swapped_out=self.num_swapped_out, num_lora_loads=self.lora.num_loads if self.lora else 0)
