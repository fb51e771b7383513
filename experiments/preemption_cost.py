"""Preemption by recompute vs by swap, on bench_serving's workload (a) in tight KV budgets.

When the pages run out, the engine preempts the newest running request. By recompute (vLLM's
default) its prompt and output so far run through the model again when it resumes; by swap its
K/V is copied to the host and written back into fresh pages. For each KV budget, both modes
serve the same 64 requests (all at once, greedy, prefix caching off so that nothing is saved by
the cache instead) in alternating runs; reported: output tokens/s (median), preemptions, tokens
run through the model, and the median of the pairs' swap / recompute throughput ratios. Outputs
must be token-identical between the modes.

    python experiments/preemption_cost.py   # writes experiments/results/preemption_cost.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from bench_serving import mixed_workload
from report import write_report

from jaxinfer import LLM

RESULTS = Path(__file__).parent / "results"


def serve(llm: LLM, prompts, params):
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets-mib", type=float, nargs="+", default=[12, 24, 48])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "preemption_cost"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for mib in args.budgets_mib:
        llms = {mode: LLM(dtype="float32", kv_cache_memory_bytes=int(mib * 2**20), enable_prefix_caching=False,
                          max_num_batched_tokens=512, preemption_mode=mode) for mode in ("recompute", "swap")}
        prompts, params = mixed_workload(np.random.default_rng(0), args.num_requests, llms["swap"].cfg.vocab_size)
        res = {mode: dict(secs=[], before=None) for mode in llms}
        for llm in llms.values():  # warm up: compile every program the schedule needs
            serve(llm, prompts, params)
        tokens = {}
        for _ in range(args.repeats):
            for mode, llm in llms.items():
                before = llm.get_stats()
                secs, tokens[mode] = serve(llm, prompts, params)
                after = llm.get_stats()
                res[mode]["secs"].append(secs)
                res[mode]["preemptions"] = after.num_preemptions - before.num_preemptions
                res[mode]["computed"] = after.num_tokens_computed - before.num_tokens_computed
        n_out = sum(len(t) for t in tokens["swap"])
        ratios = np.array(res["recompute"]["secs"]) / np.array(res["swap"]["secs"])
        row = dict(kv_mib=mib, num_pages=llms["swap"].engine.num_pages, output_tokens=n_out,
                   identical=tokens["swap"] == tokens["recompute"],
                   swap_vs_recompute=float(np.median(ratios)), pair_ratios=[round(float(r), 3) for r in ratios])
        for mode in llms:
            row[mode] = dict(tok_s=n_out / float(np.median(res[mode]["secs"])), preemptions=res[mode]["preemptions"],
                             tokens_computed=res[mode]["computed"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = (f"# Preemption by recompute vs swap on stdlib-target (float32)\n\n`python experiments/preemption_cost.py`"
              f" — {platform.machine()}, {time.perf_counter() - t0:.0f} s. bench_serving's workload (a): "
              f"{args.num_requests} requests at once, prompts U[16, 384], outputs U[8, 256], greedy; prefix caching "
              f"off; tok/s: medians of {args.repeats} runs per mode, alternating; swap / recompute: median of the "
              "pairs' throughput ratios (each pair's in brackets); tokens computed: tokens run through the model in "
              "one pass (prompts + outputs fed back + recomputation).\n\n")
    lines = ["| KV MiB (pages) | recompute tok/s | swap tok/s | swap / recompute | preemptions (r / s) | "
             "tokens computed (r / s) | identical |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rc, sw = r["recompute"], r["swap"]
        lines.append(f"| {r['kv_mib']:g} ({r['num_pages']}) | {rc['tok_s']:.1f} | {sw['tok_s']:.1f} | "
                     f"{r['swap_vs_recompute']:.2f}x ({', '.join(map(str, r['pair_ratios']))}) | "
                     f"{rc['preemptions']} / {sw['preemptions']} | {rc['tokens_computed']} / {sw['tokens_computed']} | "
                     f"{r['identical']} |")
    write_report(args.out, header + "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
