"""What priority scheduling buys urgent requests under load: the mixed serving workload of
`bench_serving.py` (prompts U[16, 384], outputs U[8, 256], random tokens) arriving as a Poisson
stream faster than the engine serves it, a quarter of the requests urgent (priority 0, the rest 1),
served by the same engine with scheduling_policy "fcfs" and "priority" in alternation (--repeats
runs each). Reported per class: TTFT and E2EL p50 / p95 (medians over the runs), and the output
throughput of the whole run. Greedy tokens are checked identical under both policies.

    python experiments/priority_scheduling.py    # writes experiments/results/priority_scheduling.{md,json}
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import jax
import numpy as np
from bench_serving import mixed_workload, run_engine
from report import write_report

from jaxinfer import LLM
from jaxinfer.engine.metrics import summarize

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second (above capacity)")
    ap.add_argument("--urgent-share", type=float, default=0.25)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "priority_scheduling"))
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    common = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "max_model_len": 1024, "dtype": "float32", "enable_prefix_caching": False}
    llms = {p: LLM(args.model, scheduling_policy=p, **common) for p in ("fcfs", "priority")}
    prompts, params = mixed_workload(rng, args.num_requests, llms["fcfs"].cfg.vocab_size)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=args.num_requests)).tolist()
    urgent = rng.random(args.num_requests) < args.urgent_share
    priority = [0 if u else 1 for u in urgent]

    def serve(policy, at):
        outs, summary, _ = run_engine(llms[policy], prompts, params, at, priority if policy == "priority" else None)
        return outs, summary["duration_s"]

    for policy in llms:  # compile what the workload needs
        serve(policy, [0.0] * len(prompts))

    runs: dict[str, list] = {p: [] for p in llms}
    tokens = {}
    for r in range(args.repeats):
        for policy in (("fcfs", "priority") if r % 2 == 0 else ("priority", "fcfs")):
            outs, secs = serve(policy, arrivals)
            tokens[policy] = [o.outputs[0].token_ids for o in outs]
            row = {"output_throughput": summarize(outs, secs)["output_throughput"]}
            for cls, mask in (("urgent", urgent), ("normal", ~urgent)):
                s = summarize([o for o, m in zip(outs, mask) if m], secs)
                row[cls] = {k: {q: s[f"{k}_ms"][q] for q in ("median", "p95")} for k in ("ttft", "e2el")}
            runs[policy].append(row)
            print(policy, row, flush=True)

    def med(policy, *path):
        vals = []
        for row in runs[policy]:
            v = row
            for key in path:
                v = v[key]
            vals.append(v)
        return float(np.median(vals))

    rows = [{"policy": p, "runs": runs[p]} for p in llms]
    lines = [f"# Priority scheduling under load ({args.model}, float32)", "",
             (f"`python experiments/priority_scheduling.py` -- {platform.machine()}, jax {jax.__version__}; "
              f"{args.num_requests} requests of bench_serving's mixed workload arriving at {args.rate:g}/s (Poisson), "
              f"{int(urgent.sum())} of them urgent (priority 0, the rest 1); max_num_seqs {args.max_num_seqs}, "
              f"max_num_batched_tokens {args.max_num_batched_tokens}; medians over {args.repeats} runs per policy, "
              "run in alternation. ms."), "",
             ("| policy | urgent TTFT p50 / p95 | urgent E2EL p50 / p95 | normal TTFT p50 / p95 | "
              "normal E2EL p50 / p95 | output tok/s |"),
             "|---|---|---|---|---|---|"]
    for p in llms:
        cells = [f"{med(p, c, k, 'median'):.0f} / {med(p, c, k, 'p95'):.0f}"
                 for c in ("urgent", "normal") for k in ("ttft", "e2el")]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {med(p, 'output_throughput'):.0f} |")
    gain = med("fcfs", "urgent", "ttft", "median") / med("priority", "urgent", "ttft", "median")
    lines += ["", f"- urgent requests' median TTFT, fcfs / priority: {gain:.1f}x",
              f"- greedy tokens identical under both policies: {tokens['fcfs'] == tokens['priority']}"]
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
