"""The engine's shape grid: "fine" (4 sizes per doubling) against "pow2" (powers of two).

Every distinct (rows, tokens, page-table width) of an engine call is a compiled program; the grid
decides how many there are and how much padding each call computes. For each grid, a fresh LLM on
stdlib-target serves a sweep of batches (n requests at once, for each n in --batches; prompts of
U[16, 160] tokens, --max-tokens new tokens each, greedy): reported are the programs it compiled
and the sweep's wall time while compiling (warm-up), then each batch's time once warm, the two
grids alternating, and their ratio (median of --repeats pairs). Outputs must be token-identical.

    python experiments/shape_buckets_cost.py   # writes experiments/results/shape_buckets_cost.{md,json}
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from report import write_report

from jaxinfer import LLM, SamplingParams
from jaxinfer.generate import SHAPE_BUCKETS, shape_bucket

RESULTS = Path(__file__).parent / "results"


def serve(llm: LLM, prompts, params) -> tuple[float, list]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 5, 6, 7, 9, 12, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "shape_buckets_cost"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    # Distinct cache sizes: programs are not shared between the two LLMs of this process.
    llms = {g: LLM(args.model, shape_buckets=g, num_kv_pages=1024 + 8 * i, max_num_seqs=max(args.batches))
            for i, g in enumerate(SHAPE_BUCKETS)}
    rng = np.random.default_rng(0)
    vocab = llms["fine"].cfg.vocab_size
    work = {n: [{"prompt_token_ids": rng.integers(3, vocab, size=int(rng.integers(16, 161))).tolist()}
                for _ in range(n)] for n in args.batches}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    warm = {}
    outputs = {}
    for g, llm in llms.items():
        t = time.perf_counter()
        outputs[g] = [serve(llm, work[n], params)[1] for n in args.batches]
        warm[g] = {"seconds": time.perf_counter() - t, "programs": llm.engine.runner.compilations}
    identical = outputs["fine"] == outputs["pow2"]
    rows = []
    for n in args.batches:
        secs = {g: [] for g in llms}
        for r in range(args.repeats):
            for g in (SHAPE_BUCKETS if r % 2 == 0 else SHAPE_BUCKETS[::-1]):
                secs[g].append(serve(llms[g], work[n], params)[0])
        ratios = np.array(secs["pow2"]) / np.array(secs["fine"])
        row = {"requests": n, "rows": {g: shape_bucket(n, 1, g) for g in SHAPE_BUCKETS},
               "seconds": {g: float(np.median(secs[g])) for g in SHAPE_BUCKETS},
               "pow2_over_fine": float(np.median(ratios)), "pair_ratios": [round(float(x), 3) for x in ratios]}
        rows.append(row)
        print(row, flush=True)
    header = (f"# Engine shape grid: fine vs pow2 on {args.model}\n\n`python experiments/shape_buckets_cost.py` — "
              f"{platform.machine()}, {time.perf_counter() - t0:.0f} s. Batches of n requests at once "
              f"(n in {args.batches}), prompts U[16, 160] tokens, {args.max_tokens} new tokens, greedy; outputs "
              f"identical between the grids: {identical}.\n\n"
              f"Warm-up (the whole sweep, compiling as it goes): fine {warm['fine']['seconds']:.1f} s, "
              f"{warm['fine']['programs']} programs; pow2 {warm['pow2']['seconds']:.1f} s, "
              f"{warm['pow2']['programs']} programs.\n\n"
              f"Warm, per batch (median of {args.repeats}, alternating; pow2 / fine: median of the pairs' ratios):\n\n")
    lines = ["| requests | rows fine / pow2 | fine s | pow2 s | pow2 / fine |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['requests']} | {r['rows']['fine']} / {r['rows']['pow2']} | {r['seconds']['fine']:.3f} | "
                     f"{r['seconds']['pow2']:.3f} | {r['pow2_over_fine']:.3f} ({', '.join(map(str, r['pair_ratios']))}) |")
    write_report(args.out, header + "\n".join(lines) + "\n",
                 [{"warmup": warm, "identical": identical, "model": args.model}] + rows)


if __name__ == "__main__":
    main()
