"""Continuous-batching engine: identical outputs under any schedule, pages never leak, errors."""

import jax
import numpy as np
import pytest

from hf_models import write_tiny, write_tokenizer
from jaxinfer import LLM, SamplingParams
from jaxinfer.engine.engine import EngineConfig
from jaxinfer.engine.metrics import summarize


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_model")
    write_tiny("qwen2", d, vocab_size=300, max_position_embeddings=160)
    write_tokenizer(d, 300)
    return str(d)


def _prompts(n=7, seed=0, shared_prefix=0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 300, size=shared_prefix).tolist()
    return [{"prompt_token_ids": prefix + rng.integers(3, 300, size=int(k)).tolist()}
            for k in rng.integers(1, 40, size=n)]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# Compiling is most of this module's time, and every distinct (rows, tokens) of an engine call is a
# program. Tests whose subject is not the shape grid use the "slots" grid (prefill on powers of two,
# one decode shape: the fewest programs, the same tokens: test_compilations_stay_bounded);
# test_engine_greedy_equals_standalone_generate keeps the default fine grid.
SLOTS = {"shape_buckets": "slots"}


@pytest.fixture(scope="module")
def reference(model_dir):
    """Standalone static-batch generate, one prompt at a time."""
    llm = LLM(model_dir, max_num_seqs=1, block_size=8)
    prompts = _prompts() + _prompts(4, seed=1, shared_prefix=37)
    return prompts, [llm.generate_static(p, GREEDY)[0].outputs[0].token_ids for p in prompts]


def _check_pages_returned(llm):
    a = llm.engine.allocator
    a.check_invariants()
    assert a.num_free == a.num_pages  # everything free or evictable
    assert all(r == 0 for r in a.ref)
    assert llm.engine.scheduler.num_swapped_pages == 0  # no K/V left on the host


@pytest.mark.parametrize("opts", [
    dict(max_num_seqs=3, max_num_batched_tokens=512, block_size=16),  # batch composition
    dict(max_num_seqs=8, max_num_batched_tokens=12, block_size=4),  # chunked prefill, small pages
    # preemption, priority scheduling (queues in priority order, the least urgent preempted first);
    # FCFS preemption by recompute runs in the fused-steps case below
    dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=8, num_kv_pages=14, scheduling_policy="priority"),
    dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, enable_prefix_caching=True),
    # fused decode steps, with preemption (pages for the steps often do not fit: halved)
    dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=8, num_kv_pages=14, num_scheduler_steps=4),
    dict(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, enable_prefix_caching=True,
         num_scheduler_steps=8),
    # preemption by swap: K/V parked on the host and written back into other pages
    dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=8, num_kv_pages=14, preemption_mode="swap"),
    dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=8, num_kv_pages=14, preemption_mode="swap",
         enable_prefix_caching=True, num_scheduler_steps=4),
    # async scheduling with preemption by swap and prefix caching (chunked prefill with small pages
    # and preemption by recompute: test_async_scheduling_gives_what_synchronous_steps_give)
    {"max_num_seqs": 8, "max_num_batched_tokens": 24, "block_size": 8, "num_kv_pages": 14, "preemption_mode": "swap",
     "enable_prefix_caching": True, "async_scheduling": True},
])
def test_engine_greedy_equals_standalone_generate(model_dir, reference, opts):
    prompts, ref = reference
    llm = LLM(model_dir, **{"enable_prefix_caching": False, **opts})
    priority = [(5 * i) % 3 for i in range(len(prompts))] if "scheduling_policy" in opts else None
    outs = llm.generate(prompts, GREEDY, priority=priority)
    assert [o.outputs[0].token_ids for o in outs] == ref
    if opts.get("enable_prefix_caching"):
        outs = llm.generate(prompts, GREEDY)  # second pass: every prompt's full pages are cached
        assert [o.outputs[0].token_ids for o in outs] == ref
        stats = llm.get_stats()
        assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate <= 1
        assert sum(o.num_cached_tokens for o in outs) > 0
    if "num_kv_pages" in opts:
        assert llm.get_stats().num_preemptions > 0
        swapped = llm.get_stats().num_swapped_out
        assert swapped > 0 if opts.get("preemption_mode") == "swap" else swapped == 0
    if "num_scheduler_steps" in opts:
        assert llm.get_stats().num_fused_steps > 0
    # greedy requests only: every program was compiled without the sampler's filters and draws
    assert all(sig[3].greedy for sig in llm.engine.runner.signatures if not sig[0].startswith("swap"))
    _check_pages_returned(llm)


