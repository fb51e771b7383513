"""Speculative decoding benchmark with Spec-Bench's definitions, on the embedded target.

For every drafter (draft model, layer skip, n-gram prompt lookup as vLLM does it and with
`prompt_lookup_scale` -- drafts by match length, verified only as wide as needed --, prompt
lookup with a draft-model fallback, EAGLE, Medusa), number of speculative tokens k, batch size and
temperature, on two held-out prompt sets:

- continuation: `corpus.heldout_prompts` (a held-out definition's signature and first body
  tokens; the model continues the code);
- code_edit: a whole held-out function, then the same function renamed
  (`def name_v2(...`): the answer repeats much of the prompt (Spec-Bench's
  summarization / RAG-like regime, where prompt lookup shines);

it reports
- acceptance rate: accepted drafted tokens / drafted tokens;
- τ: mean tokens emitted per target forward, counting the correction / bonus token
  (Spec-Bench's "mean accepted tokens");
- draft cost: wall time of one `propose` call (jitted, in a loop on device) per proposed
  token, in ms and as a fraction of one plain decode step of the target at that batch;
- speedup: generated tokens/s of speculative decoding over plain decoding
  (`jaxinfer.generate` prefill + `lax.while_loop` decode) on the same prompts, prefill
  included in both (each batch padded to its longest prompt's fine bucket, as
  `LLM.generate` pads it); greedy outputs are checked token-identical. The two are timed in
  pairs: each of --repeats passes runs plain decoding and the speculative run back to
  back over all prompts (alternating which goes first), and the speedup is the median
  of the passes' ratios. A slow moment of the shared machine then slows both sides of
  a pair instead of one side of the ratio; tok/s columns are the medians of the passes.
- decode only: the same ratio with a prefill-only pass (prompt + first token), timed
  after each pair, taken off both sides: the ratio of time per output token, which the
  prefill both sides pay does not dilute.

Every row generates exactly --max-tokens tokens (EOS ignored), so greedy runs compare
equal work. Writes experiments/results/bench_spec.{md,json,png}.

    python experiments/bench_spec.py                                   # the full grid
    python experiments/bench_spec.py --methods ngram eagle --ks 2 4 --batches 1 --temps 0
    python experiments/bench_spec.py --repetition-penalty 1.2 ...        # penalties on both sides
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer import corpus  # noqa: E402
from jaxinfer import generate as gen  # noqa: E402
from jaxinfer.checkpoint import load_hf  # noqa: E402
from jaxinfer.layers import ATTENTION_BACKENDS, resolve_backend  # noqa: E402
from jaxinfer.llm import resolve_model  # noqa: E402
from jaxinfer.model import WEIGHT_LAYOUTS, runtime_layout  # noqa: E402
from jaxinfer.sampling import PenaltyInputs, SamplingParams, SamplingTensors, row_limits  # noqa: E402
from jaxinfer.spec.config import SpeculativeConfig, build_drafter  # noqa: E402
from jaxinfer.spec.drafters import DraftContext  # noqa: E402
from jaxinfer.spec.loop import SpecStatics, spec_decode, spec_prefill  # noqa: E402
from jaxinfer.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHOD_CONFIGS = {
    "draft_model": {"method": "draft_model", "model": "stdlib-draft"},
    "layer_skip": {"method": "layer_skip"},
    "ngram": {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    # single-token matches too, each matched token buying 2 drafts: 2, 4 or 8 (k 8); see NgramDrafter
    "ngram_scaled": {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 1, "prompt_lookup_scale": 2},
    "ngram_draft_model": {"method": "ngram_draft_model", "model": "stdlib-draft", "prompt_lookup_max": 4,
                          "prompt_lookup_min": 2},
    "eagle": {"method": "eagle"},
    "medusa": {"method": "medusa"},
}


# ----------------------------------------------------------------------------- prompts

def continuation_prompts(tok: Tokenizer, num: int) -> list[list[int]]:
    return [tok.encode(p.text) for p in corpus.heldout_prompts(tok, num=num, prompt_tokens=32)]


def code_edit_prompts(tok: Tokenizer, num: int, min_tokens: int = 80, max_tokens: int = 224) -> list[list[int]]:
    """A held-out function, two blank lines, then its header renamed to `<name>_v2`: the answer
    a copying model gives repeats the function. How much a given model's answer actually repeats
    the prompt is what the n-gram rows measure. On 8 of these prompts `lookup_ceiling.py` measured
    64.9% of the embedded target's greedy output tokens completing a 4-gram of the prompt and
    16.7% repeating one of its own earlier output (before its `copy` training stage: 3.6% / 58.8%;
    after stop 53's one-run stage, which taught no induction: 13.7% / 50.1%)."""
    cands = []
    for f, text, tree in corpus.parsed_files("heldout"):
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.col_offset == 0:
                src = ast.get_source_segment(text, node)
                if src and min_tokens <= len(tok.encode(src, add_special_tokens=False)) <= max_tokens:
                    cands.append((f.as_posix(), node.name, src))
    idx = np.linspace(0, len(cands) - 1, num=min(num, len(cands))).round().astype(int)
    prompts = []
    for i in idx:
        _, name, src = cands[i]
        header = src.split("\n", 1)[0].replace(f"def {name}(", f"def {name}_v2(", 1)
        prompts.append(tok.encode(f"{src}\n\n\n{header}"))  # ends at the header, as the corpus tokenizes it
    return prompts


# ----------------------------------------------------------------------------- runs

def prompt_width(prompts: list[list[int]]) -> int:
    """The padded prompt length of a batch: its longest prompt's fine bucket, as `LLM.generate`
    pads a batch (static_batch.py), so prefill here costs what it costs a user."""
    return gen.fine_bucket(max(len(p) for p in prompts), minimum=16)


def _inputs(prompts: list[list[int]], t: int | None, temp: float, max_tokens: int, vocab: int, seed0: int = 0,
            penalties: dict | None = None):
    """Padded prompts (to t; None: `prompt_width`) and per-row sampling inputs; the last item is
    the rows' PenaltyInputs (None without penalties)."""
    b = len(prompts)
    t = t or prompt_width(prompts)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    sp = SamplingParams(temperature=temp, max_tokens=max_tokens, ignore_eos=True, **(penalties or {}))
    st = SamplingTensors.from_params([sp] * b, [seed0 + i for i in range(b)], vocab)
    limits = row_limits([max_tokens] * b, [0] * b, [[]] * b, vocab)
    pen = PenaltyInputs.from_rows([sp] * b, prompts, [[]] * b, vocab) if sp.shapes_logits else None
    return jnp.asarray(tokens), lens, st, limits, pen


def _pass(run_one, batches):
    """One timed pass over all batches -> (seconds, outputs [rows, M], states)."""
    outs, states, total = [], [], 0.0
    for b in batches:
        t0 = time.perf_counter()
        state = run_one(*b)
        state.out_tokens.block_until_ready()
        total += time.perf_counter() - t0
        outs.append(np.asarray(state.out_tokens))
        states.append(state)
    return total, np.concatenate(outs), states


def _paired_runs(plain_run, spec_run, prefill_run, batches, passes: int):
    """Plain and speculative passes back to back, `passes` times, alternating which runs first,
    each pair followed by a prefill-only pass (prompt + first token: what both sides spend
    before their first decode step).

    Returns (plain, speculative and prefill seconds per pass, speculative outputs, states); the
    ratio of a pair is measured within seconds, whatever the machine does between pairs.
    plain_run and prefill_run must have run on every batch already (main compiles them outside
    the clock).
    """
    for batch in batches:  # compile (one program per prompt width), and finish before the clock starts
        spec_run(*batch).out_tokens.block_until_ready()
    plain_s, spec_s, prefill_s = [], [], []
    for i in range(passes):
        for side in (("plain", "spec") if i % 2 == 0 else ("spec", "plain")):
            if side == "plain":
                plain_s.append(_pass(plain_run, batches)[0])
            else:
                sec, out, states = _pass(spec_run, batches)
                spec_s.append(sec)
        prefill_s.append(_pass(prefill_run, batches)[0])
    return plain_s, spec_s, prefill_s, out, states


def _programs(prefill, decode, weights, args, bake: bool):
    """(prefill(*inputs), decode(state, st, limits, n)) with the weights as jit arguments (the
    framework's way) or, with bake, closed over: compile-time constants, which XLA:CPU may re-layout
    and pre-pack once (with --xla_cpu_experimental_ynn_fusion_type=dot it does)."""
    if not bake:
        return (lambda *a: prefill(weights, *args, *a)), (lambda state, *a: decode(weights, *args, state, *a))
    return (jax.jit(lambda *a: prefill(weights, *args, *a)),
            jax.jit(lambda state, *a: decode(weights, *args, state, *a), donate_argnums=0))


def plain_runner(weights, cfg, t, s, m, temp, bake=False, penalties=None, backend="xla"):
    statics = gen.GenerateStatics(max_len=s, max_new=m, backend=backend)
    pre, dec = _programs(gen.prefill, gen.decode, weights, (cfg, statics), bake)

    def run(prompts, seed0):
        tokens, lens, st, limits, pen = _inputs(prompts, t, temp, m, cfg.vocab_size, seed0, penalties)
        state, _ = pre(tokens, lens, st, limits, pen)
        return dec(state, st, limits, jnp.int32(m))
    return run


def spec_runner(weights, cfg, drafter, dparams, t, s, m, temp, bake=False, penalties=None, backend="xla"):
    statics = SpecStatics(max_len=s, max_new=m, greedy=temp == 0, backend=backend)
    pre, dec = _programs(spec_prefill, spec_decode, weights, (cfg, drafter, dparams, statics), bake)

    def run(prompts, seed0):
        tokens, lens, st, limits, pen = _inputs(prompts, t, temp, m, cfg.vocab_size, seed0, penalties)
        state, _ = pre(tokens, lens, st, limits, pen)
        return dec(state, st, limits, jnp.int32(m))
    return run


def draft_cost(weights, cfg, drafter, dparams, prompts, t, s, m, temp, reps: int = 16, bake=False,
               penalties=None, backend="xla") -> float:
    """Seconds per proposed token: `propose` alone, `reps` times in a fori_loop on device."""
    statics = SpecStatics(max_len=s, max_new=m, greedy=temp == 0, backend=backend)
    tokens, lens, st, limits, pen = _inputs(prompts, t, temp, m, cfg.vocab_size, penalties=penalties)
    state, _ = spec_prefill(weights, cfg, drafter, dparams, statics, tokens, lens, st, limits, pen)

    def propose_loop(weights, dparams, state):
        ctx = DraftContext(tokens=state.tokens, kv_lens=state.kv_lens, active=state.finish == 0,
                           history=state.history, num_generated=state.num_generated, st=st, limits=limits,
                           pen=state.pen, greedy=statics.greedy)

        def body(i, carry):
            kv, dstate, ctx, acc = carry
            # The barrier keeps XLA from hoisting work that reads only loop-invariant inputs (EAGLE's
            # first token comes from a feature that propose does not change) out of the timed loop,
            # which would then count that work once instead of `reps` times.
            kv, dstate, ctx = jax.lax.optimization_barrier((kv, dstate, ctx))
            draft, _, dstate, kv = drafter.propose(dparams, weights, kv, dstate, ctx)
            return kv, dstate, ctx, acc + jnp.sum(draft)
        return jax.lax.fori_loop(0, reps, body, (state.kv, state.draft, ctx, jnp.int32(0)))[3]

    if bake:
        loop = jax.jit(lambda state: propose_loop(weights, dparams, state))
    else:
        jitted = jax.jit(propose_loop)
        loop = lambda state: jitted(weights, dparams, state)  # noqa: E731
    loop(state).block_until_ready()
    best = min(_seconds(lambda: loop(state).block_until_ready()) for _ in range(3))
    return best / (reps * drafter.k)


def plain_step_seconds(weights, cfg, prompts, t, s, m, bake=False, backend="xla") -> float:
    """One plain decode step of the target at this batch (greedy), from a timed decode."""
    statics = gen.GenerateStatics(max_len=s, max_new=m, backend=backend)
    pre, dec = _programs(gen.prefill, gen.decode, weights, (cfg, statics), bake)
    tokens, lens, st, limits, _ = _inputs(prompts, t, 0.0, m, cfg.vocab_size)
    dec(pre(tokens, lens, st, limits)[0], st, limits, jnp.int32(m)).out_tokens.block_until_ready()
    state, _ = pre(tokens, lens, st, limits)
    state.tokens.block_until_ready()
    t0 = time.perf_counter()
    dec(state, st, limits, jnp.int32(m)).out_tokens.block_until_ready()
    return (time.perf_counter() - t0) / (m - 1)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="stdlib-target")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations of target and drafters (plain decoding runs in the same dtype)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_CONFIGS), choices=list(METHOD_CONFIGS))
    p.add_argument("--ks", nargs="+", type=int, default=list(range(1, 9)))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--temps", nargs="+", type=float, default=[0.0, 0.8])
    p.add_argument("--sets", nargs="+", default=["continuation", "code_edit"], choices=["continuation", "code_edit"])
    p.add_argument("--prompts-b1", type=int, default=4, help="prompts per set at batch 1 (one batch each)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--layer-skip-layers", type=int, default=None)
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="n-gram: longest suffix matched")
    p.add_argument("--prompt-lookup-min", type=int, nargs="+", default=[2],
                   help="n-gram: shortest suffix matched (several: one n-gram run per value)")
    p.add_argument("--draft-vocab-size", type=int, nargs="+", default=[0],
                   help="EAGLE / Medusa: draft among this many most frequent tokens (0: all; several: one run each)")
    p.add_argument("--eagle", default=None, help="EAGLE head dir (default: the shipped one)")
    p.add_argument("--medusa", default=None, help="Medusa head dir (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed pairs (a plain pass and a speculative pass) per speculative run; the speedup is the "
                        "median of the pairs' ratios")
    p.add_argument("--no-draft-cost", action="store_true")
    p.add_argument("--bake-weights", action="store_true",
                   help="close over the weights (compile-time constants) in plain and speculative programs alike; "
                        "run with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot to let XLA:CPU pre-pack them")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--weight-layout", default="auto", choices=list(WEIGHT_LAYOUTS),
                   help="the target's projections as LLM(weight_layout=...) holds them (auto: native on CPU where "
                        "the kernels build, else XLA's layout for the dtype)")
    p.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                   help="as LLM(attention_backend=...) (auto: native on CPU where the kernels build)")
    p.add_argument("--out", default=str(RESULTS / "bench_spec"))
    args = p.parse_args(argv)

    target_dir = resolve_model(args.target)
    cfg, weights = load_hf(target_dir, args.dtype)
    weights = runtime_layout(weights, args.weight_layout)
    backend = resolve_backend(args.attention_backend, args.dtype)
    tok = Tokenizer.from_dir(target_dir, cfg.bos_token_id, cfg.eos_token_ids)
    m = args.max_tokens
    nb = max(args.batches)
    sets = {"continuation": continuation_prompts(tok, max(nb, args.prompts_b1)),
            "code_edit": code_edit_prompts(tok, max(nb, args.prompts_b1))}
    sets = {k: v for k, v in sets.items() if k in args.sets}
    longest = max(len(x) for v in sets.values() for x in v)
    s = gen.round_up(longest + m + max(args.ks) + 1, 64)  # one cache length: decode programs shared
    print(f"target {target_dir.name}: {cfg.num_params() / 1e6:.1f}M params; prompts: "
          + ", ".join(f"{k} {len(v)} (mean {np.mean([len(x) for x in v]):.0f} tokens)" for k, v in sets.items())
          + f"; {m} new tokens; cache {s}", flush=True)

    overrides = {"layer_skip": {"num_layers": args.layer_skip_layers} if args.layer_skip_layers else {},
                 "eagle": {"model": args.eagle} if args.eagle else {},
                 "medusa": {"model": args.medusa} if args.medusa else {}}
    variants = []  # (method, config overrides): one per lookup minimum for the n-gram methods
    for method in args.methods:
        if method in ("ngram", "ngram_draft_model"):
            variants += [(method, {"prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": lo})
                         for lo in args.prompt_lookup_min]
        elif method in ("eagle", "medusa"):
            variants += [(method, {**overrides[method], **({"draft_vocab_size": n} if n else {})})
                         for n in args.draft_vocab_size]
        else:
            variants.append((method, overrides.get(method, {})))
    penalties = {}  # the ones set, for plain and speculative decoding alike
    if args.repetition_penalty != 1.0:
        penalties["repetition_penalty"] = args.repetition_penalty
    if args.presence_penalty != 0.0:
        penalties["presence_penalty"] = args.presence_penalty
    if args.frequency_penalty != 0.0:
        penalties["frequency_penalty"] = args.frequency_penalty
    rows, t_start = [], time.time()
    step_s = {}
    compiled = {"spec_prefill": 0, "spec_decode": 0}
    for batch in args.batches:
        for set_name, prompts in sets.items():
            use = prompts[:args.prompts_b1] if batch == 1 else prompts[:batch]
            batches = [(use[i:i + batch], 1000 * i) for i in range(0, len(use), batch)]
            t = None  # each batch padded to its own prompt_width, as LLM.generate pads it
            if batch not in step_s:
                step_s[batch] = plain_step_seconds(weights, cfg, batches[0][0], t, s, m, args.bake_weights,
                                                   backend)
            for temp in args.temps:
                plain_run = plain_runner(weights, cfg, t, s, m, temp, args.bake_weights, penalties, backend)
                prefill_run = plain_runner(weights, cfg, t, s, 1, temp, args.bake_weights, penalties, backend)
                for b_ in batches:  # compile outside the clock
                    plain_run(*b_).out_tokens.block_until_ready()
                    prefill_run(*b_).out_tokens.block_until_ready()
                plain_s, plain_out, _ = _pass(plain_run, batches)
                n_tokens = plain_out.shape[0] * m
                print(f"\n[{set_name} batch {batch} T={temp}] plain: {n_tokens / plain_s:.1f} tok/s", flush=True)
                for method, override in variants:
                    for k in args.ks:
                        d = {**METHOD_CONFIGS[method], **override, "num_speculative_tokens": k}
                        try:
                            spec = SpeculativeConfig.from_dict(d, cfg)
                            drafter, dparams = build_drafter(spec, cfg, weights.dtype, backend, target=weights)
                        except ValueError as e:
                            print(f"  {method} k={k}: skipped ({e})", flush=True)
                            continue
                        spec_run = spec_runner(weights, cfg, drafter, dparams, t, s, m, temp, args.bake_weights,
                                               penalties, backend)
                        plain_ts, spec_ts, pre_ts, out, states = _paired_runs(plain_run, spec_run, prefill_run, batches,
                                                                              args.repeats)
                        fwd = sum(int(x.forwards.sum()) for x in states)
                        drafted = sum(int(x.drafted.sum()) for x in states)
                        acc = sum(int(x.accepted.sum()) for x in states)
                        cost = None
                        if not args.no_draft_cost:
                            cost = draft_cost(weights, cfg, drafter, dparams, batches[0][0], t, s, m, temp,
                                              bake=args.bake_weights, penalties=penalties, backend=backend)
                        row = {"set": set_name, "batch": batch, "temperature": temp, "method": method, "k": k,
                               "acceptance_rate": acc / drafted, "tau": (acc + fwd) / fwd,
                               "draft_ms_per_token": None if cost is None else 1e3 * cost,
                               "draft_cost_ratio": None if cost is None else cost / step_s[batch],
                               "tok_s": n_tokens / float(np.median(spec_ts)),
                               "plain_tok_s": n_tokens / float(np.median(plain_ts)),
                               "speedup": float(np.median(np.asarray(plain_ts) / np.asarray(spec_ts))),
                               "pass_speedups": [round(a / b, 3) for a, b in zip(plain_ts, spec_ts)],
                               # TPOT ratio: the prefill-only pass of the same pair taken off both sides
                               "decode_speedup": float(np.median([(a - c) / (b - c) for a, b, c
                                                                  in zip(plain_ts, spec_ts, pre_ts)])),
                               "prefill_share": float(np.median([c / a for a, c in zip(plain_ts, pre_ts)])),
                               "greedy_identical": bool((out == plain_out).all()) if temp == 0 else None}
                        if method == "layer_skip":
                            row["num_layers"] = drafter.num_layers
                        if hasattr(drafter, "prompt_lookup_min"):
                            row["ngram"] = [drafter.prompt_lookup_min, drafter.prompt_lookup_max]
                        if getattr(drafter, "scale", None):
                            row["lookup_scale"] = drafter.scale
                        if spec.draft_vocab_size:
                            row["draft_vocab_size"] = spec.draft_vocab_size
                        rows.append(row)
                        # Each (drafter, k) compiles its own pair of programs; a process that keeps hundreds
                        # of them runs out of memory mappings in LLVM's JIT. Count them, then let them go
                        # (plain decoding's programs stay: every pair re-times it).
                        for name, fn in (("spec_prefill", spec_prefill), ("spec_decode", spec_decode)):
                            compiled[name] += fn._cache_size()
                            fn.clear_cache()
                        print(f"  {method:11s} k={k}: α {row['acceptance_rate']:.3f}  τ {row['tau']:.2f}  "
                              f"draft {row['draft_ms_per_token'] or 0:.2f} ms/tok "
                              f"({row['draft_cost_ratio'] or 0:.2f} step)  {row['tok_s']:.1f} tok/s  "
                              f"speedup {row['speedup']:.2f}x (pairs {min(row['pass_speedups']):.2f}-{max(row['pass_speedups']):.2f}; "
                              f"decode only {row['decode_speedup']:.2f}x, prefill {row['prefill_share']:.0%} of plain)"
                              + ("" if temp else f"  identical={row['greedy_identical']}"), flush=True)
    meta = {"target": target_dir.name, "params": cfg.num_params(), "dtype": args.dtype,
            "weight_layout": args.weight_layout, "attention_backend": backend, "max_tokens": m, "cache_len": s,
            "penalties": penalties,
            "plain_step_ms": {b: 1e3 * v for b, v in step_s.items()},
            "compilations": compiled,
            "bake_weights": args.bake_weights, "repeats": args.repeats, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "minutes": (time.time() - t_start) / 60, "machine": f"{platform.processor() or platform.machine()}, "
            f"{jax.device_count()} {jax.default_backend()} device(s)", "jax": jax.__version__,
            "command": "python experiments/bench_spec.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(Path(args.out), rows, meta)
    return 0


def write_results(out: Path, rows: list[dict], meta: dict):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Speculative decoding on {meta['target']} ({meta['params'] / 1e6:.1f}M params, "
             f"{meta.get('dtype', 'float32')})", "",
             f"`{meta['command']}` — {meta['machine']}, jax {meta['jax']}, {meta['minutes']:.0f} min; "
             f"XLA_FLAGS={meta['xla_flags'] or '(none)'}; weights "
             + ("baked into the programs (compile-time constants)" if meta["bake_weights"] else "passed as jit arguments")
             + f", weight_layout {meta.get('weight_layout', 'in_out')}, attention {meta.get('attention_backend', 'xla')}.",
             (f"Penalties on both sides: {meta['penalties']}. " if meta.get("penalties") else "")
             + f"{meta['max_tokens']} new tokens per row (EOS ignored); speedup = median over "
             f"{meta['repeats']} back-to-back pairs of (plain wall time / speculative wall time) on the same prompts, "
             "prefill included (each batch's prompts padded to the fine bucket of the longest, as LLM.generate "
             "pads them; tok/s: medians of the passes); decode only = the same with a prefill-only pass "
             "(prompt + first token) timed in each pair taken off both sides (the ratio of time per output "
             "token); τ = tokens per target forward "
             "(bonus / correction included); α = accepted / drafted; draft cost = one propose call per proposed "
             "token (ms, and as a fraction of a plain decode step: "
             + ", ".join(f"batch {b}: {v:.2f} ms" for b, v in meta["plain_step_ms"].items()) + ").", ""]
    best = {}
    for r in rows:
        key = (r["set"], r["batch"], r["temperature"], _label(r))
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    lines += ["## Best k per method", "", "| set | batch | T | method | k | α | τ | draft ms/tok (× step) | tok/s "
              "| plain tok/s | speedup | decode only |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in best.values():
        lines.append(_row(r))
    lines += ["", "## All runs", "", "| set | batch | T | method | k | α | τ | draft ms/tok (× step) | tok/s "
              "| plain tok/s | speedup | decode only |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in rows]
    mismatched = [r for r in rows if r["greedy_identical"] is False]
    same = "yes, every greedy run" if not mismatched else (
        "no: " + ", ".join(f"{r['set']} {r['method']} k={r['k']} (batch {r['batch']})" for r in mismatched)
        + ". A k+1-token verification forward and a one-token plain step that run different matmul kernels "
        "round differently in reduced precision, and near-ties of the argmax can flip (jaxinfer runs one-row bf16 "
        "dots as two rows on CPU so that both use the same kernel; see layers.one_row_padded)")
    lines += ["", f"Greedy outputs identical to plain decoding: {same}",
              f"Compilations: {meta['compilations']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out.with_suffix(".png"), rows)


def _label(r: dict) -> str:
    scale = f", {r['lookup_scale']} per matched token" if r.get("lookup_scale") else ""
    return r["method"] + (f" (L'={r['num_layers']})" if "num_layers" in r else "") + (
        f" (n={r['ngram'][0]}..{r['ngram'][1]}{scale})" if "ngram" in r else "") + (
        f" (draft vocab {r['draft_vocab_size']})" if r.get("draft_vocab_size") else "")


def _row(r: dict) -> str:
    cost = "-" if r["draft_ms_per_token"] is None else f"{r['draft_ms_per_token']:.2f} ({r['draft_cost_ratio']:.2f})"
    name = _label(r)
    dec = f"{r['decode_speedup']:.2f}x" if "decode_speedup" in r else "-"
    return (f"| {r['set']} | {r['batch']} | {r['temperature']:g} | {name} | {r['k']} | {r['acceptance_rate']:.3f} "
            f"| {r['tau']:.2f} | {cost} | {r['tok_s']:.1f} | {r['plain_tok_s']:.1f} | {r['speedup']:.2f}x | {dec} |")


def plot(path: Path, rows: list[dict]):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = sorted({(r["set"], r["batch"], r["temperature"]) for r in rows})
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, (set_name, batch, temp) in zip(axes.flat, panels):
        for label in dict.fromkeys(_label(r) for r in rows):
            pts = sorted((r["k"], r["speedup"]) for r in rows
                         if (r["set"], r["batch"], r["temperature"], _label(r)) == (set_name, batch, temp, label))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{set_name}, batch {batch}, T={temp:g}", fontsize=9)
        ax.set_xlabel("k (speculative tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over plain decoding")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
