"""Time to first token with prefill attention on XLA against the native kernel, in one run.

Since stop 51 the "native" attention backend (what "auto" picks on a CPU where the kernels build)
takes prefill-wide calls too, its work split into 32-token chunks so that one prompt keeps every
thread busy; before, prompts wider than 16 tokens went to XLA's attention. This measures what that
buys a single request's TTFT on the embedded target: for each prompt length, one request
generates one token, through the engine (`LLM.generate`: paged KV, chunked prefill of
--max-num-batched-tokens tokens a step, prefix caching off so that every pass prefills) and through
`LLM.generate_static` (one contiguous-cache prefill), with attention_backend "xla" and "native" in
the same process, taking turns. Reported: each side's median time and the median of the rounds'
xla / native ratios, and whether the two backends' first tokens agree.

    python experiments/prefill_attention_cost.py   # writes experiments/results/prefill_attention_cost.{md,json}
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from pathlib import Path

import numpy as np
from report import paired, write_report

from jaxinfer import LLM, SamplingParams

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("xla", "native")


def first_token(llm: LLM, prompt: list[int], path: str) -> int:
    """The first token of one request generating one token along `path`."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    reqs = [{"prompt_token_ids": prompt}]
    out = llm.generate(reqs, params) if path == "engine" else llm.generate_static(reqs, params, batch_size=1)
    return out[0].outputs[0].token_ids[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 192, 512, 1024])
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "prefill_attention_cost"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    # Distinct cache sizes: programs are not shared between the two LLMs of this process.
    llms = {b: LLM(args.model, attention_backend=b, enable_prefix_caching=False, num_kv_pages=512 + 8 * i,
                   max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=4)
            for i, b in enumerate(BACKENDS)}
    if llms["native"].engine_config.attention_backend != "native":
        raise SystemExit("the native kernels are unavailable here: nothing to compare")
    rng = np.random.default_rng(0)
    vocab = llms["xla"].cfg.vocab_size
    rows = []
    for path in ("engine", "static"):
        for n in args.lengths:
            prompt = rng.integers(3, vocab, size=n).tolist()
            tokens = {b: first_token(llm, prompt, path) for b, llm in llms.items()}  # compiles
            ratios, native_secs, _ = paired(functools.partial(first_token, llms["xla"], prompt, path),
                                            functools.partial(first_token, llms["native"], prompt, path),
                                            args.repeats, warmup=False)
            ratios = np.array(ratios)
            xla_secs = ratios * np.array(native_secs)
            row = {"path": path, "prompt_tokens": n, "xla_ms": 1e3 * float(np.median(xla_secs)),
                   "native_ms": 1e3 * float(np.median(native_secs)), "xla_over_native": float(np.median(ratios)),
                   "round_ratios": [round(float(x), 3) for x in ratios],
                   "same_first_token": tokens["xla"] == tokens["native"]}
            rows.append(row)
            print(row, flush=True)
    header = (f"# Prefill attention: XLA vs the native kernel, time to first token on {args.model}\n\n"
              f"`python experiments/prefill_attention_cost.py` — {platform.machine()}, "
              f"{time.perf_counter() - t0:.0f} s; dtype {llms['xla'].dtype}. One request, one output token, "
              f"greedy; engine: chunked prefill of up to {args.max_num_batched_tokens} tokens a step, prefix "
              f"caching off; static: `generate_static`, batch 1. Medians of {args.repeats} rounds, the backends "
              "taking turns (`report.paired`); xla / native: median of the rounds' ratios.\n\n")
    lines = ["| path | prompt tokens | xla ms | native ms | xla / native | same first token |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['prompt_tokens']} | {r['xla_ms']:.1f} | {r['native_ms']:.1f} | "
              f"{r['xla_over_native']:.2f}x | {r['same_first_token']} |" for r in rows]
    write_report(args.out, header + "\n".join(lines) + "\n", [{"model": args.model}] + rows)


if __name__ == "__main__":
    main()