def test_fused_decode_steps_equal_single_steps(model_dir):
    """num_scheduler_steps > 1: stop tokens, stop strings, min_tokens, max_tokens, seeded
    sampling and logprobs give what single steps give, and a row that ends inside a fused
    call returns its pages."""
    prompts = _prompts(6, seed=11)
    single = LLM(model_dir, **SLOTS, block_size=4, max_num_seqs=8)
    fused = LLM(model_dir, **SLOTS, block_size=4, max_num_seqs=8, num_scheduler_steps=6)
    kw = [dict(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=3 + 4 * i, ignore_eos=True, logprobs=2)
          for i in range(6)]
    free = single.generate(prompts, [SamplingParams(**k) for k in kw])
    # Stops that these rows do reach: a token (or text) of their unstopped output.
    params = []
    for i, (k, o) in enumerate(zip(kw, free)):
        ids, text = o.outputs[0].token_ids, o.outputs[0].text
        stop_ids = [ids[min(i, len(ids) - 1)]] if i % 4 < 2 else []  # i % 4 == 2: no stop
        stop = [text[len(text) // 2:len(text) // 2 + 2]] if i % 4 == 3 and len(text) > 4 else None
        params.append(SamplingParams(**k, min_tokens=i % 3, stop_token_ids=stop_ids, stop=stop))
    ref, outs = single.generate(prompts, params), fused.generate(prompts, params)
    for a, b in zip(ref, outs):
        a, b = a.outputs[0], b.outputs[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-5 and la[t].rank == lb[t].rank for t in la)
    assert {a.outputs[0].finish_reason for a in ref} == {"stop", "length"}
    assert fused.get_stats().num_fused_steps > 0 and single.get_stats().num_fused_steps == 0
    # calls with a sampled row carry the sampler (greedy rows alone: the test above)
    assert not all(sig[3].greedy for sig in fused.engine.runner.signatures)
    _check_pages_returned(fused)
    with pytest.raises(ValueError, match="num_scheduler_steps=0"):
        LLM(model_dir, num_scheduler_steps=0)
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(model_dir, num_scheduler_steps=4, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="preemption_mode='later'"):
        LLM(model_dir, preemption_mode="later")
    with pytest.raises(ValueError, match="int4_kivi"):
        LLM(model_dir, preemption_mode="swap", kv_cache_dtype="int4_kivi", block_size=32)


def test_async_scheduling_gives_what_synchronous_steps_give(model_dir):
    """async_scheduling: stop tokens, stop strings, min_tokens, max_tokens, seeded sampling,
    logprobs, prompt logprobs, n > 1, penalties and a structured output (which count the token
    in flight on the device) give what synchronous steps give, under preemption; every page
    comes back."""
    prompts = _prompts(7, seed=12)
    sync = LLM(model_dir, **SLOTS, block_size=4, max_num_seqs=8, num_kv_pages=24, max_num_batched_tokens=32)
    asyn = LLM(model_dir, **SLOTS, block_size=4, max_num_seqs=8, num_kv_pages=24, max_num_batched_tokens=32,
               async_scheduling=True)
    kw = [{"temperature": 0.0 if i % 2 else 1.0, "seed": i, "max_tokens": 3 + 3 * i, "ignore_eos": True, "logprobs": 2}
          for i in range(7)]
    free = sync.generate(prompts, [SamplingParams(**k) for k in kw])
    params = []
    for i, (k, o) in enumerate(zip(kw, free)):
        ids, text = o.outputs[0].token_ids, o.outputs[0].text
        stop_ids = [ids[min(i, len(ids) - 1)]] if i % 4 < 2 else []
        stop = [text[len(text) // 2:len(text) // 2 + 2]] if i % 4 == 3 and len(text) > 4 else None
        extra = {"repetition_penalty": 1.3, "frequency_penalty": 0.5} if i == 5 else {"n": 2} if i == 6 else {}
        extra |= {"structured_outputs": {"regex": "[a-z]+( [a-z]+)*"}} if i == 4 else {}
        extra |= {"prompt_logprobs": 1} if i == 2 else {}
        params.append(SamplingParams(**k, min_tokens=i % 3, stop_token_ids=stop_ids, stop=stop, **extra))
    ref, outs = sync.generate(prompts, params), asyn.generate(prompts, params)
    for a, b in zip(ref, outs, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (y.token_ids, y.text, y.finish_reason) == (x.token_ids, x.text, x.finish_reason)
            for la, lb in zip(x.logprobs, y.logprobs, strict=True):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-5 and la[t].rank == lb[t].rank for t in la)
        if a.prompt_logprobs is not None:
            assert [p and p.keys() for p in a.prompt_logprobs] == [p and p.keys() for p in b.prompt_logprobs]
    assert {a.outputs[0].finish_reason for a in ref} == {"stop", "length"}
    stats = asyn.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_generated_tokens == sum(len(x.token_ids) for o in outs for x in o.outputs)  # drops not counted
    _check_pages_returned(asyn)


def test_async_scheduling_abort_in_flight_and_bad_options(model_dir):
    """A request aborted while its token is in flight ends at once, the others finish, nothing
    leaks; async_scheduling refuses what it cannot be combined with, naming it."""
    llm = LLM(model_dir, **SLOTS, block_size=8, async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": list(range(3, 40))}, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", {"prompt_token_ids": list(range(5, 30))}, SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.inflight is not None and eng.groups["a"][0].num_inflight == 1
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    finished = []
    while eng.has_unfinished_requests():
        finished += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in finished] == ["b"] and len(finished[0].outputs[0].token_ids) == 5
    _check_pages_returned(llm)
    eng.add_request("c", {"prompt_token_ids": list(range(3, 20))}, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.abort_request("c")  # the last request in flight: nothing is left to read back
    assert not eng.has_unfinished_requests() and eng.inflight is None
    _check_pages_returned(llm)
    with pytest.raises(ValueError, match="async_scheduling='yes' must be True or False"):
        LLM(model_dir, async_scheduling="yes")
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(model_dir, async_scheduling=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="num_scheduler_steps=4"):
        LLM(model_dir, async_scheduling=True, num_scheduler_steps=4)


def test_seeded_sampling_survives_preemption_and_batching(model_dir):
    """A request's tokens depend on its seed only: static == engine == engine under preemption."""
    prompts = _prompts(6, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=i, ignore_eos=True)
              for i in range(6)]
    ref = LLM(model_dir, block_size=8).generate_static(prompts, params)
    tight = LLM(model_dir, **SLOTS, num_kv_pages=12, block_size=8, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert tight.get_stats().num_preemptions > 0


def test_swap_resumes_without_recomputing(model_dir):
    """Under the same preemptions, swap computes each token once (prompt + output fed back),
    recompute computes the preempted ones again; a request aborted while swapped out leaves
    nothing behind; sampled tokens are the static reference's either way."""
    prompts = _prompts(6, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=i, ignore_eos=True) for i in range(6)]
    ref = [o.outputs[0].token_ids for o in LLM(model_dir, block_size=8).generate_static(prompts, params)]
    stats = {}
    for mode in ("recompute", "swap"):
        llm = LLM(model_dir, **SLOTS, num_kv_pages=12, block_size=8, max_num_batched_tokens=24, enable_prefix_caching=False,
                  preemption_mode=mode)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
        stats[mode] = llm.get_stats()
        _check_pages_returned(llm)
    once = sum(len(p["prompt_token_ids"]) + 16 - 1 for p in prompts)  # the last sampled token is never fed back
    assert stats["swap"].num_swapped_out == stats["swap"].num_preemptions > 0
    assert stats["swap"].num_tokens_computed == once < stats["recompute"].num_tokens_computed

    # swap_space for 2 pages: victims holding more are recomputed instead; the tokens stay the same.
    page_gib = llm.engine.kv_cache_bytes / llm.engine.num_pages / 2**30
    small = LLM(model_dir, **SLOTS, num_kv_pages=12, block_size=8, max_num_batched_tokens=24, enable_prefix_caching=False,
                preemption_mode="swap", swap_space=2 * page_gib)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == ref
    st = small.get_stats()
    assert 0 < st.num_swapped_out < st.num_preemptions
    _check_pages_returned(small)

    llm = LLM(model_dir, **SLOTS, num_kv_pages=12, block_size=8, max_num_batched_tokens=24, preemption_mode="swap")
    eng = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    while not any(r.swapped_kv is not None for r in eng.scheduler.waiting):
        eng.step()
    victim = next(r for r in eng.scheduler.waiting if r.swapped_kv is not None)
    eng.abort_request(victim.request_id)
    while eng.has_unfinished_requests():
        eng.step()
    _check_pages_returned(llm)


def test_prefix_caching_computes_fewer_prompt_tokens(model_dir):
    """Requests admitted in the same step already share the pages the first one computes."""
    prompts = _prompts(5, seed=4, shared_prefix=64)
    on = LLM(model_dir, **SLOTS, enable_prefix_caching=True, block_size=8)
    off = LLM(model_dir, **SLOTS, enable_prefix_caching=False, block_size=8)
    a, b = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    s_on, s_off = on.get_stats(), off.get_stats()
    assert s_on.num_prompt_tokens_computed <= s_off.num_prompt_tokens_computed - 3 * 64
    assert s_off.prefix_cache_queries == 0


def test_same_step_prefix_hit_reads_pages_after_they_are_written(model_dir):
    """A short request first, then two sharing a 64-token prefix, all admitted in one step: the
    third hits the pages the second computes, and its short chunk has the first one's length.
    Outputs equal the engine's without prefix caching."""
    rng = np.random.default_rng(11)
    prefix = rng.integers(3, 300, size=64).tolist()
    prompts = [{"prompt_token_ids": rng.integers(3, 300, size=9).tolist()},
               {"prompt_token_ids": prefix + rng.integers(3, 300, size=5).tolist()},
               {"prompt_token_ids": prefix + rng.integers(3, 300, size=7).tolist()}]
    on = LLM(model_dir, **SLOTS, enable_prefix_caching=True, block_size=8)
    off = LLM(model_dir, **SLOTS, enable_prefix_caching=False, block_size=8)
    a, b = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
    assert on.get_stats().prefix_cache_hits == 8  # the third request's 8 full prefix pages
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_abort_frees_pages_at_once_and_others_continue(model_dir):
    llm = LLM(model_dir, **SLOTS, block_size=8)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": list(range(3, 40))}, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", {"prompt_token_ids": list(range(5, 30))}, SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    used = eng.allocator.num_used
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.allocator.num_used < used
    finished = []
    while eng.has_unfinished_requests():
        finished += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in finished] == ["b"] and len(finished[0].outputs[0].token_ids) == 5
    _check_pages_returned(llm)


@pytest.mark.parametrize("opts,match", [
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching='yes' must be True or False"),
    ({"max_num_seqs": True}, "max_num_seqs=True must be a positive integer"),
    ({"block_size": 8.0}, "block_size=8.0 must be a positive integer"),
    ({"num_kv_pages": True}, "num_kv_pages=True must be a positive integer"),
    ({"kv_cache_memory_bytes": "64M"}, "kv_cache_memory_bytes='64M' must be a positive number of bytes"),
    ({"kv_cache_memory_bytes": float("inf")}, "kv_cache_memory_bytes=inf must be a positive number"),
    ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes=0 must be a positive number"),
])
def test_bad_engine_options_name_the_value(opts, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(max_model_len=64, **opts)


def test_a_byte_budget_written_as_a_float_is_taken_as_bytes():
    assert EngineConfig(max_model_len=64, kv_cache_memory_bytes=0.5e6).kv_cache_memory_bytes == 500000


def test_the_default_kv_budget_can_come_from_the_environment(model_dir, monkeypatch):
    """$JAXINFER_KV_CACHE_MEMORY_BYTES sizes the pool of an engine given neither num_kv_pages nor
    kv_cache_memory_bytes (the suite itself runs with 64 MiB: conftest); an explicit budget wins."""
    monkeypatch.setenv("JAXINFER_KV_CACHE_MEMORY_BYTES", str(1 << 20))
    eng = LLM(model_dir, block_size=8).engine
    page = eng.kv_cache_bytes // eng.num_pages
    assert eng.num_pages * page <= 1 << 20 < (eng.num_pages + 1) * page
    assert LLM(model_dir, block_size=8, kv_cache_memory_bytes=1 << 19).engine.num_pages == (1 << 19) // page
    for bad in ("lots", "0", "-5", "1.5e6"):
        monkeypatch.setenv("JAXINFER_KV_CACHE_MEMORY_BYTES", bad)
        with pytest.raises(ValueError, match=f"JAXINFER_KV_CACHE_MEMORY_BYTES='{bad}' must be a positive integer"):
            LLM(model_dir, block_size=8)


def test_bad_requests_are_rejected_and_the_engine_keeps_serving(model_dir):
    llm = LLM(model_dir, **SLOTS, num_kv_pages=6, block_size=8, max_model_len=160)  # 48 tokens of KV
    eng = llm.engine
    eng.add_request("ok", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="max_model_len=160"):
        eng.add_request("long", {"prompt_token_ids": [5] * 170}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="could never fit"):
        eng.add_request("huge", {"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="could never fit"):
        eng.add_request("long_out", {"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("ok", {"prompt_token_ids": [5]}, SamplingParams())
    with pytest.raises(ValueError, match="max_tokens=0"):
        eng.add_request("zero", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="params must be a SamplingParams or None, got dict"):
        eng.add_request("as_dict", {"prompt_token_ids": [5]}, {"max_tokens": 3})  # was an AttributeError
    with pytest.raises(ValueError, match="request_id=5 must be a string"):
        eng.add_request(5, {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="seed=True must be an integer"):
        eng.add_request("seed", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2), seed=True)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == ["ok"] and len(outs[0].outputs[0].token_ids) == 4
    # LLM.generate refuses the whole call before doing any work, and serves the next one.
    with pytest.raises(ValueError, match="could never fit"):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5] * 60}], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished_requests()
    assert len(llm.generate({"prompt_token_ids": [9, 9]}, SamplingParams(max_tokens=3))[0].outputs[0].token_ids) <= 3
    _check_pages_returned(llm)


@pytest.mark.parametrize("fused", [1, 4, "async"])
def test_streaming_deltas_add_up_to_the_final_text(model_dir, fused):
    llm = LLM(model_dir, **SLOTS, block_size=8, **({"async_scheduling": True} if fused == "async" else
                                          {"num_scheduler_steps": fused}))
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=["zz"])
    eng.add_request("s", "def add(a, b):", params)
    text, tokens, final = "", [], None
    while eng.has_unfinished_requests():
        for o in eng.step(delta=True):
            text += o.outputs[0].text
            tokens += o.outputs[0].token_ids
            final = o
    ref = llm.generate("def add(a, b):", params)[0].outputs[0]
    assert final.finished and text == ref.text and tokens == ref.token_ids


def test_metrics_and_summary(model_dir):
    llm = LLM(model_dir, **SLOTS, max_num_seqs=2, block_size=8)
    outs = llm.generate(_prompts(4, seed=5), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert len(m.token_times) == 6 and len(m.itl) == 5
        assert abs(m.tpot - (m.e2el - m.ttft) / 5) < 1e-12
    s = summarize(outs, duration=1.0)
    assert s["total_output_tokens"] == 24
    assert s["ttft_ms"]["median"] <= s["ttft_ms"]["p99"]
    stats = llm.get_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.compilations >= 1


def test_compilations_stay_bounded(model_dir):
    """Batch, chunk and page-table sizes are bucketed: a handful of programs, not one per step;
    shape_buckets="pow2" pads them to powers of two and "slots" also gives every decode call all
    max_num_seqs rows: fewer programs, the same tokens."""
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(3, 300, size=int(k)).tolist()} for k in rng.integers(1, 60, 24)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(1, 30, 24)]
    runs = {}
    for grid in ("fine", "pow2", "slots"):
        llm = LLM(model_dir, max_num_seqs=16, max_num_batched_tokens=64, block_size=8, shape_buckets=grid)
        runs[grid] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params)], llm.get_stats(),
                      llm.engine.runner.signatures)
    (fine, fine_stats, fine_sigs), (pow2, pow2_stats, pow2_sigs) = runs["fine"], runs["pow2"]
    slots, slots_stats, slots_sigs = runs["slots"]
    assert fine == pow2 == slots
    assert fine_stats.compilations <= 24 < fine_stats.num_steps
    assert slots_stats.compilations < pow2_stats.compilations < fine_stats.compilations
    shapes = [sig[1] for sig in pow2_sigs if sig[0] == "step"]  # (rows, tokens) of each program
    assert all(n & (n - 1) == 0 for shape in shapes for n in shape)
    assert any(n & (n - 1) for sig in fine_sigs if sig[0] == "step" for n in sig[1])  # the fine grid's 3, 5, 6, 7, 10...
    assert {sig[1] for sig in slots_sigs if sig[0] == "step" and sig[1][1] == 1} == {(16, 1)}  # one decode program
    assert {sig[1] for sig in slots_sigs if sig[0] == "step" and sig[1][1] > 1} \
        == {sig[1] for sig in pow2_sigs if sig[0] == "step" and sig[1][1] > 1}  # prefill as pow2
    with pytest.raises(ValueError, match="shape_buckets='coarse'"):
        LLM(model_dir, shape_buckets="coarse")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_draft")
    write_tiny("qwen2", d, seed=1, vocab_size=300, max_position_embeddings=160, num_hidden_layers=1)
    return str(d)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "ngram_draft_model"])
