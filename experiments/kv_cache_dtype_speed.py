"""Serving throughput per KV cache format: the engine on the embedded target, side by side in one run.

For each (model dtype, kv_cache_dtype) the same offline batch of requests (greedy, fixed output
length) runs through `LLM.generate` on the continuous-batching engine with the same KV memory
budget; the table reports output tokens/s (best of --repeats passes after a warm-up pass), the
ratio to the float32 / auto row, and how many tokens the budget holds. Quality is
kv_quant_quality.py's job; this is the time a format costs or saves on this backend.

    python experiments/kv_cache_dtype_speed.py [--requests 32] [--max-tokens 96] [--repeats 2]

Writes experiments/results/kv_cache_dtype_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from jaxinfer import LLM, SamplingParams

RESULTS = Path(__file__).parent / "results"
RUNS = [("float32", "auto"), ("bfloat16", "auto"), ("float32", "fp8"), ("float32", "int8"),
        ("float32", "int4"), ("float32", "nvfp4"), ("bfloat16", "fp8"), ("bfloat16", "int8")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-cache-memory-mb", type=float, default=32.0)
    args = ap.parse_args()

    prompts = [f"def task_{i}(items, key=None):\n    " for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for dtype, kv_dtype in RUNS:
        llm = LLM(args.model, dtype=dtype, kv_cache_dtype=kv_dtype,
                  kv_cache_memory_bytes=int(args.kv_cache_memory_mb * 2**20), max_num_seqs=args.requests)
        llm.generate(prompts, params)  # compile
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"dtype": dtype, "kv_cache_dtype": kv_dtype, "tok_s": tokens / best,
                     "kv_tokens": llm.engine.num_pages * llm.engine_config.block_size})
        print(f"{dtype:9s} kv={kv_dtype:6s} {rows[-1]['tok_s']:8.1f} out tok/s   "
              f"KV holds {rows[-1]['kv_tokens']} tokens", flush=True)
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_float32_auto"] = r["tok_s"] / base

    RESULTS.mkdir(exist_ok=True)
    meta = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
            "kv_cache_memory_mb": args.kv_cache_memory_mb, "backend": jax.default_backend(),
            "machine": platform.processor() or platform.machine()}
    (RESULTS / "kv_cache_dtype_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = [f"Engine output tokens/s per KV cache format ({args.model}, {meta['backend']}, {meta['machine']}): "
          f"{args.requests} greedy requests x {args.max_tokens} tokens, all at once, "
          f"{args.kv_cache_memory_mb:.0f} MiB of KV, best of {args.repeats} passes. "
          "`python experiments/kv_cache_dtype_speed.py`", "",
          "| dtype | kv_cache_dtype | out tok/s | vs float32 / auto | tokens the KV budget holds |",
          "|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['kv_cache_dtype']} | {r['tok_s']:.1f} | {r['vs_float32_auto']:.2f}x "
           f"| {r['kv_tokens']} |" for r in rows]
    (RESULTS / "kv_cache_dtype_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
