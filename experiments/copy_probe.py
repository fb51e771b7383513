"""Does a model copy when the text to copy is in its context? Teacher-forced next-token NLL and
top-1 accuracy on the second half of three kinds of held-out document, by position in the copy:

- random: 64 uniformly random tokens, three newlines, the same 64 again. Only an induction
  mechanism (find the earlier occurrence of the current token, predict what followed it)
  predicts the copy; a model without one scores ~0% top-1 however long the copy runs.
- repeat: 96 tokens of held-out text, three newlines, the same 96 again (`repeat_document`).
- edit: a held-out function, two blank lines, its header renamed to `_v2`, then the function's
  body again (`edit_documents`, the documents behind bench_spec's code-edit prompts): scored
  from the first token after the renamed header.

Prompt lookup's τ on bench_spec's code-edit prompts is bounded by how much of its greedy output
repeats the prompt; this measures the step before that, whether the model follows a copy it is
shown. Stop 54 (`copy_probe.md`): the stage-3 target has no induction at all (random copies 0%
top-1), and stop 53's one-run copy stage left it there; 300 steps with a quarter of the rows random
repeats (`copy_finetune.py --random-repeat-fraction 0.25`) reach 98%, yet its copies of held-out
text only rise from 60% to 68% top-1 (function bodies 62% to 72%). Stop 55: two more runs with
more rows of repeated text (the shipped target) lift text to 85.7% and bodies to 86.9%; the
draft scores 0.0% / 35.9% / 35.2% (`copy_probe_draft.md`).

    python experiments/copy_probe.py --models STAGE3_DIR runs/copy-d runs/copy-a runs/copy-e runs/copy-f \
        runs/copy-g stdlib-target
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from copy_finetune import edit_documents, repeated
from eval_default_models import model_pass, nll_and_argmax

from jaxinfer import corpus
from jaxinfer.checkpoint import load_hf
from jaxinfer.llm import resolve_model
from jaxinfer.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
BIN = 8


def documents(tok: Tokenizer, vocab: int, seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    """Per kind, (tokens, index of the first copied token) for each document."""
    sep = tok.encode("\n\n\n", add_special_tokens=False)
    rng = np.random.default_rng(seed)
    first = max(corpus.PAD, corpus.BOS, corpus.EOS) + 1
    random = [repeated(rng.integers(first, vocab, 64).tolist(), sep, 0, 0)[0] for _ in range(32)]
    windows = corpus.token_windows(tok, 40, 257, "heldout", seed=11)
    starts = rng.integers(0, 257 - 96, len(windows))
    repeat = [repeated(w[a:a + 96].tolist(), sep, 0, 0)[0] for w, a in zip(windows, starts)]
    edits = []
    for ids, weights in edit_documents(tok, "heldout", mask_header=True)[::3][:48]:
        header_end = max(i for i, x in enumerate(weights) if x == 0) + 1
        edits.append((ids, header_end))
    return {"random": [(d, 64 + len(sep)) for d in random], "repeat": [(d, 96 + len(sep)) for d in repeat],
            "edit": edits}


def score(cfg, weights, docs: list[tuple[list[int], int]], bins: int = 9) -> dict:
    """NLL and top-1 of each copied token, averaged per BIN-token bin of the copy (the last bin
    takes the rest) and over the copy past its first BIN tokens."""
    length = max(len(d) for d, _ in docs)
    tokens = np.zeros((len(docs), length), np.int32)
    for i, (d, _) in enumerate(docs):
        tokens[i, :len(d)] = d
    out = model_pass(weights, cfg, tokens, len(docs), nll_and_argmax)
    nll, hit = out["nll"], out["argmax"] == tokens[:, 1:]
    per_bin: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for i, (d, start) in enumerate(docs):
        for j, k in enumerate(range(start - 1, len(d) - 1)):  # logits at k predict token k + 1
            per_bin[min(j // BIN, bins - 1)].append((nll[i, k], hit[i, k]))
    per_bin = [b for b in per_bin if b]
    rest = [x for b in per_bin[1:] for x in b]
    return {"bins_nll": [float(np.mean([x for x, _ in b])) for b in per_bin],
            "bins_top1": [float(np.mean([y for _, y in b])) for b in per_bin],
            "nll_after_first_bin": float(np.mean([x for x, _ in rest])),
            "top1_after_first_bin": float(np.mean([y for _, y in rest])), "tokens": sum(len(b) for b in per_bin)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["stdlib-target"], help="names or HF directories")
    ap.add_argument("--out", default=str(RESULTS / "copy_probe"))
    args = ap.parse_args(argv)
    results = {}
    for name in args.models:
        d = resolve_model(name)
        cfg, weights = load_hf(d, "float32")
        tok = Tokenizer.from_dir(d, cfg.bos_token_id, cfg.eos_token_ids)
        results[name] = {kind: score(cfg, weights, docs) for kind, docs in documents(tok, cfg.vocab_size).items()}
        for kind, r in results[name].items():
            print(f"{name:32s} {kind:7s} top-1 past the first {BIN} copied tokens {r['top1_after_first_bin']:.1%} "
                  f"(NLL {r['nll_after_first_bin']:.2f}); by {BIN}-token bin: "
                  + " ".join(f"{t:.2f}" for t in r["bins_top1"]), flush=True)
    lines = ["# Copying what is in context: teacher-forced top-1 on the copy half", "",
             (f"`python experiments/copy_probe.py --models {' '.join(args.models)}` (jax {jax.__version__}). "
              f"Top-1 (NLL) of the copied tokens past the first {BIN}; random: 32 x 64 random tokens, repeat: "
              "40 x 96 tokens of held-out text, edit: 48 held-out functions' bodies after the renamed header."), "",
             "| model | random | repeat | edit |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{r[k]['top1_after_first_bin']:.1%} ({r[k]['nll_after_first_bin']:.2f})" for k in ("random", "repeat", "edit"))
            + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"models": results, "jax": jax.__version__}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