def test_engine_speculative_greedy_equals_plain(model_dir, draft_dir, method):
    """Lossless: greedy engine output with speculation == without, with prefix caching on,
    stop tokens inside accepted runs, and acceptance stats in the engine stats."""
    rng = np.random.default_rng(11)
    base = rng.integers(3, 300, size=12).tolist()
    prompts = [{"prompt_token_ids": (base * 3)[:int(n)]} for n in (30, 17, 25)]  # repetitive: n-gram hits
    plain = LLM(model_dir, **SLOTS, block_size=8)
    ref = plain.generate(prompts, GREEDY)
    stop = ref[1].outputs[0].token_ids[9]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop]), GREEDY]
    ref = plain.generate(prompts, params)
    conf = {"method": method, "num_speculative_tokens": 3}
    if method != "ngram":
        conf["model"] = draft_dir
    if method != "draft_model":
        conf.update(prompt_lookup_max=3, prompt_lookup_min=1)
    spec = LLM(model_dir, **SLOTS, block_size=8, enable_prefix_caching=True, speculative_config=conf)
    outs = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    if method != "ngram":  # preempted by swap: the draft's pages go to the host and back with the target's
        tight = LLM(model_dir, **SLOTS, block_size=8, num_kv_pages=9, max_num_batched_tokens=24, preemption_mode="swap",
                    speculative_config=conf)
        assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == \
            [o.outputs[0].token_ids for o in ref]
        assert tight.get_stats().num_swapped_out > 0
        _check_pages_returned(tight)
    assert outs[1].outputs[0].finish_reason == "stop"
    s = spec.get_stats()
    assert s.spec_steps > 0 and s.spec_drafted_tokens == 3 * s.spec_steps
    assert 0 <= s.spec_accepted_tokens <= s.spec_drafted_tokens
    if method == "ngram":
        assert s.spec_acceptance_rate > 0
        # disable_by_batch_size=2: steps that run all 3 requests decode plainly; once the second
        # stops at its stop token the other two draft. Fewer speculative steps, same tokens.
        capped = LLM(model_dir, **SLOTS, block_size=8, speculative_config={**conf, "disable_by_batch_size": 2})
        outs = capped.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
        c = capped.get_stats()
        assert 0 < c.spec_steps < s.spec_steps
        _check_pages_returned(capped)
    _check_pages_returned(spec)


