"""Quality measured by lm-evaluation-harness, through jaxinfer's OpenAI server.

Researchers score models with lm-evaluation-harness (`lm_eval`). Its `local-completions` model
asks an OpenAI-compatible server for the log-likelihood of a text: token ids, `echo: true`,
`max_tokens: 1`, `logprobs: 1`. This script serves the embedded target with `jaxinfer.server`
under several configurations, scores each one with the harness, and scores the same checkpoint
with the harness's own transformers backend (`hf`) as the reference. The float32 server must
agree with transformers. The other rows are the quality cost of each optimization, measured the
way the field measures it.

Three tasks, built from the held-out stdlib packages (`corpus.HELDOUT_PACKAGES`) into local JSON
files (no download):

- `stdlib_next_line` (multiple choice): 30 lines of a held-out file, then four candidates for
  the next line. One is the real line. Three are other lines of the same file, re-indented like
  it, so indentation gives nothing away. Reports acc, and acc_norm (log-likelihood per byte).
- `stdlib_heldout_ppl` (loglikelihood_rolling): every held-out file, scored in windows of
  --max-length - 2 tokens after one token of context (what the harness cuts for an API model;
  `hf` is given the same windows). Reports word and byte perplexity and bits per byte.
- `stdlib_complete_line` (generate_until): 30 lines of a held-out file and the first half of the
  next line; greedy generation until the newline (at most 64 tokens), scored by exact match with
  the rest of the line. The report also counts the docs whose text is the float32 server's, which
  the speculative configurations (lossless) must match everywhere.

lm-eval is an optional extra: `pip install -e ".[eval]"` (lm-eval[api] and the CPU torch).

    python experiments/lm_eval_server.py                      # float32, transformers, int8/int4 KV, bf16, int8/int4 weights
    python experiments/lm_eval_server.py --configs float32 hf --docs 100 --out /tmp/lm_eval_quick
    python experiments/lm_eval_server.py --tasks stdlib_complete_line --configs float32 hf spec_ngram spec_draft_model

Writes experiments/results/lm_eval_server.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer import LLM, corpus
from jaxinfer.llm import resolve_model
from jaxinfer.server import OpenAIServer

RESULTS = Path(__file__).parent / "results"
# name -> LLM keyword arguments ("hf": transformers through the harness, the reference)
CONFIGS = {
    "float32": {"dtype": "float32"},
    "hf": None,
    "kv_int8": {"dtype": "float32", "kv_cache_dtype": "int8"},
    "kv_int4": {"dtype": "float32", "kv_cache_dtype": "int4"},
    "bfloat16": {"dtype": "bfloat16"},
    "w_int8": {"dtype": "float32", "quantization": "int8"},  # weight-only: its prefill is the slowest here
    "w_int4": {"dtype": "float32", "quantization": "int4"},
    # speculative decoding inside the server's engine: lossless, so its generations must be float32's
    "spec_ngram": {"dtype": "float32", "speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                                             "prompt_lookup_max": 4, "prompt_lookup_min": 2}},
    "spec_draft_model": {"dtype": "float32", "speculative_config": {"method": "draft_model", "model": "stdlib-draft",
                                                                   "num_speculative_tokens": 3}},
}
METRICS = {"stdlib_next_line": ("acc", "acc_norm"),
           "stdlib_heldout_ppl": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
           "stdlib_complete_line": ("exact_match",)}
GENERATE = "stdlib_complete_line"  # the generation task: its texts are compared across configurations


# ----------------------------------------------------------------------------- tasks

def next_line_docs(num: int, context_lines: int = 30, min_chars: int = 16, seed: int = 0) -> list[dict]:
    """Multiple-choice docs: a held-out file's `context_lines` lines, then the real next line and
    three other lines of the file (each with >= min_chars non-blank characters and different text),
    all carrying the real line's indentation."""
    rng = np.random.default_rng(seed)
    files = []
    for _, text, _ in corpus.parsed_files("heldout"):
        lines = text.split("\n")
        usable = [i for i, line in enumerate(lines) if len(line.strip()) >= min_chars]
        files.append((lines, usable))
    sites = [(f, i) for f, (_, usable) in enumerate(files) for i in usable if i >= context_lines]
    docs = []
    for k in rng.choice(len(sites), size=min(num, len(sites)), replace=False):
        f, i = sites[k]
        lines, usable = files[f]
        true = lines[i]
        indent = true[:len(true) - len(true.lstrip())]
        others = [lines[j].strip() for j in usable if lines[j].strip() != true.strip()]
        picks = rng.choice(len(others), size=3, replace=False)
        choices = [true] + [indent + others[j] for j in picks]
        order = rng.permutation(4)
        docs.append({"context": "\n".join(lines[i - context_lines:i]) + "\n",
                     "choices": [choices[j] for j in order], "label": int(np.argmin(order))})
    return docs


