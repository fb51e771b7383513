"""Serving benchmark: continuous batching, prefix caching and paged KV, measured in one run.

Workloads (seeded; random token prompts as in `vllm bench serve --dataset-name random`):
  (a) mixed: prompt lengths U[16, 384], output lengths U[8, 256], all at once and with
      Poisson arrivals at --rate requests/s;
  (b) shared system prompt of 512 tokens + user turns of U[8, 32] tokens, outputs of
      U[16, 48] tokens, Poisson arrivals.
Comparisons:
  1. continuous batching (engine) vs static batching (padded batches in arrival order, each
     generated to its longest request) on (a), in the same KV memory: a static batch
     preallocates every row for the longest request of the workload (prompt + max_tokens; it
     cannot know which row ends first), so the budget holds fewer rows than the engine keeps
     running. The ratio is the median of --pairs back-to-back pairs (alternating which runs first);
     the table's rows are single runs. Also reported: static batches of max_num_seqs rows with no
     memory limit (the best a static batch can do; it needs more KV memory than the engine is given);
  2. prefix caching on vs off on (b) (mean TTFT);
  3. paged KV vs contiguous max-length preallocation: concurrent sequences in the same
     KV memory on (a);
  4. the engine vs transformers' `generate` in static batches on (a);
  5. fused decode steps (`num_scheduler_steps`, vLLM's multi-step scheduling) vs single
     steps on (a), all at once (throughput: --pairs back-to-back pairs, median ratio) and
     with Poisson arrivals (what the fused steps cost arriving requests in TTFT), and on
     (c) decode-heavy: --num-requests / 2 requests, prompts U[16, 64], outputs U[128, 256];
  6. the engine with the options that pay on a CPU (preemption by swap; swap and fused steps; swap
     and async scheduling) vs the same static batches on (a), all at once (--pairs back-to-back
     pairs, median ratio);
  7. async scheduling (`async_scheduling=True`: each step scheduled and dispatched before the one
     before is read back) vs synchronous steps: output throughput on (a) all at once and on (c)
     (--pairs back-to-back pairs, median ratio), TPOT with Poisson arrivals on (a), and one
     request alone (time per output token, median of 3 x --pairs back-to-back pairs).
Part 1 also prints its compute bound: the FLOPs the requests need (each token once) and the FLOPs
the static batches ran (padding), counted from the model's shapes; the FLOP rate of each side and
of the model's own prefill; and the highest continuous / static ratio that the best of those rates
allows on this machine (the useful FLOPs at that rate against the static run's time).
Writes experiments/results/bench_serving.{json,md}.

    python experiments/bench_serving.py [--model stdlib-target] [--num-requests 64] [--rate 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from report import torch_device

from jaxinfer import LLM, SamplingParams
from jaxinfer.engine.metrics import format_summary, summarize

RESULTS = Path(__file__).parent / "results"


def mixed_workload(rng, n, vocab):
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=int(k)).tolist()}
               for k in rng.integers(16, 385, size=n)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(8, 257, n)]
    return prompts, params


def decode_heavy_workload(rng, n, vocab):
    """(c) short prompts U[16, 64], long outputs U[128, 256]: most steps are decode-only."""
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=int(k)).tolist()}
               for k in rng.integers(16, 65, size=n)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(128, 257, n)]
    return prompts, params


def paired_ratio(base, other, pairs: int) -> list[float]:
    """Output tok/s of other() over base() (each runs the workload once and returns its summary),
    runs back to back, alternating which goes first (both warmed up already)."""
    ratios = []
    for i in range(pairs):
        tput = {}
        for name, run in ((("base", base), ("other", other)) if i % 2 == 0 else (("other", other), ("base", base))):
            tput[name] = run()["output_throughput"]
        ratios.append(tput["other"] / tput["base"])
    return ratios


def engine_run(llm: LLM, prompts, params):
    """A paired_ratio side: the engine over the workload, all at once."""
    return lambda: run_engine(llm, prompts, params)[1]


def shared_prefix_workload(rng, n, vocab, system_len=512):
    system = rng.integers(3, vocab, size=system_len).tolist()
    prompts = [{"prompt_token_ids": system + rng.integers(3, vocab, size=int(k)).tolist()}
               for k in rng.integers(8, 33, size=n)]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(16, 49, n)]
    return prompts, params


def run_engine(llm: LLM, prompts, params, arrivals=None, priority=None):
    """Serve requests (arriving at the given offsets, or all at once; with the given priorities,
    for scheduling_policy="priority"); returns (outputs, summary, kv)."""
    eng = llm.engine
    t0 = time.perf_counter()
    arrivals = arrivals if arrivals is not None else [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    pending = list(order)
    done, kv_usage, running = {}, [], []
    base = llm._counter
    llm._counter += len(prompts)
    preempted = eng.get_stats().num_preemptions
    while pending or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            eng.add_request(f"r{base + i}", prompts[i], params[i], seed=0, arrival_time=t0 + arrivals[i],
                            priority=0 if priority is None else priority[i])
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[pending[0]] - (time.perf_counter() - t0)))
            continue
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        s = eng.get_stats()
        kv_usage.append(s.kv_usage)
        running.append(s.num_running)
    duration = time.perf_counter() - t0
    outs = [done[f"r{base + i}"] for i in range(len(prompts))]
    kv = {"kv_usage_mean": float(np.mean(kv_usage)), "kv_usage_max": float(np.max(kv_usage)),
          "max_concurrent_seqs": int(np.max(running)), "preemptions": eng.get_stats().num_preemptions - preempted}
    return outs, summarize(outs, duration), kv


def run_static(llm: LLM, prompts, params, batch_size):
    """Padded static batches in arrival order; tokens of a batch arrive when it finishes."""
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(prompts), batch_size):
        batch = llm.generate_static(prompts[s:s + batch_size], params[s:s + batch_size], batch_size=batch_size)
        for o in batch:  # all requests arrived at t0 (offline)
            o.metrics.arrival_time = t0
        outs += batch
    return outs, summarize(outs, time.perf_counter() - t0)


def _head_flops(cfg) -> float:
    return cfg.matmul_flops_per_token() - cfg.matmul_flops_per_token(lm_head=False)


def useful_work(cfg, prompts, params) -> float:
    """FLOPs any scheduler must spend on a workload (EOS ignored: every request generates exactly
    max_tokens): each prompt token once, logits at its last, and every output token but the last
    fed back once, with its logits, at its own context."""
    flops = 0.0
    for p, sp in zip(prompts, params):
        n, out = len(p["prompt_token_ids"]), sp.max_tokens
        flops += n * cfg.matmul_flops_per_token(lm_head=False) + _head_flops(cfg)
        flops += sum(cfg.attention_flops_per_token(c) for c in range(1, n + 1))
        flops += (out - 1) * cfg.matmul_flops_per_token()
        flops += sum(cfg.attention_flops_per_token(n + j) for j in range(1, out))
    return flops


def static_work(cfg, prompts, params, batch_size) -> float:
    """FLOPs the static batches run (`StaticBatchGenerator`): per batch, every row (padded to a
    power of two) through the padded prompt width, then through every decode step until the
    batch's longest request ends, finished rows included. Attention is counted as if each row
    attended over the padded width plus the steps so far (an upper bound: the kernels stop at each
    row's own length), so the work is never under-counted."""
    from jaxinfer.generate import bucket, fine_bucket
    flops = 0.0
    for s in range(0, len(prompts), batch_size):
        rows = [len(p["prompt_token_ids"]) for p in prompts[s:s + batch_size]]
        outs = [sp.max_tokens for sp in params[s:s + batch_size]]
        b, t = bucket(len(rows), minimum=1), fine_bucket(max(rows), minimum=16)
        flops += b * (t * cfg.matmul_flops_per_token(lm_head=False) + _head_flops(cfg))
        flops += b * sum(cfg.attention_flops_per_token(c) for c in range(1, t + 1))
        flops += b * (max(outs) - 1) * cfg.matmul_flops_per_token()
        flops += b * sum(cfg.attention_flops_per_token(t + j) for j in range(1, max(outs)))
    return flops


def prefill_rate(llm: LLM, rows: int = 4, tokens: int = 512, repeats: int = 3) -> float:
    """The model's FLOP rate on this machine at its most efficient: static batches of `rows`
    `tokens`-token prompts, one output token each (prefill; best of `repeats` after a warm-up)."""
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, llm.cfg.vocab_size, size=tokens).tolist()} for _ in range(rows)]
    params = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)] * rows
    work = useful_work(llm.cfg, prompts, params)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        llm.generate_static(prompts, params, batch_size=rows)
        if i:
            best = min(best, time.perf_counter() - t0)
    return work / best