def test_engine_scaled_prompt_lookup_verifies_narrower_and_stays_lossless(model_dir):
    """prompt_lookup_scale in the engine: a step verifies only as wide as its longest proposal
    (1, 2 or 4 drafts for k 4), and greedy output still equals plain decoding's."""
    rng = np.random.default_rng(11)
    base = rng.integers(3, 300, size=12).tolist()
    prompts = [{"prompt_token_ids": (base * 3)[:int(n)]} for n in (30, 17, 25)] + _prompts(2, seed=6)
    ref = [o.outputs[0].token_ids for o in LLM(model_dir, **SLOTS, block_size=8).generate(prompts, GREEDY)]
    conf = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = LLM(model_dir, **SLOTS, block_size=8, enable_prefix_caching=True,
              speculative_config={**conf, "prompt_lookup_scale": 1})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
    s = llm.get_stats()
    assert 0 < s.spec_accepted_tokens <= s.spec_drafted_tokens
    widths = {sig[1][1] - 1 for sig in llm.engine.runner.signatures if sig[0] == "spec"}
    assert widths - {4} and widths <= {1, 2, 4}, widths  # narrower verifications ran
    _check_pages_returned(llm)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_engine_speculative_sampling_is_independent_of_batch_mates_and_preemption(model_dir, draft_dir, method):
    """A seeded sampled request emits the same tokens alone, beside others and when preempted.
    Before: a row without an n-gram match rode along in its batch-mates' speculative steps with
    its last token as drafts, whose accept and residual draws differed from the plain step it
    ran alone; and a request recomputed after a preemption drew its next token with the plain
    sampler where the unpreempted run verified drafts."""
    rng = np.random.default_rng(5)
    base = rng.integers(3, 300, size=6).tolist()
    prompts = [{"prompt_token_ids": (base * 4)[:20]}] + _prompts(4, seed=9)  # one repetitive, four not
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=24, seed=40 + i, ignore_eos=True)
              for i in range(len(prompts))]
    conf = {"method": method, "num_speculative_tokens": 3}
    if method == "draft_model":
        conf["model"] = draft_dir
    else:  # single-token matches: some rows have one in a step, others not
        conf.update(prompt_lookup_max=2, prompt_lookup_min=1)
    llm = LLM(model_dir, **SLOTS, block_size=8, speculative_config=conf)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    assert llm.get_stats().spec_steps > 0
    tight = LLM(model_dir, **SLOTS, block_size=8, num_kv_pages=12, max_num_batched_tokens=24, speculative_config=conf)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == together
    assert tight.get_stats().num_preemptions > 0
    _check_pages_returned(tight)


