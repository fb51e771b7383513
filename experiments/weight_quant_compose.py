"""Quantized weights composed with the engine and with speculative decoding, measured against dense.

Two questions `weight_quant.py` leaves open, on the embedded target:
  * engine: output tokens/s of the continuous-batching engine on bench_serving's mixed workload
    (a) (prompts U[16, 384], outputs U[8, 256], all at once), dense vs each quantized config,
    in --pairs back-to-back pairs (alternating which goes first; the ratio is the median of the
    pairs'); decode steps there hold tens of rows, where weight-only products dequantize;
  * speculative decoding: n-gram prompt lookup (k = --k) at batch 1 on bench_spec's code-editing
    prompts, over the dense and the quantized target: tokens/s of plain and speculative decoding
    for each, in one alternating loop, as speedups over plain dense decoding. Verification runs
    k + 1 rows, which int8 multiplies row by row from its codes.
Writes experiments/results/weight_quant_compose.{md,json}.

    python experiments/weight_quant_compose.py [--configs "int8 rtn" "w8a8 rtn"] [--pairs 3]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
from bench_serving import mixed_workload, run_engine  # experiments/ is on sys.path when run as a script
from bench_spec import code_edit_prompts
from report import write_report
from weight_quant import CONFIGS, decode_tok_s

from jaxinfer import LLM

RESULTS = Path(__file__).parent / "results"


def engine_tok_s(llm: LLM, prompts, params) -> float:
    out = run_engine(llm, prompts, params)
    llm.engine.allocator.reset_prefix_cache()
    return out[1]["output_throughput"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--configs", nargs="+", default=["int8 rtn", "w8a8 rtn", "int4 g128 rtn"],
                    choices=[c for c in CONFIGS if c != "dense"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--spec-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "weight_quant_compose"))
    args = ap.parse_args()

    engine_kw = dict(max_num_seqs=64, max_num_batched_tokens=512)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    dense = LLM(args.model, dtype="float32", **engine_kw)
    dense_spec = LLM(args.model, dtype="float32", speculative_config=ngram)
    tok = dense.get_tokenizer()
    prompts, params = mixed_workload(np.random.default_rng(0), args.num_requests, dense.cfg.vocab_size)
    edits = [{"prompt_token_ids": p} for p in code_edit_prompts(tok, args.spec_prompts)]
    engine_tok_s(dense, prompts, params)  # compile
    decode_tok_s(dense, edits, 1, args.new_tokens), decode_tok_s(dense_spec, edits, 1, args.new_tokens)
    rows = []
    for name in args.configs:
        quant, qconf = CONFIGS[name]
        llm = LLM(args.model, dtype="float32", quantization=quant, quantization_config=qconf, **engine_kw)
        spec = LLM(args.model, dtype="float32", quantization=quant, quantization_config=qconf,
                   speculative_config=ngram)
        engine_tok_s(llm, prompts, params)
        decode_tok_s(llm, edits, 1, args.new_tokens), decode_tok_s(spec, edits, 1, args.new_tokens)
        eng, sp = [], {k: [] for k in ("dense_ngram", "quant_plain", "quant_ngram")}
        for i in range(args.pairs):
            order = (dense, llm) if i % 2 == 0 else (llm, dense)
            t = {id(m): engine_tok_s(m, prompts, params) for m in order}
            eng.append((t[id(dense)], t[id(llm)]))
            runs = [("dense_plain", dense), ("dense_ngram", dense_spec), ("quant_plain", llm), ("quant_ngram", spec)]
            t = {key: decode_tok_s(m, edits, 1, args.new_tokens) for key, m in (runs if i % 2 == 0 else runs[::-1])}
            for key in sp:
                sp[key].append(t[key] / t["dense_plain"])
        row = dict(config=name,
                   engine_dense_tok_s=round(float(np.median([d for d, _ in eng])), 1),
                   engine_quant_tok_s=round(float(np.median([q for _, q in eng])), 1),
                   engine_ratio=round(float(np.median([q / d for d, q in eng])), 3),
                   engine_pairs=[round(q / d, 3) for d, q in eng],
                   **{f"spec_{k}_vs_dense_plain": round(float(np.median(v)), 3) for k, v in sp.items()},
                   spec_pairs={k: [round(x, 3) for x in v] for k, v in sp.items()})
        print(row, flush=True)
        rows.append(row)
    lines = [f"# Quantized {args.model} in the engine and under n-gram speculation (float32)", "",
             f"`python experiments/weight_quant_compose.py {shlex.join(sys.argv[1:])}`".replace(" `", "`")
             + f" — engine: bench_serving's workload (a), {args.num_requests} requests at once, "
             f"max_num_seqs 64, max_num_batched_tokens 512; speculation: n-gram k={args.k} at batch 1 on "
             f"{args.spec_prompts} code-editing prompts, {args.new_tokens} tokens each; medians of {args.pairs} "
             f"alternating passes; jax {jax.__version__}, {jax.default_backend()}.", "",
             "| config | engine out tok/s dense → quantized (×) | plain quantized × plain dense | "
             "n-gram dense × plain dense | n-gram quantized × plain dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['engine_dense_tok_s']} → {r['engine_quant_tok_s']} ({r['engine_ratio']:.2f}x) "
                     f"| {r['spec_quant_plain_vs_dense_plain']:.2f}x | {r['spec_dense_ngram_vs_dense_plain']:.2f}x | "
                     f"{r['spec_quant_ngram_vs_dense_plain']:.2f}x |")
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
