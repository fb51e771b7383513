"""Where a decode step's time goes, part by part of the model (XLA:CPU).

Runs decode steps under the JAX profiler with XLA:CPU's per-thunk trace events on, maps
every thunk to the HLO instruction it ran (the optimized HLO is dumped to a temporary
directory) and that instruction to the model part named in its op_name (`model.forward`'s
named scopes):

  weight matmuls   the q/k/v, output, gate/up and down projections ("proj")
  LM head          the final norm and the vocabulary projection ("lm_head")
  attention        scores, softmax and weighted values, with the page gather (paged caches)
                   and the widening of bfloat16 caches held as bits ("attention")
  KV write         the new tokens' K/V into the cache ("kv_write")
  norms, RoPE      the rest of a layer: RMSNorm, rotary embedding, residual adds, SwiGLU
  sampling, loop   outside the layers: embedding lookup, sampling, stop checks, loop state
  runtime gaps     the traced step's wall time minus all of the above: the thunk executor's
                   scheduling between ops, the engine's host-side work, and the tracer's own
                   cost per thunk (a traced step is 5-15% slower than an untraced one for the
                   static loop, ~40% for the engine, whose ragged attention runs ~1,000 thunks a
                   step): read the parts as shares of the traced step

Two settings:
  static   `LLM.generate_static`'s decode loop (`generate.decode`), as bench_decode.py runs it, on its
           ~25M-parameter checkpoint (--static-model bench_decode, the default) or a model
           directory / embedded name: prompts of 16 tokens, 128 new tokens, batch 1, 8, 32;
  engine   the serving engine's decode steps (paged KV, `engine_step`) on the embedded target,
           with --engine-batches rows whose contexts hold --context tokens.
One table for both, written to experiments/results/step_anatomy.{md,json}.

    python experiments/step_anatomy.py [--dtypes float32 bfloat16] [--batches 1 8 32]
                                       [--engine-batches 8 32] [--context 300]

XLA:CPU only: other backends name their trace events differently.
"""

from __future__ import annotations

import os
import tempfile

DUMP = tempfile.mkdtemp(prefix="step_anatomy_")
# Before jax starts: thunk trace events, and the optimized HLO of every program.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text").strip()

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import time
from pathlib import Path

import bench_decode
import jax
import numpy as np
from report import write_report

RESULTS = Path(__file__).parent / "results"
PARTS = ("weight matmuls", "LM head", "attention", "KV write", "norms, RoPE", "sampling, loop")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def part_of(op_name: str) -> str:
    scopes = op_name.split("/")
    for scope, part in (("lm_head", "LM head"), ("attention", "attention"), ("kv_write", "KV write"),
                        ("proj", "weight matmuls")):
        if scope in scopes:
            return part
    return "norms, RoPE" if any(re.fullmatch(r"layer\d+", s) for s in scopes) else "sampling, loop"


def dumped() -> set[str]:
    return set(glob.glob(f"{DUMP}/*after_optimizations.txt"))


def _parts(paths, vocab: int) -> dict[str, str]:
    """Instruction name -> part over the optimized HLO modules of the programs that ran. The static
    loop runs one program per cache length whose instructions mostly share names and parts; a name
    the modules place in different parts counts as "sampling, loop". Dots that XLA rewrote without
    metadata (all of them at batch 1) are placed by their form: batched (attention's products), a
    [.., vocab] result (LM head), else a projection."""
    parts: dict[str, str] = {}
    for path in paths:
        with open(path) as f:
            lines = f.readlines()
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, opcode = m.groups()
            op_name = _OP_NAME.search(line)
            if op_name:
                part = part_of(op_name.group(1))
            elif opcode == "dot":
                part = ("attention" if "lhs_batch_dims" in line else
                        "LM head" if re.search(rf"\[[\d,]*\b{vocab}\]", shape) else "weight matmuls")
            else:
                continue
            parts[name] = part if parts.get(name, part) == part else "sampling, loop"
    return parts


