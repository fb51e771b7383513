"""What sampling features cost: output tokens/s of the engine and of static batching on the
embedded target with each SamplingParams setting, against plain greedy measured in alternation
in the same run (median of --repeats pairs), plus how often the output repeats itself.

    python experiments/sampling_cost.py     # writes experiments/results/sampling_cost.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from report import paired, write_report

from jaxinfer import LLM, SamplingParams, corpus

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    "greedy": dict(temperature=0),
    "greedy + repetition_penalty 1.3": dict(temperature=0, repetition_penalty=1.3),
    "greedy + presence 0.5, frequency 0.5": dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.5),
    "greedy + 8 bad_words": dict(temperature=0, bad_words=["self", "None", "return", "print", "TODO", "lambda",
                                                          "assert", "raise ValueError"]),
    "T=0.8, top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "T=0.8, top-p 0.9 + all three penalties": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3,
                                                   presence_penalty=0.5, frequency_penalty=0.5),
}


def repeated_4grams(tokens: list[int]) -> float:
    """Fraction of the output's 4-grams that occurred earlier in it."""
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / max(1, len(grams))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "sampling_cost"))
    args = ap.parse_args()
    llm = LLM(dtype="float32", max_num_seqs=args.prompts)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p.text)} for p in corpus.heldout_prompts(tok, num=args.prompts)]
    t0 = time.perf_counter()

    def params(kw):
        return [SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, seed=i, **kw) for i in range(len(prompts))]

    rows = []
    base = params(SETTINGS["greedy"])
    for name, kw in SETTINGS.items():
        for path, run in (("engine", llm.generate), ("static", llm.generate_static)):
            ratios, secs, outs = paired(lambda: run(prompts, base), lambda: run(prompts, params(kw)),  # noqa: B023
                                        args.repeats)
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append(dict(setting=name, path=path, tok_s=n_out / float(np.median(secs)),
                             vs_greedy=float(np.median(ratios)),
                             repeated_4grams=float(np.mean([repeated_4grams(o.outputs[0].token_ids) for o in outs]))))
            print(json.dumps(rows[-1]), flush=True)

    header = (f"# Sampling settings on stdlib-target (float32)\n\n`python experiments/sampling_cost.py` — "
              f"{platform.machine()}, {time.perf_counter() - t0:.0f} s. {len(prompts)} held-out prompts, "
              f"{args.max_tokens} new tokens each (eos ignored), all in one call. vs greedy: median over "
              f"{args.repeats} alternating pairs of (greedy seconds / this setting's seconds) on the same path; "
              "repeated 4-grams: share of an output's 4-grams that occurred earlier in it (mean).\n\n")
    lines = ["| setting | path | output tok/s | vs greedy | repeated 4-grams |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['path']} | {r['tok_s']:.1f} | {r['vs_greedy']:.2f}x | "
              f"{r['repeated_4grams']:.3f} |" for r in rows]
    write_report(args.out, header + "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
