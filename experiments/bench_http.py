"""What serving over HTTP costs: the OpenAI-compatible server vs the engine in process.

The same requests (bench_serving's workload (a): random-token prompts U[16, 384], outputs
U[8, 256], greedy, EOS ignored), on the same LLM and compiled programs, with the same arrival
times (all at once, and Poisson at --rate requests/s):
- in process: `bench_serving.run_engine`, times taken by the engine (vLLM's definitions);
- over HTTP: a client process (experiments/http_load.py, as `vllm bench serve` is one) posts each
  request to /v1/completions with "stream": true from its own thread, and times what it receives:
  TTFT = first text event - send, E2EL = [DONE] - send, TPOT = (E2EL - TTFT) / (output tokens - 1), the output tokens from the
  stream's usage chunk; ITL = gaps between text events.
Both modes alternate --pairs times; the table gives the medians of the runs, the ratio column the
median of the pairs' throughput ratios (HTTP / in process), and whether the texts are identical.
Writes experiments/results/bench_http.{md,json}.

    python experiments/bench_http.py [--num-requests 48] [--rate 4] [--pairs 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import mixed_workload, run_engine
from report import write_report

from jaxinfer import LLM
from jaxinfer.engine.metrics import distribution
from jaxinfer.server import OpenAIServer

RESULTS = Path(__file__).parent / "results"


def run_http(port: int, prompts, params, arrivals) -> tuple[dict, list[str]]:
    """Stream every request at its arrival offset from a separate client process
    (experiments/http_load.py); metrics as the clients see them."""
    bodies = [{"prompt": pr["prompt_token_ids"], "max_tokens": p.max_tokens, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for pr, p in zip(prompts, params)]
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "requests.json", Path(tmp) / "results.json"
        spec.write_text(json.dumps({"url": f"http://127.0.0.1:{port}/v1/completions", "bodies": bodies,
                                    "arrivals": list(arrivals)}))
        subprocess.run([sys.executable, str(Path(__file__).parent / "http_load.py"), str(spec), str(out)],
                       check=True, timeout=1800)
        result = json.loads(out.read_text())
    failed = [r["error"] for r in result["records"] if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed over HTTP, e.g. {failed[0]}")
    records = [(r["sent"], r["events"], r["end"], r["usage"], r["text"]) for r in result["records"]]
    duration = result["end"] - result["start"]
    ttft = [ev[0] - s for s, ev, _, _, _ in records if ev]
    e2el = [end - s for s, _, end, _, _ in records]
    tpot = [(end - ev[0]) / (u["completion_tokens"] - 1) for s, ev, end, u, _ in records
            if ev and u["completion_tokens"] > 1]
    itl = [b - a for _, ev, _, _, _ in records for a, b in itertools.pairwise(ev)]
    n_out = sum(u["completion_tokens"] for _, _, _, u, _ in records)
    summary = {"duration_s": duration, "output_throughput": n_out / duration,
               "request_throughput": len(prompts) / duration, "total_output_tokens": n_out,
               "ttft_ms": distribution(ttft), "tpot_ms": distribution(tpot), "itl_ms": distribution(itl),
               "e2el_ms": distribution(e2el)}
    return summary, [r[4] for r in records]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stdlib-target")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-warmup", type=int, default=8,
                   help="warm-up rounds (both modes) per load, until one compiles nothing new")
    p.add_argument("--out", default=str(RESULTS / "bench_http"))
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=64, max_num_batched_tokens=512,
              kv_cache_memory_bytes=64 << 20, max_model_len=1024, enable_prefix_caching=False)
    prompts, params = mixed_workload(rng, args.num_requests, llm.cfg.vocab_size)
    loads = {"all at once": [0.0] * len(prompts),
             f"Poisson {args.rate:g}/s": np.cumsum(rng.exponential(1.0 / args.rate, size=len(prompts))).tolist()}
    run_engine(llm, prompts, params)  # compile outside the clock (the server shares these programs)
    server = OpenAIServer(llm, port=0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows, t_start = [], time.time()
    try:
        for load, arrivals in loads.items():
            runs = {"in process": [], "HTTP": []}
            ratios, same = [], True
            for _ in range(args.max_warmup):  # warm-up until a round of both modes compiles nothing new
                before = llm.engine.runner.compilations
                run_http(port, prompts, params, arrivals)
                server.worker.call(lambda a=arrivals: run_engine(llm, prompts, params, a))
                if llm.engine.runner.compilations == before:
                    break
            compiled = llm.engine.runner.compilations
            for i in range(args.pairs):
                pair = {}
                for mode in (("in process", "HTTP") if i % 2 == 0 else ("HTTP", "in process")):
                    if mode == "HTTP":
                        summary, texts = run_http(port, prompts, params, arrivals)
                    else:  # on the server's engine thread, which nothing else uses meanwhile
                        outs, summary, _ = server.worker.call(lambda a=arrivals: run_engine(llm, prompts, params, a))
                        ref = [o.outputs[0].text for o in outs]
                    runs[mode].append(summary)
                    pair[mode] = summary["output_throughput"]
                ratios.append(pair["HTTP"] / pair["in process"])
                same &= texts == ref
            compiled = llm.engine.runner.compilations - compiled
            for mode, summaries in runs.items():
                def med(key, q, summaries=summaries):
                    return float(np.median([s[key][q] for s in summaries]))
                rows.append({"load": load, "mode": mode, "compiled_while_measured": compiled,
                             "output_throughput": float(np.median([s["output_throughput"] for s in summaries])),
                             **{f"{k}_{q}": med(f"{k}_ms", q) for k in ("ttft", "tpot", "e2el")
                                for q in ("median", "p95", "p99")},
                             "http_over_in_process": float(np.median(ratios)) if mode == "HTTP" else None,
                             "pair_ratios": [round(r, 3) for r in ratios] if mode == "HTTP" else None,
                             "identical_text": same if mode == "HTTP" else None})
            print(f"{load}: HTTP / in process output tok/s {np.median(ratios):.3f} (pairs "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}); identical text: {same}; compiled while measured: "
                  f"{compiled}", flush=True)
    finally:
        server.shutdown()
        server.server_close()

    command = f"python experiments/bench_http.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    note = (f"`{command}` — {platform.machine()}, {time.time() - t_start:.0f} s. bench_serving's workload (a), "
            f"{args.num_requests} requests, greedy; the same LLM and compiled programs for both modes (warm-up "
            f"rounds of both per load until one compiles nothing new, at most {args.max_warmup}); medians of "
            f"{args.pairs} runs per mode, alternating; HTTP / in process: median of the pairs' output-throughput "
            "ratios. In process: the engine's timestamps; HTTP: the streaming clients' (TTFT to the first text "
            "event, TPOT over the usage chunk's token count).")
    header = ("| load | mode | out tok/s | compiled while measured | TTFT p50/p95/p99 ms | TPOT p50/p95/p99 ms "
              "| E2EL p50/p95/p99 ms | HTTP / in process | identical text |")
    lines = [f"# Serving over HTTP vs in process ({args.model}, {args.dtype})", "", note, "", header,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def trip(k, r=r):
            return "/".join(f"{r[f'{k}_{q}']:.0f}" for q in ("median", "p95", "p99"))
        ratio = "" if r["http_over_in_process"] is None else \
            f"{r['http_over_in_process']:.3f}x ({', '.join(map(str, r['pair_ratios']))})"
        lines.append(f"| {r['load']} | {r['mode']} | {r['output_throughput']:.1f} | {r['compiled_while_measured']} "
                     f"| {trip('ttft')} | {trip('tpot')} "
                     f"| {trip('e2el')} | {ratio} | {'' if r['identical_text'] is None else r['identical_text']} |")
    write_report(args.out, "\n".join(lines) + "\n", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
