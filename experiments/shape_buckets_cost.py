"""The engine's shape grid: "fine" (4 sizes per doubling) against "pow2" (powers of two) and "slots"
(pow2, and every decode call has max_num_seqs rows).

Every distinct (rows, tokens, page-table width) of an engine call is a compiled program; the grid
decides how many there are and how much padding each call computes. For each grid, a fresh LLM on
stdlib-target serves a sweep of batches (n requests at once, for each n in --batches; prompts of
U[16, 160] tokens, --max-tokens new tokens each, greedy): reported are the programs it compiled
and the sweep's wall time while compiling (warm-up), then each batch's time once warm, the
grids taking turns, and each grid's time over fine's (median of --repeats rounds). Outputs must be
token-identical.

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
    # Distinct cache sizes: programs are not shared between the LLMs of this process.
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
    identical = all(outputs[g] == outputs["fine"] for g in SHAPE_BUCKETS)
    others = [g for g in SHAPE_BUCKETS if g != "fine"]
    slots = max(args.batches)  # max_num_seqs: a decode call's rows on the slots grid
    rows = []
    for n in args.batches:
        secs = {g: [] for g in llms}
        for r in range(args.repeats):
            order = SHAPE_BUCKETS[r % len(SHAPE_BUCKETS):] + SHAPE_BUCKETS[:r % len(SHAPE_BUCKETS)]
            for g in (order if r % 2 == 0 else order[::-1]):
                secs[g].append(serve(llms[g], work[n], params)[0])
        row = {"requests": n,
               "decode_rows": {g: slots if g == "slots" else shape_bucket(n, 1, g) for g in SHAPE_BUCKETS},
               "seconds": {g: float(np.median(secs[g])) for g in SHAPE_BUCKETS},
               "over_fine": {g: float(np.median(np.array(secs[g]) / np.array(secs["fine"]))) for g in others},
               "round_ratios": {g: [round(float(x), 3) for x in np.array(secs[g]) / np.array(secs["fine"])]
                                for g in others}}
        rows.append(row)
        print(row, flush=True)
    header = (f"# Engine shape grids on {args.model}: {', '.join(SHAPE_BUCKETS)}\n\n"
              f"`python experiments/shape_buckets_cost.py` — {platform.machine()}, {time.perf_counter() - t0:.0f} s. "
              f"Batches of n requests at once (n in {args.batches}; max_num_seqs {slots}), prompts U[16, 160] tokens, "
              f"{args.max_tokens} new tokens, greedy; outputs identical between the grids: {identical}.\n\n"
              "Warm-up (the whole sweep, compiling as it goes): "
              + "; ".join(f"{g} {warm[g]['seconds']:.1f} s, {warm[g]['programs']} programs" for g in SHAPE_BUCKETS)
              + f".\n\nWarm, per batch (median of {args.repeats} rounds, the grids taking turns; grid / fine: "
              "median of the rounds' ratios, each round's in brackets):\n\n")
    lines = [f"| requests | decode rows ({' / '.join(SHAPE_BUCKETS)}) | "
             + " | ".join(f"{g} s" for g in SHAPE_BUCKETS) + " | " + " | ".join(f"{g} / fine" for g in others) + " |",
             "|---" * (2 + len(SHAPE_BUCKETS) + len(others)) + "|"]
    for r in rows:
        lines.append(f"| {r['requests']} | {' / '.join(str(r['decode_rows'][g]) for g in SHAPE_BUCKETS)} | "
                     + " | ".join(f"{r['seconds'][g]:.3f}" for g in SHAPE_BUCKETS) + " | "
                     + " | ".join(f"{r['over_fine'][g]:.3f} ({', '.join(map(str, r['round_ratios'][g]))})"
                                  for g in others) + " |")
    write_report(args.out, header + "\n".join(lines) + "\n",
                 [{"warmup": warm, "identical": identical, "model": args.model}] + rows)


if __name__ == "__main__":
    main()
