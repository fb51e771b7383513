"""What structured outputs cost and buy on the embedded target: for a choice list, a regex and a
JSON schema, the token table's build time and size, output tokens/s of the engine and of static
batching against unconstrained greedy in alternation in the same run (median of --repeats pairs,
exactly --max-tokens tokens per row on both sides: EOS ignored), and the share of outputs that
match the constraint with and without it (EOS honoured; matched as a whole; the JSON schema's
outputs are also parsed with json.loads).

    python experiments/structured_cost.py     # writes experiments/results/structured_cost.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
from report import paired, timed, write_report

from jaxinfer import LLM, SamplingParams, StructuredOutputsParams, corpus, structured

RESULTS = Path(__file__).parent / "results"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "line": {"type": "integer"},
    "kind": {"enum": ["function", "class", "method"]},
    "args": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "line", "kind", "args"]}
CONSTRAINTS = {
    "choice (3 words)": StructuredOutputsParams(choice=["True", "False", "None"]),
    "regex (a call)": StructuredOutputsParams(regex=r"[a-z_][a-z_0-9]{0,15}\(([a-z_0-9]{1,10}(, [a-z_0-9]{1,10}){0,3})?\)"),
    "JSON schema (4 fields)": StructuredOutputsParams(json=SCHEMA),
}


def matches(so: StructuredOutputsParams, text: str) -> bool:
    if re.fullmatch(so.to_regex(), text) is None:
        return False
    if so.json is not None:
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "structured_cost"))
    args = ap.parse_args()
    llm = LLM(dtype="float32", max_num_seqs=args.prompts)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p.text)} for p in corpus.heldout_prompts(tok, num=args.prompts)]
    t0 = time.perf_counter()
    t = time.perf_counter()
    llm.engine.inputs.token_fsm(SamplingParams(structured_outputs=CONSTRAINTS["choice (3 words)"]))
    texts_s = time.perf_counter() - t  # the token texts, once per tokenizer (and this choice's table)

    def params(so, ignore_eos=True):
        return [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=ignore_eos, seed=i,
                               structured_outputs=so) for i in range(len(prompts))]

    base = params(None)
    free = [o.outputs[0].text for o in llm.generate(prompts, params(None, ignore_eos=False))]
    rows = []
    for name, so in CONSTRAINTS.items():
        structured._compile.cache_clear()
        build_s, _ = timed(lambda: llm.engine.inputs.token_fsm(SamplingParams(structured_outputs=so)))  # noqa: B023
        fsm = llm.engine.inputs.token_fsm(SamplingParams(structured_outputs=so))
        natural = llm.generate(prompts, params(so, ignore_eos=False))
        row = {"constraint": name, "states": fsm.num_states, "table_mib": fsm.table.nbytes / 2**20,
               "build_s": build_s, "valid_with": float(np.mean([matches(so, o.outputs[0].text) for o in natural])),
               "valid_without": float(np.mean([matches(so, text) for text in free])),
               "mean_tokens": float(np.mean([len(o.outputs[0].token_ids) for o in natural])),
               "example": natural[0].outputs[0].text}
        for path, run in (("engine", llm.generate), ("static", llm.generate_static)):
            ratios, secs, _ = paired(lambda: run(prompts, base), lambda: run(prompts, params(so)),  # noqa: B023
                                     args.repeats)
            row[f"{path}_tok_s"] = len(prompts) * args.max_tokens / float(np.median(secs))
            row[f"{path}_vs_greedy"] = float(np.median(ratios))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)

    header = (f"# Structured outputs on stdlib-target (float32)\n\n`python experiments/structured_cost.py` — "
              f"{platform.machine()}, {time.perf_counter() - t0:.0f} s. {len(prompts)} held-out prompts in one call, "
              f"greedy. Speed: exactly {args.max_tokens} new tokens per row (EOS ignored) with and without the "
              f"constraint, median over {args.repeats} alternating pairs of (unconstrained seconds / constrained "
              "seconds) on the same path. Valid: share of outputs (EOS honoured, at most "
              f"{args.max_tokens} tokens) that match the constraint as a whole (JSON: and parse), with the constraint "
              f"and without it (an output cut at max_tokens before the match completes counts as invalid). Token texts of the vocabulary: {texts_s:.2f} s once per tokenizer; table build: "
              "the constraint's token table after that.\n\n")
    lines = [("| constraint | states | table MiB | build s | engine tok/s | vs greedy | static tok/s | vs greedy | "
              "valid with / without | mean tokens | example (first prompt) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['constraint']} | {r['states']} | {r['table_mib']:.1f} | {r['build_s']:.2f} | "
              f"{r['engine_tok_s']:.1f} | {r['engine_vs_greedy']:.2f}x | {r['static_tok_s']:.1f} | "
              f"{r['static_vs_greedy']:.2f}x | {r['valid_with']:.0%} / {r['valid_without']:.0%} | "
              f"{r['mean_tokens']:.1f} | `{r['example'][:60].replace('|', '/')}` |" for r in rows]
    write_report(args.out, header + "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
