"""Continuous-batching scheduler: a token budget per step, running first, chunked prefill.

Each step (as in vLLM V1) fills `max_num_batched_tokens` with the running
requests first (their one decode token, or the next chunk of a prefill that did
not fit before), then admits waiting requests in arrival order while pages and
`max_num_seqs` allow, chunking the prefill that does not fit in what is left of
the budget. When a running request needs a page and none is free, the newest
running request is preempted: its pages are freed and it returns to the front of
the waiting queue. By recompute (vLLM's default), its prompt and output so far are
computed again when it resumes; by swap, the K/V of its computed tokens is copied to
the host first (the engine does it before the step runs, `swap_out`) and written back
into fresh pages when it resumes (`swap_in`), so it continues where it stopped.

With scheduling_policy="priority" (vLLM's), both queues are kept in (priority, arrival)
order -- a lower value first -- so the most urgent running requests are served first, waiting
ones are admitted in that order, and the victim of a preemption is the least urgent running
request. With enable_lora, a waiting request is admitted only while the running requests need
at most max_loras distinct adapters; the ones behind it may go first.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxinfer.engine.request import EngineRequest, Status
from jaxinfer.kv.allocator import PageAllocator


@dataclasses.dataclass
class ScheduledChunk:
    request: EngineRequest
    start: int  # first token index (into all_tokens) computed this step
    num_tokens: int
    admitted: bool = False  # admitted this step: may read pages other rows write this step
    num_draft: int = 0  # speculative tokens verified after the one pending token (decode rows)

    @property
    def completes(self) -> bool:
        """This chunk reaches the end of the known tokens: a token is sampled after it."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[EngineRequest]
    # preemption_mode="swap": (request, pages) to copy to the host before this step runs, and
    # (request, pages) to fill from the host copy before this step runs
    swap_out: list[tuple[EngineRequest, list[int]]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[EngineRequest, list[int]]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, cache_extra=None, speculative_tokens: int = 0,
                 disable_by_batch_size: int | None = None, preemption_mode: str = "recompute",
                 swap_pages: int = 0, max_loras: int | None = None, policy: str = "fcfs"):
        self.allocator = allocator
        self.policy = policy  # "fcfs" or "priority"
        # enable_lora: the running requests use at most max_loras distinct adapters (device slots)
        self.max_loras = max_loras
        self.preemption_mode = preemption_mode
        # preemption_mode="swap": pages' worth of K/V the host holds at most (vLLM's swap_space);
        # a victim that does not fit is preempted by recompute instead
        self.swap_pages = swap_pages
        self.num_swapped_pages = 0
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache_extra = cache_extra
        self.lookahead = speculative_tokens  # k: tokens a drafter proposes per decode step
        # speculative_config disable_by_batch_size: no drafts in a step with more running requests
        self.disable_by_batch_size = disable_by_batch_size
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        # One slot per running sequence for per-sequence device state (KIVI's residual keys).
        self.free_slots: deque[int] = deque(range(max_num_seqs))
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue ops

    def add(self, req: EngineRequest):
        self._enqueue(self.waiting, req)

    def _enqueue(self, queue, req: EngineRequest, front: bool = False):
        """FCFS: req at the back of queue (at the front: a preempted request resumes first).
        Priority: in `EngineRequest.urgency` order, after its equals."""
        if self.policy != "priority":
            if front:
                queue.appendleft(req)
            else:
                queue.append(req)
            return
        key = req.urgency
        i = len(queue)
        while i > 0 and queue[i - 1].urgency > key:
            i -= 1
        queue.insert(i, req)

    def remove(self, req: EngineRequest):
        """Drop a request from the queues and free its pages at once (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            if req.swapped:  # aborted while its K/V waits on the host
                self._unswap(req)
        self._release(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling

    def _pages_needed(self, req: EngineRequest, num_tokens: int) -> int:
        """Extra pages for req to hold num_computed + num_tokens tokens (drafts included)."""
        total = min(req.num_computed + num_tokens, req.max_total_tokens + self.lookahead)
        return max(0, -(-total // self.page_size) - len(req.pages))

    def _grow(self, req: EngineRequest, n_pages: int):
        for _ in range(n_pages):
            req.pages.append(self.allocator.allocate())

    def _release(self, req: EngineRequest):
        self.allocator.free(req.pages)
        req.pages = []
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    def _held_pages(self, req: EngineRequest) -> int:
        return -(-req.num_computed // self.page_size)

    def _unswap(self, req: EngineRequest):
        self.num_swapped_pages -= self._held_pages(req)
        req.swapped = False

    def _preempt(self, victim: EngineRequest, swap_out: list):
        self.running.remove(victim)
        held = self._held_pages(victim)
        if self.preemption_mode == "swap" and 0 < held <= self.swap_pages - self.num_swapped_pages:
            # The pages go back to the pool now; the engine copies them out before anything
            # scheduled in this step can write them.
            swap_out.append((victim, victim.pages[:held]))
            victim.swapped = True
            self.num_swapped_pages += held
        else:
            victim.num_computed = 0
            victim.num_cached_tokens = 0
        self._release(victim)
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(self.waiting, victim, front=True)

    def _admit_prefix(self, req: EngineRequest) -> int:
        """Reuse every cached full page of the request's tokens (not for prompt logprobs).

        Returns the number of pages looked up."""
        if req.wants_prompt_logprobs or not self.allocator.enable_prefix_caching:
            return 0
        keys = req.full_page_keys(self.page_size, self.cache_extra)
        # Leave at least one token to compute: its logits give the next token.
        keys = keys[:(req.num_tokens - 1) // self.page_size]
        req.pages = self.allocator.lookup(keys)
        req.num_computed = req.num_cached_tokens = len(req.pages) * self.page_size
        return len(keys)

    def _prefill_room(self, req: EngineRequest) -> int:
        """Tokens of req that may be computed now: all pending ones, except that with speculation a
        request recomputing its output after a preemption stops one short. Its last output token
        then stays pending, and the next step verifies drafts after it, as the step that would
        have followed had it not been preempted did; a recompute that ran to the end would draw
        the next token with the plain sampler instead, and a seeded sampled output would change
        with preemption."""
        if self.lookahead and req.output_ids and req.num_pending > 1:
            return req.num_pending - 1
        return req.num_pending

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[EngineRequest] = []
        swap_out, swap_in = [], []

        # 1. Running requests, oldest first.
        lookahead = self.lookahead
        if self.disable_by_batch_size is not None and len(self.running) > self.disable_by_batch_size:
            lookahead = 0  # a large batch gains less from speculation than verification costs
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_inflight and req.num_outputs >= req.max_tokens:
                i += 1  # async scheduling: its last token is in flight; reading it back finishes it
                continue
            n = min(self._prefill_room(req), budget)
            # A decoding request verifies k drafted tokens after its pending one, budget permitting.
            drafts = lookahead if (lookahead and req.num_pending == 1 and req.output_ids
                                   and budget >= 1 + lookahead) else 0
            need = self._pages_needed(req, n + drafts)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim, swap_out)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: nothing newer is left to schedule
            self._grow(req, need)
            chunks.append(ScheduledChunk(req, req.num_computed, n, num_draft=drafts))
            self.register_full_pages(req, req.num_computed + n)
            budget -= n + drafts
            i += 1

        # 2. Waiting requests, in order, while the budget, pages and max_num_seqs allow. A request
        # whose adapter would exceed max_loras waits for one to finish; later ones may go first.
        adapters = {r.lora_id for r in self.running} - {0}
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[i]
            if req.num_inflight:  # preempted with a token in flight: admitted once it is read back
                i += 1
                continue
            if req.lora_id and req.lora_id not in adapters and len(adapters) >= (self.max_loras or 0):
                i += 1
                continue
            queried = 0 if req.swapped else self._admit_prefix(req)  # swapped: its K/V comes back
            n = min(self._prefill_room(req), budget)
            need = self._pages_needed(req, n)
            if need > self.allocator.num_free:
                # Admission by free pages: give the prefix hits back and try again next step.
                if not req.swapped:
                    self.allocator.free(req.pages)
                    req.pages, req.num_computed, req.num_cached_tokens = [], 0, 0
                break
            self.allocator.record_lookup(queried, len(req.pages))
            del self.waiting[i]
            if req.lora_id:
                adapters.add(req.lora_id)
            self._grow(req, need)
            if req.swapped:
                swap_in.append((req, req.pages[:self._held_pages(req)]))
                self._unswap(req)
            req.slot = self.free_slots.popleft()
            req.status = Status.RUNNING
            self._enqueue(self.running, req)  # priority: the least urgent last, served last, preempted first
            chunks.append(ScheduledChunk(req, req.num_computed, n, admitted=True))
            self.register_full_pages(req, req.num_computed + n)
            budget -= n
        return SchedulerOutput(chunks, preempted, swap_out, swap_in)

    def reserve_steps(self, chunks: list[ScheduledChunk], num_steps: int) -> int:
        """Grant decode-only chunks pages for num_steps tokens each (fused decode steps).

        Halves num_steps until every row's pages fit in the free pool; never preempts or
        evicts anything for it. Returns the steps granted (1: run the single step scheduled)."""
        n = num_steps
        while n > 1:
            needs = [self._pages_needed(c.request, n) for c in chunks]
            if sum(needs) <= self.allocator.num_free:
                for c, need in zip(chunks, needs):
                    self._grow(c.request, need)
                return n
            n //= 2
        return 1

    def register_full_pages(self, req: EngineRequest, num_tokens: int):
        """Key every full page of req's first num_tokens tokens so other requests can share it.

        Called when a chunk is scheduled (as vLLM does): a request admitted later in the
        same step may already hit these pages: within one call every row's K/V is written
        before any row's attention reads the cache, layer by layer, and the runner puts
        such a chunk in a call after every call holding an earlier chunk
        (`runner.prefill_calls`)."""
        if not self.allocator.enable_prefix_caching:
            return
        n_full = min(num_tokens, req.num_known) // self.page_size  # a token in flight has no key yet
        keys = req.full_page_keys(self.page_size, self.cache_extra)
        for page, key in zip(req.pages[:n_full], keys[:n_full]):
            self.allocator.register(page, key)