def run_transformers(model_dir: Path, prompts, params, batch_size, dtype: str = "float32"):
    import torch
    import transformers
    device = torch_device()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval().to(device)
    t0 = time.perf_counter()
    useful = 0
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            ids = [p["prompt_token_ids"] for p in prompts[s:s + batch_size]]
            width = max(map(len, ids))
            x = torch.tensor([[0] * (width - len(i)) + i for i in ids], device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            new = max(p.max_tokens for p in params[s:s + batch_size])
            model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
            useful += sum(p.max_tokens for p in params[s:s + batch_size])
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"output_throughput": useful / dt, "duration_s": dt, "device": device}


def measured(run, llm: LLM, *args):
    """Warm up, then measure one run of a workload; returns (run's result, compile info).

    Warm-up passes compile the shapes the workload needs; an engine workload is warmed up
    until a pass compiles nothing new (at most 3 passes: with Poisson arrivals the step
    compositions, hence the shapes, depend on timing). A measured engine run that compiled
    is run again, at most 3 times in all, so that its TTFT is not compile time. Compilations
    are counted and reported, including any during the run kept. The prefix cache is emptied
    before every pass so each starts cold."""
    def count():
        return llm.get_stats().compilations

    passes = 0
    while passes < (3 if run is run_engine else 1):
        before = count()
        run(llm, *args)
        llm.engine.allocator.reset_prefix_cache()
        passes += 1
        if count() == before:
            break
    for attempt in range(1, 4):
        before = count()
        out = run(llm, *args)
        if count() == before or run is not run_engine or attempt == 3:
            break
        llm.engine.allocator.reset_prefix_cache()
    return out, {"warmup_passes": passes, "measured_attempts": attempt, "compilations": count(),
                 "compiled_while_measured": count() - before}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate (requests/s)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory-mb", type=float, default=64.0)
    ap.add_argument("--block-size", type=int, default=16, help="KV page size in tokens (LLM's block_size)")
    ap.add_argument("--contiguous-seqs", type=int, default=4,
                    help="part 3: KV budget = this many max_model_len sequences preallocated contiguously")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-scheduler-steps", type=int, default=8, help="part 5: decode steps fused per call")
    ap.add_argument("--pairs", type=int, default=3,
                    help="parts 1 and 5: continuous / static and single / fused runs timed back to back")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights, activations and KV cache of every run (transformers' too)")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7], choices=[1, 2, 3, 4, 5, 6, 7],
                    help="comparisons to run (1, continuous vs static, always runs)")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "pallas", "native"],
                    help="LLM's attention_backend for every jaxinfer run (auto: as LLM resolves it)")
    ap.add_argument("--out", default=str(RESULTS / "bench_serving"), help="results path without suffix")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    common = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory_bytes=int(args.kv_cache_memory_mb * 2**20), max_model_len=1024, dtype=args.dtype,
                  block_size=args.block_size, attention_backend=args.attention_backend)
    llm = LLM(args.model, enable_prefix_caching=False, **common)
    vocab = llm.cfg.vocab_size
    results: dict = {"model": str(llm.model_dir), "args": vars(args), "device": jax.devices()[0].device_kind,
                     "attention_backend": llm.engine_config.attention_backend}
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}); model {llm.model_dir.name}: {llm.cfg.num_params() / 1e6:.1f}M params; KV budget "
          f"{llm.engine.kv_cache_bytes / 2**20:.0f} MiB = {llm.engine.num_pages} pages of "
          f"{llm.engine_config.block_size} tokens")

    # 1. continuous vs static batching, workload (a), offline
    prompts_a, params_a = mixed_workload(rng, args.num_requests, vocab)
    (outs, cont, kv_a), comp_a = measured(run_engine, llm, prompts_a, params_a)
    per_token = llm.engine.kv_cache_bytes / (llm.engine.num_pages * llm.engine_config.block_size)
    longest = max(len(p["prompt_token_ids"]) + sp.max_tokens for p, sp in zip(prompts_a, params_a))
    fit = max(1, min(args.max_num_seqs, int(llm.engine.kv_cache_bytes // (longest * per_token))))
    static_rows = 1 << (fit.bit_length() - 1)  # generate_static pads the batch to a power of two
    (static_outs, static), _ = measured(run_static, llm, prompts_a, params_a, static_rows)
    (_, static_free), _ = measured(run_static, llm, prompts_a, params_a, args.max_num_seqs)
    same = [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in static_outs]
    results["a_continuous"] = {**cont, **kv_a, **comp_a}
    results["a_static"] = {**static, "batch_size": static_rows, "row_slots": longest}
    results["a_static_unlimited"] = {**static_free, "batch_size": args.max_num_seqs,
                                     "kv_bytes_needed": int(args.max_num_seqs * longest * per_token)}
    results["a_continuous_over_static_single"] = cont["output_throughput"] / static["output_throughput"]
    pairs_static = paired_ratio(lambda: run_static(llm, prompts_a, params_a, static_rows)[1],
                                engine_run(llm, prompts_a, params_a), args.pairs)
    results["a_continuous_over_static_pairs"] = pairs_static
    results["a_continuous_over_static"] = float(np.median(pairs_static))
    results["a_continuous_over_static_unlimited"] = cont["output_throughput"] / static_free["output_throughput"]
    results["a_identical_outputs"] = same
    print("\n(a) mixed, all at once — continuous batching\n" + format_summary(cont))
    print(f"  KV usage mean {kv_a['kv_usage_mean']:.1%} max {kv_a['kv_usage_max']:.1%}; "
          f"max concurrent {kv_a['max_concurrent_seqs']}; compilations {comp_a['compilations']} "
          f"({comp_a['compiled_while_measured']} while measured)")
    print(f"(a) mixed, all at once — static batching, {static_rows} rows of {longest} slots "
          f"(the same {llm.engine.kv_cache_bytes / 2**20:.0f} MiB of KV)\n" + format_summary(static))
    print(f"(a) mixed, all at once — static batching, {args.max_num_seqs} rows, no memory limit "
          f"({results['a_static_unlimited']['kv_bytes_needed'] / 2**20:.0f} MiB of KV)\n" + format_summary(static_free))
    work = compute_bound(llm, prompts_a, params_a, results)
    print(f"  continuous / static output tok/s: {results['a_continuous_over_static']:.2f}x in the same memory "
          f"(median of back-to-back pairs {', '.join(f'{r:.2f}' for r in pairs_static)}; the single runs above: "
          f"{results['a_continuous_over_static_single']:.2f}x), "
          f"{results['a_continuous_over_static_unlimited']:.2f}x against unlimited static batches "
          f"(identical tokens: {same})")
    print(work)

    # (a) with Poisson arrivals
    gaps = rng.exponential(1.0 / args.rate, size=args.num_requests)
    arrivals = np.cumsum(gaps).tolist()
    (_, pois, kv_p), comp_p = measured(run_engine, llm, prompts_a, params_a, arrivals)
    results["a_poisson"] = {**pois, **kv_p, **comp_p, "rate": args.rate}
    print(f"\n(a) mixed, Poisson {args.rate}/s — continuous batching\n" + format_summary(pois))
    print(_compile_line(comp_p))

    # 2. prefix caching on vs off, workload (b); drawn whatever --parts says, so that the later
    # parts see the same random stream
    prompts_b, params_b = shared_prefix_workload(rng, args.num_requests, vocab)
    arrivals_b = np.cumsum(rng.exponential(1.0 / args.rate, size=args.num_requests)).tolist()
    if 2 in args.parts:
        part2(args, common, llm, results, prompts_b, params_b, arrivals_b)
    if 3 in args.parts:
        part3(args, common, llm, results, prompts_a, params_a, per_token)
    if 5 in args.parts:
        part5(args, common, llm, results, rng, prompts_a, params_a, arrivals, outs, static)
    if 6 in args.parts:
        part6(args, common, llm, results, prompts_a, params_a, outs, static_rows)
    if 7 in args.parts:
        part7(args, common, llm, results, prompts_a, params_a, arrivals, outs)
    if 4 in args.parts and not args.skip_transformers:
        part4(args, llm, results, prompts_a, params_a, cont)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"\nwrote {out.with_suffix('.json')}")


def compute_bound(llm: LLM, prompts, params, results: dict) -> str:
    """Part 1's ceiling on a compute-bound machine: the FLOPs each side does, the rates they ran
    at, and the highest continuous / static ratio the machine's best FLOP rate allows (the
    workload's useful FLOPs at that rate against the static run's measured time). Records it in
    results["a_work"]; returns the printed lines."""
    cfg, static, cont = llm.cfg, results["a_static"], results["a_continuous"]
    useful = useful_work(cfg, prompts, params)
    padded = static_work(cfg, prompts, params, static["batch_size"])
    peak = prefill_rate(llm)
    rate = {"engine": useful / cont["duration_s"], "static": padded / static["duration_s"]}
    best = max(peak, *rate.values())
    w = {"useful_gflop": useful / 1e9, "static_gflop": padded / 1e9, "prefill_gflops": peak / 1e9,
         "engine_gflops": rate["engine"] / 1e9, "static_gflops": rate["static"] / 1e9,
         "ceiling_at_static_rate": padded / useful, "ceiling": static["duration_s"] * best / useful}
    results["a_work"] = w
    return (f"  work: the requests need {w['useful_gflop']:.0f} GFLOP (each token once); the static batches ran "
            f"{w['static_gflop']:.0f} GFLOP (padding), {w['ceiling_at_static_rate']:.2f}x as much. Rates: engine "
            f"{w['engine_gflops']:.0f} GFLOP/s (useful work only), static {w['static_gflops']:.0f}, this model's "
            f"prefill at 4 x 512 tokens {w['prefill_gflops']:.0f}. At the best of these rates the useful work "
            f"takes >= {useful / best:.2f} s against static's {static['duration_s']:.2f} s: continuous / static "
            f"<= {w['ceiling']:.2f}x on this machine")


def part2(args, common, llm, results, prompts_b, params_b, arrivals_b):
    """Prefix caching on vs off, workload (b)."""
    (_, off, kv_off), comp_off = measured(run_engine, llm, prompts_b, params_b, arrivals_b)
    llm_pc = LLM(args.model, enable_prefix_caching=True, **common)
    (_, on, kv_on), comp_on = measured(run_engine, llm_pc, prompts_b, params_b, arrivals_b)
    st = llm_pc.get_stats()
    results["b_prefix_off"] = {**off, **kv_off, **comp_off}
    results["b_prefix_on"] = {**on, **kv_on, **comp_on, "hit_rate": st.prefix_cache_hit_rate}
    results["b_ttft_off_over_on"] = off["ttft_ms"]["mean"] / on["ttft_ms"]["mean"]
    print("\n(b) shared 512-token system prompt — prefix caching off\n" + format_summary(off))
    print(_compile_line(comp_off))
    print("(b) shared 512-token system prompt — prefix caching on\n" + format_summary(on))
    print(_compile_line(comp_on))
    print(f"  hit rate {st.prefix_cache_hit_rate:.1%}; mean TTFT off/on: {results['b_ttft_off_over_on']:.2f}x")


def part3(args, common, llm, results, prompts_a, params_a, per_token):
    """Paged vs contiguous: sequences that fit in the same KV memory. The budget is what a
    contiguous cache needs for --contiguous-seqs sequences of max_model_len tokens."""
    budget = int(args.contiguous_seqs * llm.max_model_len * per_token)
    big = LLM(args.model, enable_prefix_caching=False,
              **{**common, "max_num_seqs": 256, "kv_cache_memory_bytes": budget})
    (_, paged, kv_big), comp_big = measured(run_engine, big, prompts_a, params_a)
    results["kv_budget_bytes"] = budget
    results["paged_max_concurrent"] = kv_big["max_concurrent_seqs"]
    results["contiguous_max_concurrent"] = args.contiguous_seqs
    results["paged_tight_budget"] = {**paged, **kv_big, "preemptions": big.get_stats().num_preemptions, **comp_big}
    print(f"\n(3) {budget / 2**20:.1f} MiB of KV: contiguous preallocation of max_model_len={llm.max_model_len} "
          f"fits {args.contiguous_seqs} sequences; paged ran up to {kv_big['max_concurrent_seqs']} at once "
          f"({kv_big['max_concurrent_seqs'] / args.contiguous_seqs:.1f}x), KV usage mean "
          f"{kv_big['kv_usage_mean']:.0%}, preemptions {big.get_stats().num_preemptions}")


def part5(args, common, llm, results, rng, prompts_a, params_a, arrivals, outs, static):
    """Fused decode steps vs single steps, on (a): all at once, then Poisson arrivals."""
    n_fused = args.num_scheduler_steps
    fused_llm = LLM(args.model, enable_prefix_caching=False, num_scheduler_steps=n_fused, **common)
    (fused_outs, fused, kv_f), comp_f = measured(run_engine, fused_llm, prompts_a, params_a)
    ratios = paired_ratio(engine_run(llm, prompts_a, params_a), engine_run(fused_llm, prompts_a, params_a),
                          args.pairs)
    (_, fused_pois, kv_fp), comp_fp = measured(run_engine, fused_llm, prompts_a, params_a, arrivals)
    prompts_c, params_c = decode_heavy_workload(rng, args.num_requests // 2, llm.cfg.vocab_size)
    measured(run_engine, llm, prompts_c, params_c)  # warm both up (compile), then pairs
    measured(run_engine, fused_llm, prompts_c, params_c)
    ratios_c = paired_ratio(engine_run(llm, prompts_c, params_c), engine_run(fused_llm, prompts_c, params_c),
                            args.pairs)
    results["c_fused_over_single_pairs"] = ratios_c
    results["c_fused_over_single"] = float(np.median(ratios_c))
    results["a_fused"] = {**fused, **kv_f, **comp_f, "num_scheduler_steps": n_fused,
                          "fused_steps": fused_llm.get_stats().num_fused_steps}
    results["a_fused_poisson"] = {**fused_pois, **kv_fp, **comp_fp, "rate": args.rate}
    results["a_fused_over_single_pairs"] = ratios
    results["a_fused_over_single"] = float(np.median(ratios))
    results["a_fused_over_static"] = fused["output_throughput"] / static["output_throughput"]
    results["a_fused_identical_outputs"] = [o.outputs[0].token_ids for o in fused_outs] == \
        [o.outputs[0].token_ids for o in outs]
    print(f"\n(5) (a) all at once, {n_fused} decode steps fused per call\n" + format_summary(fused))
    print(f"  fused / single output tok/s: {results['a_fused_over_single']:.2f}x (median of {args.pairs} "
          f"pairs: {', '.join(f'{r:.2f}' for r in ratios)}); fused / static {results['a_fused_over_static']:.2f}x; "
          f"identical tokens: {results['a_fused_identical_outputs']}")
    print(f"(5) (a) Poisson {args.rate}/s, {n_fused} decode steps fused per call\n" + format_summary(fused_pois))
    print(f"(5) (c) decode-heavy ({args.num_requests // 2} requests, prompts U[16, 64], outputs U[128, 256]): "
          f"fused / single output tok/s {results['c_fused_over_single']:.2f}x (pairs: "
          f"{', '.join(f'{r:.2f}' for r in ratios_c)})")


def part6(args, common, llm, results, prompts_a, params_a, outs, static_rows):
    """The engine with the options that pay on a CPU against the same static batches, on (a) all
    at once: preemption by swap (a victim's K/V copied aside in host memory, which is the device's
    memory here, instead of recomputed when it resumes; it waits outside the KV budget, as in vLLM's
    swap_space), then swap with fused decode steps."""
    for key, opts in (("a_swap", {"preemption_mode": "swap"}),
                      ("a_swap_fused", {"preemption_mode": "swap", "num_scheduler_steps": args.num_scheduler_steps}),
                      ("a_swap_async", {"preemption_mode": "swap", "async_scheduling": True})):
        v = LLM(args.model, enable_prefix_caching=False, **common, **opts)
        (v_outs, summ, kv), comp = measured(run_engine, v, prompts_a, params_a)
        pairs = paired_ratio(lambda: run_static(llm, prompts_a, params_a, static_rows)[1],
                             engine_run(v, prompts_a, params_a), args.pairs)
        results[key] = {**summ, **kv, **comp, "options": opts, "over_static_pairs": pairs,
                        "over_static": float(np.median(pairs)),
                        "identical_outputs": [o.outputs[0].token_ids for o in v_outs] ==
                        [o.outputs[0].token_ids for o in outs]}
        r = results[key]
        print(f"\n(6) (a) all at once, engine with {opts}\n" + format_summary(summ))
        print(f"  / static output tok/s: {r['over_static']:.2f}x (pairs {', '.join(f'{x:.2f}' for x in pairs)}); "
              f"identical tokens: {r['identical_outputs']}")


def part7(args, common, llm, results, prompts_a, params_a, arrivals, outs):
    """Async scheduling vs synchronous steps: throughput on (a) all at once and on (c), TPOT with
    Poisson arrivals on (a), and the time per output token of one request alone."""
    asyn = LLM(args.model, enable_prefix_caching=False, async_scheduling=True, **common)
    (a_outs, summ, kv), comp = measured(run_engine, asyn, prompts_a, params_a)
    ratios = paired_ratio(engine_run(llm, prompts_a, params_a), engine_run(asyn, prompts_a, params_a), args.pairs)
    (_, pois, kv_p), comp_p = measured(run_engine, asyn, prompts_a, params_a, arrivals)
    prompts_c, params_c = decode_heavy_workload(np.random.default_rng(args.seed + 7), args.num_requests // 2,
                                                llm.cfg.vocab_size)
    measured(run_engine, llm, prompts_c, params_c)
    measured(run_engine, asyn, prompts_c, params_c)
    ratios_c = paired_ratio(engine_run(llm, prompts_c, params_c), engine_run(asyn, prompts_c, params_c), args.pairs)
    one_p, one_sp = [prompts_c[0]], [SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)]
    measured(run_engine, llm, one_p, one_sp)
    measured(run_engine, asyn, one_p, one_sp)
    # a run of one request is short (~0.3 s) and this machine's noise is not: three times the pairs
    ratios_1 = paired_ratio(engine_run(llm, one_p, one_sp), engine_run(asyn, one_p, one_sp), 3 * args.pairs)
    results["a_async"] = {**summ, **kv, **comp, "identical_outputs": [o.outputs[0].token_ids for o in a_outs] ==
                          [o.outputs[0].token_ids for o in outs]}
    results["a_async_poisson"] = {**pois, **kv_p, **comp_p, "rate": args.rate}
    results["a_async_over_sync_pairs"], results["a_async_over_sync"] = ratios, float(np.median(ratios))
    results["c_async_over_sync_pairs"], results["c_async_over_sync"] = ratios_c, float(np.median(ratios_c))
    results["one_async_over_sync_pairs"], results["one_async_over_sync"] = ratios_1, float(np.median(ratios_1))
    print("\n(7) (a) all at once, async scheduling\n" + format_summary(summ))
    print(f"  async / sync output tok/s: {results['a_async_over_sync']:.2f}x (pairs "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); identical tokens: {results['a_async']['identical_outputs']}")
    print(f"(7) (a) Poisson {args.rate}/s, async scheduling\n" + format_summary(pois))
    print(f"(7) (c) decode-heavy: async / sync output tok/s {results['c_async_over_sync']:.2f}x (pairs "
          f"{', '.join(f'{r:.2f}' for r in ratios_c)}); one request of 256 tokens alone: "
          f"{results['one_async_over_sync']:.2f}x (pairs {', '.join(f'{r:.2f}' for r in ratios_1)})")


def part4(args, llm, results, prompts_a, params_a, cont):
    """The engine vs transformers' static batches on (a)."""
    hf = run_transformers(llm.model_dir, prompts_a, params_a, args.max_num_seqs, args.dtype)
    results["a_transformers"] = hf
    results["a_engine_over_transformers"] = cont["output_throughput"] / hf["output_throughput"]
    print(f"\n(4) transformers generate, static batches of {args.max_num_seqs}: "
          f"{hf['output_throughput']:.1f} out tok/s; engine {cont['output_throughput']:.1f} "
          f"({results['a_engine_over_transformers']:.2f}x)")


def _compile_line(c: dict) -> str:
    again = f", measured {c['measured_attempts']} times" if c.get("measured_attempts", 1) > 1 else ""
    return (f"  compilations {c['compilations']} ({c['compiled_while_measured']} while measured, after "
            f"{c['warmup_passes']} warm-up passes{again})")


def _compiled(s: dict) -> str:
    if "compilations" not in s:
        return "-"
    return f"{s['compilations']} (+{s['compiled_while_measured']})"


def markdown(results: dict) -> str:
    """The results table. Static batches return every token at the end of the batch: no TPOT/ITL."""
    md = ["| run | out tok/s | req/s | TTFT p50/p95/p99 ms | TPOT p50/p95/p99 ms | E2EL p50/p95/p99 ms "
          "| KV usage mean/max | max running | compilations |",
          "|---|---|---|---|---|---|---|---|---|"]
    for key in ("a_continuous", "a_fused", "a_swap", "a_swap_fused", "a_swap_async", "a_async", "a_static",
                "a_static_unlimited", "a_poisson", "a_fused_poisson", "a_async_poisson",
                "b_prefix_off", "b_prefix_on"):
        if key not in results:
            continue
        s = results[key]
        cells = ["/".join(f"{s[m][p]:.0f}" for p in ("median", "p95", "p99")) for m in ("ttft_ms", "tpot_ms", "e2el_ms")]
        if key.startswith("a_static"):
            cells[1] = "-"
        kv = f"{s['kv_usage_mean']:.0%}/{s['kv_usage_max']:.0%}" if "kv_usage_mean" in s else "-"
        running = s.get("max_concurrent_seqs", s.get("batch_size", "-"))
        md.append(f"| {key} | {s['output_throughput']:.1f} | {s['request_throughput']:.2f} | " + " | ".join(cells)
                  + f" | {kv} | {running} | {_compiled(s)} |")
    a = results["args"]
    md += ["", f"{results.get('device', 'cpu')}, {a.get('dtype', 'float32')}, attention "
           f"{results.get('attention_backend', a.get('attention_backend', 'xla'))}; {a['num_requests']} requests per workload, seed {a['seed']}, "
           f"max_num_seqs {a['max_num_seqs']}, "
           f"max_num_batched_tokens {a['max_num_batched_tokens']}, {a['kv_cache_memory_mb']:.0f} MiB of KV. "
           "Compilations: the engine's jitted programs after the run (cumulative within one LLM; "
           "+n: compiled during the measured run, after warm-up passes that stop once one compiles nothing "
           "new, at most 3; a measured run that compiled is run again, at most 3 times in all).", "",
           f"- continuous / static output throughput: {results['a_continuous_over_static']:.2f}x in the same KV "
           f"memory ({results['a_static']['batch_size']} static rows of {results['a_static']['row_slots']} slots; "
           "median of back-to-back pairs: "
           f"{', '.join(f'{r:.2f}' for r in results['a_continuous_over_static_pairs'])}; the table's single runs: "
           f"{results['a_continuous_over_static_single']:.2f}x), "
           f"{results['a_continuous_over_static_unlimited']:.2f}x against static batches of "
           f"{results['a_static_unlimited']['batch_size']} with no memory limit "
           f"({results['a_static_unlimited']['kv_bytes_needed'] / 2**20:.0f} MiB); identical tokens: "
           f"{results['a_identical_outputs']}",
           *([(f"- compute bound (FLOPs counted from the model's shapes): the requests need "
              f"{w['useful_gflop']:.0f} GFLOP, the static batches ran {w['static_gflop']:.0f} "
              f"({w['ceiling_at_static_rate']:.2f}x, padding); engine {w['engine_gflops']:.0f} GFLOP/s of useful "
              f"work, static {w['static_gflops']:.0f}, prefill of 4 x 512 tokens {w['prefill_gflops']:.0f}: at the "
              f"best of these rates no scheduler passes {w['ceiling']:.2f}x static here")]
             if (w := results.get("a_work")) else []),
           *(["- engine options that pay on a CPU / static, output throughput (median of back-to-back pairs): "
              + "; ".join(f"{k} ({', '.join(f'{o}={v}' for o, v in results[k]['options'].items())}) "
                          f"{results[k]['over_static']:.2f}x ({', '.join(f'{r:.2f}' for r in results[k]['over_static_pairs'])}; "
                          f"{results[k]['preemptions']} preemptions, identical tokens: {results[k]['identical_outputs']})"
                          for k in ("a_swap", "a_swap_fused", "a_swap_async") if k in results)
              + f"; a_continuous: {results['a_continuous']['preemptions']} preemptions by recompute"]
             if "a_swap" in results else []),
           *([f"- {results['a_fused']['num_scheduler_steps']} decode steps fused per call (a_fused, "
              f"`num_scheduler_steps`) / single steps, output throughput: {results['a_fused_over_single']:.2f}x "
              f"(median of back-to-back pairs: {', '.join(f'{r:.2f}' for r in results['a_fused_over_single_pairs'])}); "
              f"fused / static {results['a_fused_over_static']:.2f}x; identical tokens: "
              f"{results['a_fused_identical_outputs']}; on decode-heavy workload (c) "
              f"{results['c_fused_over_single']:.2f}x (pairs: "
              f"{', '.join(f'{r:.2f}' for r in results['c_fused_over_single_pairs'])})"]
             if "a_fused" in results else []),
           *([(f"- async scheduling (a_async, `async_scheduling=True`) / synchronous steps, output throughput "
               f"(median of back-to-back pairs): (a) {results['a_async_over_sync']:.2f}x "
               f"({', '.join(f'{r:.2f}' for r in results['a_async_over_sync_pairs'])}), (c) decode-heavy "
               f"{results['c_async_over_sync']:.2f}x "
               f"({', '.join(f'{r:.2f}' for r in results['c_async_over_sync_pairs'])}), "
               f"one request alone {results['one_async_over_sync']:.2f}x "
               f"({', '.join(f'{r:.2f}' for r in results['one_async_over_sync_pairs'])}); identical tokens: "
               f"{results['a_async']['identical_outputs']}")] if "a_async" in results else []),
           *([f"- prefix caching, mean TTFT off / on: {results['b_ttft_off_over_on']:.2f}x "
              f"(hit rate {results['b_prefix_on']['hit_rate']:.1%})"] if "b_prefix_on" in results else []),
           *([f"- paged / contiguous max-length preallocation, concurrent sequences in "
              f"{results['kv_budget_bytes'] / 2**20:.0f} MiB: {results['paged_max_concurrent']} / "
              f"{results['contiguous_max_concurrent']} (preemptions "
              f"{results['paged_tight_budget']['preemptions']})"] if "paged_tight_budget" in results else [])]
    if "a_transformers" in results:
        md.append(f"- engine / transformers `generate` (static batches of {a['max_num_seqs']}) output throughput: "
                  f"{results['a_engine_over_transformers']:.2f}x "
                  f"({results['a_continuous']['output_throughput']:.1f} vs "
                  f"{results['a_transformers']['output_throughput']:.1f} tok/s)")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
