"""Speculative decoding inside the continuous-batching engine: what it buys at each concurrency.

For any speculative method (n-gram prompt lookup, a draft model, lookup with the draft model as
fallback, layer skip, EAGLE and Medusa with the heads shipped for the target), several numbers of
speculative tokens k and several concurrencies c (max_num_seqs = c, every request queued at
once, so c requests decode together while the queue lasts), on bench_spec's held-out
continuation and code-edit prompts, greedy, --max-tokens new tokens per request (EOS
ignored), it reports
- output tokens/s of the engine with and without speculation and their ratio: each pair runs
  the two back to back (alternating which goes first) and the ratio is the median over
  --pairs pairs, so a slow moment of the shared machine slows both sides of a pair;
- acceptance rate (accepted / drafted tokens) and tokens per speculative step (accepted + 1);
- whether the outputs are token-identical to the engine without speculation.

Writes experiments/results/bench_spec_engine.{md,json}.

    python experiments/bench_spec_engine.py
    python experiments/bench_spec_engine.py --concurrency 1 8 --methods ngram --ks 4
    python experiments/bench_spec_engine.py --methods eagle medusa layer_skip --ks 4 --concurrency 1 4 \
        --out experiments/results/bench_spec_engine_heads
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_spec  # noqa: E402
from jaxinfer import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed_generate(llm: LLM, prompts, params) -> tuple[float, list[list[int]], dict]:
    """Seconds for llm.generate over all prompts, the outputs, and the engine-stat deltas."""
    s0 = llm.get_stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sec = time.perf_counter() - t0
    s1 = llm.get_stats()
    delta = {f: getattr(s1, f) - getattr(s0, f) for f in
             ("spec_drafted_tokens", "spec_accepted_tokens", "spec_steps", "num_steps", "num_generated_tokens")}
    return sec, [o.outputs[0].token_ids for o in outs], delta


def warm(llm: LLM, prompts, params, max_passes: int = 3):
    """Run until a pass compiles nothing new (step compositions decide the shapes)."""
    for _ in range(max_passes):
        before = llm.get_stats().compilations
        llm.generate(prompts, params)
        if llm.get_stats().compilations == before:
            return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="stdlib-target")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=["ngram", "draft_model"], choices=list(bench_spec.METHOD_CONFIGS))
    p.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--sets", nargs="+", default=["continuation", "code_edit"], choices=["continuation", "code_edit"])
    p.add_argument("--prompts", type=int, default=16, help="requests per run (per prompt set)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="speculative_config disable_by_batch_size for every speculative run")
    p.add_argument("--out", default=str(RESULTS / "bench_spec_engine"))
    args = p.parse_args(argv)

    t_start = time.time()
    common = dict(dtype=args.dtype, max_model_len=1024, num_kv_pages=2048, enable_prefix_caching=True)
    probe = LLM(args.target, **common)
    tok = probe.get_tokenizer()
    sets = {"continuation": bench_spec.continuation_prompts(tok, args.prompts),
            "code_edit": bench_spec.code_edit_prompts(tok, args.prompts)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for c in args.concurrency:
        plain = LLM(args.target, max_num_seqs=c, **common)
        extra = {} if args.disable_by_batch_size is None else {"disable_by_batch_size": args.disable_by_batch_size}
        specs = {}
        for m in args.methods:
            for k in args.ks:
                try:
                    specs[m, k] = LLM(args.target, max_num_seqs=c, speculative_config={
                        **bench_spec.METHOD_CONFIGS[m], "num_speculative_tokens": k, **extra}, **common)
                except ValueError as e:  # e.g. k above the Medusa head's count
                    print(f"c={c} {m} k={k}: skipped ({e})", flush=True)
        for set_name in args.sets:
            prompts = [{"prompt_token_ids": ids} for ids in sets[set_name]]
            warm(plain, prompts, params)
            _, ref, _ = timed_generate(plain, prompts, params)
            for (m, k), llm in specs.items():
                warm(llm, prompts, params)
                plain_s, spec_s, stats = [], [], None
                same = True
                for i in range(args.pairs):
                    for side in (("plain", "spec") if i % 2 == 0 else ("spec", "plain")):
                        if side == "plain":
                            plain_s.append(timed_generate(plain, prompts, params)[0])
                        else:
                            sec, outs, stats = timed_generate(llm, prompts, params)
                            spec_s.append(sec)
                            same &= outs == ref
                n_tokens = len(prompts) * args.max_tokens
                drafted, accepted, steps = (stats["spec_drafted_tokens"], stats["spec_accepted_tokens"],
                                            stats["spec_steps"])
                row = dict(set=set_name, concurrency=c, method=m, k=k,
                           acceptance=accepted / max(drafted, 1), tokens_per_spec_step=(accepted + steps) / max(steps, 1),
                           spec_tok_s=n_tokens / float(np.median(spec_s)), plain_tok_s=n_tokens / float(np.median(plain_s)),
                           speedup=float(np.median([a / b for a, b in zip(plain_s, spec_s)])),
                           pair_ratios=[round(a / b, 3) for a, b in zip(plain_s, spec_s)], identical=bool(same))
                rows.append(row)
                print(f"{set_name:12s} c={c:<3d} {m:11s} k={k}: α {row['acceptance']:.3f}  tokens/spec step "
                      f"{row['tokens_per_spec_step']:.2f}  {row['spec_tok_s']:.1f} vs {row['plain_tok_s']:.1f} tok/s "
                      f"= {row['speedup']:.2f}x (pairs {row['pair_ratios']})  identical {same}", flush=True)

    minutes = (time.time() - t_start) / 60
    cmd = "python experiments/bench_spec_engine.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                        if (argv if argv is not None else sys.argv[1:]) else "")
    lines = [f"# Speculative decoding in the engine ({Path(probe.model_dir).name}, {args.dtype})", "",
             f"`{cmd}` — {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), "
             f"jax {jax.__version__}, {minutes:.0f} min.",
             f"{args.prompts} requests per run, all queued at once, max_num_seqs = concurrency c, greedy, "
             f"{args.max_tokens} new tokens each (EOS ignored), prefix caching on. Speedup: median over "
             f"{args.pairs} back-to-back pairs of plain / speculative wall time (tok/s: medians). "
             "Tokens per spec step: accepted drafts + 1 per verification."
             + ("" if args.disable_by_batch_size is None else
                f" speculative_config disable_by_batch_size={args.disable_by_batch_size}: steps running more "
                "requests decode plainly."), "",
             "| set | c | method | k | α | tokens / spec step | spec tok/s | plain tok/s | speedup | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['concurrency']} | {r['method']} | {r['k']} | {r['acceptance']:.3f} | "
                     f"{r['tokens_per_spec_step']:.2f} | {r['spec_tok_s']:.1f} | {r['plain_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['identical']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