def anatomy(run, steps: int, programs, vocab: int) -> dict:
    """Trace run() (`steps` decode steps, returning its seconds) and split that traced wall time
    into PARTS plus runtime gaps, in ms per step. programs: the dumped HLO files of the programs
    that run (`_parts`). Thunk times are summed over the executor's threads."""
    trace_dir = tempfile.mkdtemp(prefix="trace_", dir=DUMP)
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would slow the engine's host side further
    with jax.profiler.trace(trace_dir, profiler_options=options):
        wall_ms = 1e3 * run() / steps
    trace = max(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    with gzip.open(trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    module = _parts(programs, vocab)
    ms = collections.Counter()
    for e in events:
        # Control-flow thunks (while, conditional, call) contain others: count only the leaves.
        if e["name"] in module and not e["name"].startswith(("while", "conditional", "call")):
            ms[module[e["name"]]] += e["dur"] / 1e3 / steps
    shutil.rmtree(trace_dir, ignore_errors=True)
    row = {p: round(ms[p], 3) for p in PARTS}
    row["runtime gaps"] = round(wall_ms - sum(ms.values()), 3)
    row["traced wall"] = round(wall_ms, 3)
    return row


def static_row(model_dir: Path, dtype: str, b: int, prompt_len: int, new_tokens: int) -> dict:
    """`LLM.generate_static` as bench_decode.py runs it (its cache grows in segments, one decode
    program per cache length); a step = (generate - generate of one token) / (new_tokens - 1)."""
    from jaxinfer import LLM, SamplingParams
    llm = LLM(str(model_dir), dtype=dtype, max_num_seqs=b)
    before = dumped()
    prompts = np.random.default_rng(0).integers(3, llm.cfg.vocab_size, (b, prompt_len))
    reqs = [{"prompt_token_ids": p.tolist()} for p in prompts]

    def generate(n):
        t = time.perf_counter()
        llm.generate_static(reqs, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), batch_size=b)
        return time.perf_counter() - t

    generate(new_tokens), generate(1)  # compile
    first = min(generate(1) for _ in range(3))
    wall = 1e3 * (min(generate(new_tokens) for _ in range(3)) - first) / (new_tokens - 1)
    decode = [p for p in dumped() - before if ".jit_decode." in p]
    return {"setting": "static", "model": model_dir.name, "dtype": dtype, "batch": b,
            "context": f"{prompt_len}-{prompt_len + new_tokens}", "wall": round(wall, 3),
            **anatomy(lambda: generate(new_tokens) - first, new_tokens - 1, decode, llm.cfg.vocab_size)}


def engine_row(model: str, dtype: str, b: int, context: int, steps: int = 30) -> dict:
    """The engine's decode steps at b rows holding `context` tokens (and growing)."""
    from jaxinfer import LLM, SamplingParams
    # Every prompt in the first step: the decode program then first compiles after it
    # (interleaved with prefill chunks, decodes of every batch size would compile early).
    llm = LLM(model, dtype=dtype, enable_prefix_caching=False, max_num_seqs=b,
              max_num_batched_tokens=b * context, max_model_len=max(1024, context + 4 * steps))
    eng = llm.engine
    rng = np.random.default_rng(0)
    for i in range(b):
        eng.add_request(f"r{i}", {"prompt_token_ids": rng.integers(3, llm.cfg.vocab_size, context).tolist()},
                        SamplingParams(temperature=0, max_tokens=3 * steps + 16, ignore_eos=True))
    while eng.scheduler.waiting or any(r.num_computed < len(r.prompt_ids) for r in eng.scheduler.running):
        eng.step()  # prefill every row
    before = dumped()  # what compiles from here on is the decode program
    for _ in range(3):
        eng.step()

    def decode():
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        return time.perf_counter() - t

    wall = 1e3 * decode() / steps
    programs = [p for p in dumped() - before if ".jit_engine_step." in p]
    return {"setting": "engine", "model": model, "dtype": dtype, "batch": b, "context": f"{context}+",
            "wall": round(wall, 3), **anatomy(decode, steps, programs, llm.cfg.vocab_size)}


def _line(r: dict) -> str:
    return (f"{r['setting']:6s} {r['dtype']:8s} batch {r['batch']:2d}: {r['wall']:.2f} ms/step; traced "
            f"{r['traced wall']:.2f} = "
            + ", ".join(f"{p} {r[p]:.2f}" for p in PARTS + ("runtime gaps",)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--static-model", default="bench_decode",
                    help="'bench_decode' (its ~25M checkpoint, written here with transformers), a model dir or name")
    ap.add_argument("--engine-model", default="stdlib-target")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32], help="static decode batches (none: skip)")
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[8, 32], help="engine decode batches (none: skip)")
    ap.add_argument("--context", type=int, default=300, help="engine: prompt tokens per row")
    ap.add_argument("--out", default=str(RESULTS / "step_anatomy"))
    args = ap.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit(f"step_anatomy.py reads XLA:CPU's thunk trace events; this backend is {jax.default_backend()}")

    rows = []
    if args.batches:
        if args.static_model == "bench_decode":
            model_dir = Path(DUMP) / "bench_decode"
            bench_decode.write_checkpoint(model_dir)
        else:
            from jaxinfer.llm import resolve_model
            model_dir = resolve_model(args.static_model)
        for dtype in args.dtypes:
            for b in args.batches:
                rows.append(static_row(model_dir, dtype, b, bench_decode.PROMPT_LEN, bench_decode.NEW_TOKENS))
                print(_line(rows[-1]), flush=True)
    for dtype in args.dtypes:
        for b in args.engine_batches:
            rows.append(engine_row(args.engine_model, dtype, b, args.context))
            print(_line(rows[-1]), flush=True)

    cols = PARTS + ("runtime gaps",)
    caption = ("Decode step time by part of the model, ms per step (share of the traced step). "
               f"`python experiments/step_anatomy.py` — {jax.devices()[0].platform}, jax {jax.__version__}. "
               "static: `LLM.generate_static` as bench_decode.py runs it (prompts of 16 tokens, 128 new); "
               "engine: `engine_step` decode with paged KV (rows holding `context` tokens and growing). "
               "Parts: the op_name scopes of `model.forward` (see this script's docstring), thunk times "
               "summed over threads; wall: best untraced step; traced: the profiled run's step, which the "
               "parts and the runtime gaps (traced - thunks) add up to.")
    table = [caption, "",
             "| setting | model | dtype | batch | context | wall ms | traced ms | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        table.append(f"| {r['setting']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['context']} | "
                     f"{r['wall']:.2f} | {r['traced wall']:.2f} | "
                     + " | ".join(f"{r[c]:.2f} ({r[c] / r['traced wall']:.0%})" for c in cols) + " |")
    write_report(args.out, "\n".join(table) + "\n", rows)
    shutil.rmtree(DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
