"""Beam search on the embedded target: what each beam width buys and costs, against transformers.

For beam widths W (1 = a single beam, which without eos is greedy), on held-out code prompts
(32 tokens each, all in one batch) with up to 64 new tokens, length_penalty 1, eos honoured:
- quality of the best beam: mean log-probability per token under the model (what beam search
  maximises), its length, and distinct bigrams / bigrams (beam search is known to repeat);
- agreement with the code that really follows the prompt in its file: leading tokens equal to it,
  and difflib's similarity ratio between the two token sequences;
- cost: seconds per call for all prompts, jaxinfer (`LLM.beam_search`, one jit-compiled loop) and
  transformers' `generate(num_beams=W)` on the same checkpoint and prompts, measured in
  alternation in the same run (median of --repeats pairs), and their ratio;
- agreement: how many prompts' best beams are token-identical between the two.

    python experiments/bench_beam.py            # writes experiments/results/bench_beam.{md,json}
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import time
from pathlib import Path

import numpy as np
from report import write_report

from jaxinfer import LLM, BeamSearchParams, corpus
from jaxinfer.llm import resolve_model

RESULTS = Path(__file__).parent / "results"


def distinct_bigrams(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / max(1, len(pairs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "bench_beam"))
    args = ap.parse_args()

    import torch
    import transformers

    path = resolve_model(None)
    llm = LLM(str(path), dtype="float32", max_num_seqs=max(args.widths) * args.prompts)
    tok = llm.get_tokenizer()
    held = corpus.heldout_prompts(tok, num=args.prompts, prompt_tokens=40)
    prompts = [tok.encode(p.text)[:32] for p in held]
    assert all(len(p) == 32 for p in prompts)
    references = []  # the tokens that follow each prompt in its source file
    for p, ids in zip(held, prompts):
        src = corpus.read_text(corpus.stdlib_root() / p.source)
        full = tok.encode(src[src.index(p.text):][:8000])
        assert full[:32] == ids, p.source
        references.append(full[32:32 + args.max_tokens])
    eos = llm.cfg.eos_token_ids
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    rows = []
    t_start = time.perf_counter()
    for w in args.widths:
        params = BeamSearchParams(beam_width=w, max_tokens=args.max_tokens)
        reqs = [{"prompt_token_ids": p} for p in prompts]
        hf_kw = dict(num_beams=w, num_return_sequences=1, do_sample=False, max_new_tokens=args.max_tokens,
                     length_penalty=1.0, early_stopping=False, eos_token_id=eos, pad_token_id=0,
                     attention_mask=torch.ones_like(ids))

        def run_ours():
            return llm.beam_search(reqs, params)

        def run_hf():
            with torch.no_grad():
                return hf.generate(ids, **hf_kw)
        ours, ref = run_ours(), run_hf()  # compile / warm up
        ours_s, hf_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_ours()
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_hf()
            hf_s.append(time.perf_counter() - t)
        best = [o.sequences[0] for o in ours]
        same = 0
        for b, r in zip(best, ref):
            r = r[32:].tolist()
            same += r[:len(b.output_token_ids)] == b.output_token_ids and set(r[len(b.output_token_ids):]) <= {0, *eos}
        lens = [len(b.output_token_ids) for b in best]
        prefix = [next((i for i, (a, r) in enumerate(zip(b.output_token_ids, ref_ids)) if a != r), len(ref_ids))
                  for b, ref_ids in zip(best, references)]
        similarity = [difflib.SequenceMatcher(None, b.output_token_ids, ref_ids, autojunk=False).ratio()
                      for b, ref_ids in zip(best, references)]
        row = dict(beam_width=w, logprob_per_token=float(np.mean([b.cum_logprob / n for b, n in zip(best, lens)])),
                   mean_len=float(np.mean(lens)), stopped=sum(b.finish_reason == "stop" for b in best),
                   distinct2=float(np.mean([distinct_bigrams(b.output_token_ids) for b in best])),
                   reference_prefix=float(np.mean(prefix)), reference_similarity=float(np.mean(similarity)),
                   jaxinfer_s=float(np.median(ours_s)), transformers_s=float(np.median(hf_s)),
                   speedup=float(np.median(np.array(hf_s) / np.array(ours_s))), identical_best=int(same))
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = (f"# Beam search on {path.name} (float32)\n\n`python experiments/bench_beam.py` — {platform.machine()}, "
              f"{time.perf_counter() - t_start:.0f} s. {len(prompts)} held-out prompts of 32 tokens in one batch, up "
              f"to {args.max_tokens} new tokens, length_penalty 1, early_stopping False, eos honoured. Quality "
              "columns describe the best beam; reference: the tokens that really follow the prompt in its file "
              "(leading tokens equal to them, and difflib's ratio over the token sequences); seconds are per "
              "call (all prompts), medians of "
              f"{args.repeats} alternating pairs; speedup = median of the pairs' transformers / jaxinfer ratios; "
              "identical: prompts whose best beam is token-identical to transformers'.\n\n")
    lines = [("| beam width | logprob / token | mean length | ended on eos | distinct bigrams | reference: "
              "leading tokens | reference: similarity | jaxinfer s | transformers s | speedup | identical |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['beam_width']} | {r['logprob_per_token']:.3f} | {r['mean_len']:.1f} | {r['stopped']}/"
                     f"{len(prompts)} | {r['distinct2']:.3f} | {r['reference_prefix']:.2f} | "
                     f"{r['reference_similarity']:.3f} | {r['jaxinfer_s']:.3f} | {r['transformers_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['identical_best']}/{len(prompts)} |")
    write_report(args.out, header + "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