def complete_line_docs(num: int, context_lines: int = 30, min_chars: int = 16, seed: int = 1) -> list[dict]:
    """Generation docs: a held-out file's `context_lines` lines and the first half of the next line
    (cut before a space past its middle); the target is the rest of that line."""
    rng = np.random.default_rng(seed)
    sites = []
    for _, text, _ in corpus.parsed_files("heldout"):
        lines = text.split("\n")
        for i in range(context_lines, len(lines)):
            line = lines[i]
            body = line.lstrip()
            start = len(line) - len(body)
            cut = line.find(" ", start + len(body) // 2)
            if len(body) >= min_chars and cut > start and line[cut:].strip():
                sites.append(("\n".join(lines[i - context_lines:i]) + "\n" + line[:cut], line[cut:]))
    return [{"context": sites[k][0], "target": sites[k][1]}
            for k in sorted(rng.choice(len(sites), size=min(num, len(sites)), replace=False))]


def write_tasks(directory: Path, docs: int) -> None:
    """The tasks' data (JSON lines) and configs (YAML) in `directory`, for TaskManager(include_path=...)."""
    mc = directory / "stdlib_next_line.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in next_line_docs(docs)))
    ppl = directory / "stdlib_heldout_ppl.jsonl"
    ppl.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in corpus.split_texts("heldout")))
    (directory / "stdlib_next_line.yaml").write_text(f"""task: stdlib_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (directory / "stdlib_heldout_ppl.yaml").write_text(f"""task: stdlib_heldout_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    gen = directory / f"{GENERATE}.jsonl"
    gen.write_text("".join(json.dumps(d) + "\n" for d in complete_line_docs(docs)))
    (directory / f"{GENERATE}.yaml").write_text(f"""task: {GENERATE}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 64
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


# ----------------------------------------------------------------------------- runs

def evaluate(config: str, model_dir: Path, task_dir: Path, max_length: int, batch_size: int,
             tasks: list[str]) -> dict:
    """The harness's scores of one configuration: {task: {metric: value}}, the generation task's
    texts (by doc), and wall seconds."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    common = {"tokenizer": str(model_dir), "max_length": max_length, "add_bos_token": True}
    server = None
    if config == "hf":
        # For an API model the harness keeps a token for generation (max_length - 1) and cuts rolling
        # windows one shorter again; hf gets the same windows with max_length - 2 (no next-line
        # context comes near it).
        model, args = "hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
                             **common, "max_length": max_length - 2}
    else:
        llm = LLM(str(model_dir), **CONFIGS[config])
        server = OpenAIServer(llm, port=0, served_model_name=config)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        model, args = "local-completions", {
            "model": config, "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
            "tokenizer_backend": "huggingface", "tokenized_requests": True, **common}
    t0 = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager,
                                      batch_size=batch_size, log_samples=GENERATE in tasks, bootstrap_iters=0)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        # each configuration compiles its own programs, and their memory mappings add up to the
        # kernel's limit within a few configurations (jit_cache.memory_mappings)
        jax.clear_caches()
    scores = {task: {m: float(out["results"][task][f"{m},none"]) for m in METRICS[task]} for task in tasks}
    texts = None
    if GENERATE in tasks:
        texts = [s["filtered_resps"][0] for s in sorted(out["samples"][GENERATE], key=lambda s: s["doc_id"])]
    return {"config": config, "llm_kwargs": CONFIGS[config], "scores": scores, "texts": texts,
            "seconds": time.perf_counter() - t0}