@pytest.fixture(scope="module")
def head_dirs(model_dir, tmp_path_factory):
    """Random EAGLE and Medusa heads for the engine's tiny model."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.checkpoint import load_config
    from jaxinfer.spec.heads import eagle_config, init_eagle, init_medusa, save_head
    cfg = load_config(model_dir)
    d = tmp_path_factory.mktemp("engine_heads")
    save_head(d / "eagle", "eagle", init_eagle(eagle_config(cfg, 64), jax.random.PRNGKey(0)), cfg,
              {"intermediate_size": 64}, dtype=jnp.float32)
    save_head(d / "medusa", "medusa", init_medusa(cfg.hidden_size, 3, 32, jax.random.PRNGKey(1)), cfg,
              {"num_heads": 3, "inner": 32}, dtype=jnp.float32)
    counts = np.random.default_rng(2).integers(0, 100, cfg.vocab_size)  # for draft_vocab_size
    for h in ("eagle", "medusa"):
        np.save(d / h / "token_counts.npy", counts)
    return {"eagle": str(d / "eagle"), "medusa": str(d / "medusa")}


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_engine_heads_with_a_reduced_draft_vocab_are_lossless(model_dir, head_dirs, method):
    """draft_vocab_size in the engine (drafts scored over 64 kept tokens only): greedy output unchanged."""
    prompts = _prompts(4, seed=3)
    ref = [o.outputs[0].token_ids for o in LLM(model_dir, **SLOTS, block_size=8).generate(prompts, GREEDY)]
    conf = {"method": method, "num_speculative_tokens": 3, "model": head_dirs[method], "draft_vocab_size": 64}
    llm = LLM(model_dir, **SLOTS, block_size=8, enable_prefix_caching=True, speculative_config=conf)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
    assert llm.get_stats().spec_steps > 0
    _check_pages_returned(llm)


@pytest.mark.parametrize("method", ["layer_skip", "eagle", "medusa"])
def test_engine_head_drafters_are_lossless_and_draft_as_the_static_loop(model_dir, head_dirs, method):
    """Layer skip, EAGLE and Medusa in the engine. Greedy output equals the plain engine's
    with prefix caching, chunked prefill and preemption by recompute, and by swap (the heads'
    feature and K/V pages go to the host and back). One request at a time, the engine drafts
    what the static loop drafts: the same verification count and accepted tokens, so the
    head's paged state holds what the loop's contiguous state does."""
    prompts = _prompts(4, seed=3) + _prompts(3, seed=4, shared_prefix=20)
    conf = {"method": method, "num_speculative_tokens": 3}
    conf.update({"num_layers": 1} if method == "layer_skip" else {"model": head_dirs[method]})
    ref = [o.outputs[0].token_ids for o in LLM(model_dir, **SLOTS, block_size=8).generate(prompts, GREEDY)]
    for mode in ("recompute", "swap"):
        llm = LLM(model_dir, **SLOTS, block_size=8, num_kv_pages=12, max_num_batched_tokens=16, preemption_mode=mode,
                  enable_prefix_caching=mode == "recompute", speculative_config=conf)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
        s = llm.get_stats()
        assert s.num_preemptions > 0 and (mode == "recompute" or s.num_swapped_out > 0)
        assert s.spec_steps > 0 and s.spec_drafted_tokens == 3 * s.spec_steps
        _check_pages_returned(llm)
    one = LLM(model_dir, **SLOTS, block_size=8, max_num_seqs=1, speculative_config=conf)
    assert [o.outputs[0].token_ids for o in one.generate(prompts[:4], GREEDY)] == ref[:4]
    static = LLM(model_dir, **SLOTS, speculative_config=conf)
    static.generate_static(prompts[:4], GREEDY, batch_size=1)
    s, st = one.get_stats(), static.spec_stats()
    assert (s.spec_steps, s.spec_accepted_tokens) == (st.forwards, st.accepted) and st.accepted > 0


def test_engine_eagle_in_bfloat16_is_lossless_under_swap(model_dir, head_dirs):
    """bf16 on CPU stores the feature pages and the head's K/V as integer bits (kv/bits.py); they
    are read back, swapped out and in like the target's: greedy output equals the plain bf16 engine."""
    import jax

    prompts = _prompts(5, seed=5)
    ref = [o.outputs[0].token_ids for o in LLM(model_dir, **SLOTS, dtype="bfloat16", block_size=8).generate(prompts, GREEDY)]
    llm = LLM(model_dir, **SLOTS, dtype="bfloat16", block_size=8, num_kv_pages=10, max_num_batched_tokens=16,
              preemption_mode="swap", speculative_config={"method": "eagle", "num_speculative_tokens": 3,
                                                          "model": head_dirs["eagle"]})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
    s = llm.get_stats()
    assert s.num_swapped_out > 0 and s.spec_steps > 0
    _check_pages_returned(llm)
    runner = llm.engine.runner  # a swap copies the head's pages (feature bits and K/V) with the target's
    host = runner.read_pages([0, 1])
    runner.write_pages([4, 5], host)
    for leaf in jax.tree_util.tree_leaves(runner.draft_cache):
        assert leaf.dtype == np.uint16 and np.asarray(leaf[0:2]).any()
        assert np.array_equal(np.asarray(leaf[4:6]), np.asarray(leaf[0:2]))