def report(rows: list[dict], meta: dict) -> str:
    ref = next((r for r in rows if r["config"] == "float32"), rows[0])
    tasks = meta["tasks"]
    cols = [(t, m) for t in tasks for m in METRICS[t]]
    gen = GENERATE in tasks
    intro = (f"`{meta['command']}`: lm_eval {meta['lm_eval']}, {meta['docs']} docs per next-line task, held-out "
             f"files in windows of {meta['max_length'] - 2} tokens, BOS added, {meta['machine']}. `hf` is the "
             "harness's transformers backend (float32); every other row is `local-completions` against "
             "`jaxinfer.server` with those LLM arguments. Δ: difference from the float32 server."
             + (" complete_line: greedy completion of a held-out line's second half (until the newline, at most "
                "64 tokens), exact match; *same text*: the docs whose completion is the float32 server's, "
                "character for character." if gen else ""))
    md = [f"# lm-evaluation-harness on {meta['model']}: jaxinfer's server against transformers", "", intro, "",
          "| config | LLM arguments | " + " | ".join(f"{t.removeprefix('stdlib_')} {m}" for t, m in cols)
          + (" | same text |" if gen else " |") + " wall s |", "|---|---|" + "---|" * (len(cols) + gen) + "---|"]
    for r in rows:
        cells = []
        for t, m in cols:
            v, base = r["scores"][t][m], ref["scores"][t][m]
            digits = 2 if m == "word_perplexity" else 5
            cells.append(f"{v:.{digits}f}" + ("" if r is ref else f" (Δ {v - base:+.{digits}f})"))
        if gen:
            same = sum(a == b for a, b in zip(r["texts"], ref["texts"], strict=True))
            cells.append(f"{same} / {len(ref['texts'])}")
        args = "transformers" if r["llm_kwargs"] is None else ", ".join(f"{k}={v}" for k, v in r["llm_kwargs"].items())
        md.append(f"| {r['config']} | {args} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--tasks", nargs="+", default=list(METRICS), choices=list(METRICS))
    ap.add_argument("--docs", type=int, default=400, help="docs of each next-line task (multiple choice, completion)")
    ap.add_argument("--max-length", type=int, default=1024, help="rolling window (the target trained on <= 1024)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per request (local-completions) or batch (hf)")
    ap.add_argument("--out", default=str(RESULTS / "lm_eval_server"))
    args = ap.parse_args(argv)
    try:
        import lm_eval
    except ImportError:
        print("lm_eval is not installed: pip install -e '.[eval]'", file=sys.stderr)
        return 2
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model_dir = resolve_model(args.model)
    meta = {"model": args.model, "docs": args.docs, "max_length": args.max_length, "tasks": args.tasks,
            "lm_eval": getattr(lm_eval, "__version__", "?"),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "command": "python experiments/lm_eval_server.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        write_tasks(Path(d), args.docs)
        for config in args.configs:
            row = evaluate(config, model_dir, Path(d), args.max_length, args.batch_size, args.tasks)
            rows.append(row)
            print(f"{config:9s} " + "  ".join(f"{t.removeprefix('stdlib_')} {m} {v:.4f}" for t, s in row["scores"].items()
                                             for m, v in s.items()) + f"  ({row['seconds']:.0f} s)", flush=True)
            # written after every configuration: a sweep stopped early keeps what it measured
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
            out.with_suffix(".md").write_text(report(rows, meta))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