def _chi2_stat(observed: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson's statistic (cells expected below 5 pooled) and its 0.999 quantile (Wilson-Hilferty)."""
    expected = observed.sum() * probs
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    return stat, dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3


def test_engine_speculative_sampling_follows_the_target(tmp_path_factory):
    """Lossless sampling end to end, per drafter whose q the engine computes (EAGLE, Medusa, a
    draft model): at temperature 1 the second and third tokens of a fixed prompt, both emitted by
    verification rounds (accepted drafts, residual draws, bonus tokens), follow the target's
    marginals, computed exactly from its logprobs over a 16-token vocabulary; 1,200 seeded
    requests, chi-square at p = 0.001. The same samples are far from the first token's
    distribution, and drafts that do not follow the q reported for them (drawn greedily, say)
    fail it (chi-square ~500 against a limit of 38)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.checkpoint import load_config
    from jaxinfer.spec.heads import eagle_config, init_eagle, init_medusa, save_head
    d = tmp_path_factory.mktemp("vocab16")
    write_tiny("qwen2", d / "target", vocab_size=16, max_position_embeddings=64)
    write_tiny("qwen2", d / "draft", seed=1, vocab_size=16, max_position_embeddings=64, num_hidden_layers=1)
    cfg = load_config(d / "target")
    save_head(d / "eagle", "eagle", init_eagle(eagle_config(cfg, 64), jax.random.PRNGKey(0), std=0.2), cfg,
              {"intermediate_size": 64}, dtype=jnp.float32)
    medusa = init_medusa(cfg.hidden_size, 2, 32, jax.random.PRNGKey(1))
    medusa["w2"] = 0.2 * jax.random.normal(jax.random.PRNGKey(2), medusa["w2"].shape)  # not the LM head itself
    save_head(d / "medusa", "medusa", medusa, cfg, {"num_heads": 2, "inner": 32}, dtype=jnp.float32)

    prompt, v = [3, 5, 7], 16
    plain = LLM(str(d / "target"), **SLOTS)

    def next_dist(contexts):  # exact next-token distributions [len(contexts), V]
        outs = plain.generate([{"prompt_token_ids": prompt + list(c)} for c in contexts],
                              SamplingParams(temperature=1.0, max_tokens=1, logprobs=v, seed=0))
        lps = [o.outputs[0].logprobs[0] for o in outs]
        return np.exp(np.array([[lp[t].logprob for t in range(v)] for lp in lps]))

    p1 = next_dist([()])[0]
    p2 = next_dist([(a,) for a in range(v)])  # [x1, x2]
    p3 = next_dist([(a, b) for a in range(v) for b in range(v)]).reshape(v, v, v)  # [x1, x2, x3]
    second = p1 @ p2
    third = np.einsum("a,ab,abc->c", p1, p2, p3)
    n = 1200
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    for conf in ({"method": "eagle", "model": str(d / "eagle")}, {"method": "medusa", "model": str(d / "medusa")},
                 {"method": "draft_model", "model": str(d / "draft")}):
        # All n requests in one wave: a row needs at most two verification rounds after its
        # prefill, so those steps take a few batch shapes (waves of 64 took ~6 shapes per drafter as they drained,
        # each a program to compile: 37 s per drafter instead of 15 on a 2-core AVX2 CPU).
        llm = LLM(str(d / "target"), **SLOTS, max_num_seqs=n, max_num_batched_tokens=4096,
                  speculative_config={**conf, "num_speculative_tokens": 2})
        toks = np.array([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": prompt}] * n, params)])
        s = llm.get_stats()
        assert s.spec_steps > 0 and 0 < s.spec_accepted_tokens < s.spec_drafted_tokens
        for j, dist in ((1, second), (2, third)):
            stat, limit = _chi2_stat(np.bincount(toks[:, j], minlength=v), dist)
            assert stat < limit, (conf["method"], j, stat, limit)
        stat, limit = _chi2_stat(np.bincount(toks[:, 2], minlength=v), p1)
        assert stat > 4 * limit, (conf["method"], stat, limit)


def test_prefill_calls_group_similar_lengths_and_keep_readers_after_writers():
    from jaxinfer.engine.runner import prefill_calls
    from jaxinfer.engine.scheduler import ScheduledChunk

    def chunk(n, start=0, admitted=True):
        return ScheduledChunk(request=None, start=start, num_tokens=n, admitted=admitted)

    a, b, c, d = chunk(460), chunk(40), chunk(470), chunk(38, admitted=False)
    calls = prefill_calls([a, b, c, d])
    assert sorted(map(len, calls)) == [2, 2] and {id(x) for x in calls[0]} in ({id(a), id(c)}, {id(b), id(d)})
    # e arrives with prefix-cache hits (start > 0): every earlier chunk runs in an earlier call
    e, f = chunk(8, start=64), chunk(30)
    calls = prefill_calls([a, b, e, f])
    where = {id(x): i for i, call in enumerate(calls) for x in call}
    assert where[id(e)] > max(where[id(a)], where[id(b)])
    assert where[id(f)] >= where[id(e)]


def test_priority_scheduling_admits_serves_and_preempts_by_urgency():
    """The scheduler alone, tokens appended by hand, 6 pages of 2 tokens and two slots: r0
    (priority 2) runs first; then r1 (priority 1) and r2 (priority 0) arrive. The priority policy
    admits r2 and, when pages run out, preempts r0, the least urgent, though it was admitted
    first; FCFS admits r1, the older, and preempts it, the newest running."""
    from jaxinfer.engine.request import EngineRequest
    from jaxinfer.engine.scheduler import Scheduler
    from jaxinfer.kv.allocator import PageAllocator

    def run(policy):
        sched = Scheduler(PageAllocator(6, False), page_size=2, max_num_seqs=2, max_num_batched_tokens=64,
                          policy=policy)
        reqs = [EngineRequest(f"r{i}", None, [5, 6, 7], SamplingParams(max_tokens=6), 0, 0, [], 6, None,
                              priority=p, order=i) for i, p in enumerate([2, 1, 0])]
        admitted, preempted = [], []
        for step in range(12):
            for r in {0: reqs[:1], 1: reqs[1:]}.get(step, []):
                sched.add(r)
            out = sched.schedule()
            admitted += [c.request.request_id for c in out.chunks if c.admitted]
            preempted += [r.request_id for r in out.preempted]
            for c in out.chunks:  # what the engine does after the step: K/V computed, a token sampled
                c.request.num_computed = c.start + c.num_tokens
                if c.completes:
                    c.request.output_ids.append(9)
        return admitted, preempted

    admitted, preempted = run("priority")
    assert admitted[:2] == ["r0", "r2"] and preempted and preempted[0] == "r0" and "r2" not in preempted
    admitted, preempted = run("fcfs")
    assert admitted[:2] == ["r0", "r1"] and preempted and preempted[0] == "r1"


def test_priority_needs_the_priority_policy(model_dir):
    with pytest.raises(ValueError, match="needs scheduling_policy='priority'"):
        LLM(model_dir, block_size=8).generate(_prompts(2), GREEDY, priority=[0, 1])
    with pytest.raises(ValueError, match="scheduling_policy='lifo'"):
        LLM(model_dir, scheduling_policy="lifo")


def test_engine_off_cpu_attention_path(model_dir, reference, monkeypatch):
    """Where the paged attention loops do not pay (GPU, TPU: `layers.attention_loops_pay`), the XLA
    path reads the page tables through `attention_reference`: same tokens, with chunked prefill,
    fused steps and preemption (tests/test_accelerator_paths.py cuts the tables to the rows' lengths)."""
    from jaxinfer import layers
    monkeypatch.setattr(layers, "attention_loops_pay", lambda: False)
    jax.clear_caches()  # programs traced with the loops (same shapes) must not serve this test
    traced = []
    for name in ("attention_reference", "attention_paged_ragged", "attention_paged_loop"):
        fn = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _fn=fn, _name=name, **k: traced.append(_name) or _fn(*a, **k))
    prompts, ref = reference
    llm = LLM(model_dir, **SLOTS, enable_prefix_caching=False, max_num_seqs=8, max_num_batched_tokens=24, block_size=8,
              num_kv_pages=14, num_scheduler_steps=4)
    assert not llm.engine.runner.full_width_tables
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.get_stats().num_preemptions > 0 and llm.get_stats().num_fused_steps > 0
    assert set(traced) == {"attention_reference"}
    _check_pages_returned(llm)
    jax.clear_caches()  # nor these later tests


def test_engine_decodes_one_mqa_request_as_static_generate(tmp_path):
    """An MQA model (one kv head, G = 4) serving a single request at a time: each decode step's
    grouped-query products have one batch entry, the shape XLA:CPU had miscompiled (see
    `layers.batched_qk_pv`); every token equals static generation's, which equals transformers'."""
    write_tiny("llama", tmp_path, vocab_size=300, max_position_embeddings=160, num_key_value_heads=1)
    prompts = _prompts(3, seed=5)
    llm = LLM(str(tmp_path), max_num_seqs=1, block_size=8, enable_prefix_caching=False)
    ref = [o.outputs[0].token_ids for o in llm.generate_static(prompts, GREEDY, batch_size=1)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref

