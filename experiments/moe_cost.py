"""What a mixture of experts costs a decode step here, and how each way of running the experts fares.

Two measurements, float32 on this machine's CPU, random weights:

1. One MoE MLP (`moe.sparse_mlp`: routing plus experts) on M tokens, for each implementation
   (`jaxinfer.moe`): "dense" (every expert on every token, one matmul batched over experts),
   "skip" (one `lax.cond` per expert, so an expert no token chose is never read), "grouped" (each
   expert on the tokens that chose it: sorted, in chunks of `moe.GROUP_CHUNK` rows).
   Two shapes: Mixtral's (8 experts, top 2) and Qwen3-MoE's fine-grained one (64 experts, top 8),
   both at hidden 512. "auto" marks `moe.choose_impl`'s pick.
2. A whole model's decode step (`verify_cost.loop_timer`: a jitted loop of forwards, one new token
   per row over a paged cache of --context tokens), for a Mixtral-shaped MoE model (8 experts of
   width F, top 2) against two dense models of the same attention: one with the MoE's active MLP
   parameters (width 2F: what a token multiplies) and one with its total (width 8F: what the
   weights hold). Decode here is bound by reading weights, so a batch whose tokens choose few
   experts runs near the active-parameter model, and one that touches them all near the total.
3. Quantized experts (`wquant.quantize_experts_rtn`, each format's default group) in one MoE MLP
   under "skip" (what "auto" runs for decode), against float32 experts: each format with its
   codes tied to x (`wquant.quantized_matmul`: the dequantization fused into each product,
   row by row) and untied (the expert's matrix dequantized, then one product). A dense model's
   untied product in a decode loop multiplies a float32 copy that XLA dequantizes once, before
   the loop; an expert under `lax.cond` cannot be hoisted so, and is dequantized every step.
   Sets `moe.EXPERT_TIED_ROWS`.

Timings are interleaved (--rounds passes over every compiled program, best kept).
Writes experiments/results/moe_cost.{md,json}.

    python experiments/moe_cost.py [--tokens 1 2 4 8 32 128 512] [--batches 1 4 16] [--rounds 5]
        [--parts mlp decode quant] [--quant-tokens 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from report import best_interleaved  # experiments/ is on sys.path when this runs as a script
from sliding_window_cost import paged_meta
from verify_cost import loop_timer

from jaxinfer import moe
from jaxinfer.config import ModelConfig
from jaxinfer.model import init_weights
from jaxinfer.wquant import WeightQuantConfig, quantize_experts_rtn

RESULTS = Path(__file__).parent / "results"
IMPLS = ("dense", "skip", "grouped")
STEPS = 20


def mlp_config(experts: int, top_k: int, width: int) -> ModelConfig:
    return ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=4096, hidden_size=512, intermediate_size=width,
                       num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=4096,
                       num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width)


def model_config(layers: int, width: int, experts: int = 0) -> ModelConfig:
    """Mixtral-shaped (top 2 of `experts`, each `width` wide), or dense with an MLP `width` wide."""
    moe_fields = {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": width} if experts else {}
    return ModelConfig(architecture="MixtralForCausalLM" if experts else "LlamaForCausalLM", vocab_size=4096,
                       hidden_size=512, intermediate_size=width, num_layers=layers, num_heads=8, num_kv_heads=2,
                       head_dim=64, max_position_embeddings=4096, **moe_fields)


def mlp_timer(cfg: ModelConfig, m: int, impl: str, fmt: str | None = None, tied: bool = False):
    """Compiled timer of `moe.sparse_mlp` on m tokens: best-of-3 ms of one call (STEPS in a loop).
    fmt: the experts quantized to it (round to nearest), their products tied or not."""
    keys = jax.random.split(jax.random.PRNGKey(m), 4)
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    args = (jax.random.normal(keys[0], (m, d)), jax.random.normal(keys[1], (d, e)),
            0.05 * jax.random.normal(keys[2], (e, d, 2 * f)), 0.05 * jax.random.normal(keys[3], (e, f, d)))
    if fmt is not None:
        qc = WeightQuantConfig(format=fmt)
        args = (*args[:2], *(quantize_experts_rtn(w, fmt, qc.group_of(fmt, w.shape[1])) for w in args[2:]))

    @jax.jit
    def loop(x, router, w_gate_up, w_down):  # each call's output feeds the next: nothing is hoisted
        return jax.lax.fori_loop(0, STEPS, lambda i, x: moe.sparse_mlp(x, router, w_gate_up, w_down, cfg, impl),
                                 x)
    saved = dict(moe.EXPERT_TIED_ROWS)
    if fmt is not None:
        moe.EXPERT_TIED_ROWS[fmt] = m if tied else 0
    loop(*args).block_until_ready()  # compiled now, with this choice
    moe.EXPERT_TIED_ROWS.update(saved)

    def timed() -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            loop(*args).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best / STEPS
    return timed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024, help="F: each expert's width")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parts", nargs="+", default=["mlp", "decode", "quant"], choices=["mlp", "decode", "quant"])
    ap.add_argument("--quant-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--formats", nargs="+", default=["int8", "int4", "fp8_e4m3", "nvfp4"])
    ap.add_argument("--out", default=str(RESULTS / "moe_cost"))
    args = ap.parse_args()
    t0 = time.time()

    # 1. one MoE MLP, each implementation
    shapes = {"8 experts, top 2, F 1024": mlp_config(8, 2, 1024), "64 experts, top 8, F 256": mlp_config(64, 8, 256)}
    if "mlp" not in args.parts:
        shapes = {}
    timers = {}
    for shape, cfg in shapes.items():
        for m in args.tokens:
            for impl in IMPLS:
                timers[(shape, m, impl)] = mlp_timer(cfg, m, impl)
            print(f"compiled {shape}, {m} tokens", flush=True)
    best = best_interleaved(timers, args.rounds)
    mlp_rows = []
    for shape, cfg in shapes.items():
        for m in args.tokens:
            ms = {impl: best[(shape, m, impl)] for impl in IMPLS}
            row = {"shape": shape, "tokens": m, **{f"{impl}_ms": round(v, 3) for impl, v in ms.items()},
                   "fastest": min(ms, key=ms.get), "auto": moe.choose_impl(m, cfg)}
            row["auto_vs_fastest"] = round(ms[row["fastest"]] / ms[row["auto"]], 2)
            mlp_rows.append(row)
            print(row, flush=True)

    # 2. a whole decode step: MoE vs dense models of its active and of its total MLP parameters
    f = args.width
    models = {"MoE (8 experts x F, top 2)": model_config(args.layers, f, experts=8),
              "dense, active params (2F)": model_config(args.layers, 2 * f),
              "dense, total params (8F)": model_config(args.layers, 8 * f)}
    if "decode" not in args.parts:
        models = {}
    params = {name: cfg.num_params() for name, cfg in models.items()}
    timers = {}
    for name, cfg in models.items():
        weights = init_weights(cfg, jax.random.PRNGKey(0), std=0.05)
        impls = IMPLS if cfg.num_experts else (None,)
        for batch in args.batches:
            kv, meta = paged_meta(batch, args.context, jnp.float32, cfg)
            for impl in impls:
                run_cfg = dataclasses.replace(cfg, moe_impl=impl) if impl else cfg
                timers[(name, impl, batch)] = loop_timer(weights, run_cfg, kv, meta, 1, STEPS)
            print(f"compiled {name} batch {batch}", flush=True)
    best = best_interleaved(timers, args.rounds)
    step_rows = []
    for (name, impl, batch), ms in best.items():
        active = best[("dense, active params (2F)", None, batch)]
        total = best[("dense, total params (8F)", None, batch)]
        auto = impl and impl == moe.choose_impl(batch, models[name])
        step_rows.append({"model": name, "moe_impl": (impl + " (auto)" if auto else impl) or "-", "batch": batch,
                          "params": params[name],
                          "ms": round(ms, 3), "tok_s": round(1e3 * batch / ms, 1),
                          "vs_active": round(active / ms, 2), "vs_total": round(total / ms, 2)})
        print(step_rows[-1], flush=True)

    # 3. quantized experts under "skip": tied and untied products against float32 experts
    quant_rows = []
    if "quant" in args.parts:
        cfg = mlp_config(8, 2, 1024)
        timers = {}
        for m in args.quant_tokens:
            timers[(m, None, False)] = mlp_timer(cfg, m, "skip")
            for fmt in args.formats:
                for tied in (True, False):
                    timers[(m, fmt, tied)] = mlp_timer(cfg, m, "skip", fmt, tied)
            print(f"compiled quantized experts, {m} tokens", flush=True)
        best = best_interleaved(timers, args.rounds)
        for m in args.quant_tokens:
            f32 = best[(m, None, False)]
            for fmt in args.formats:
                tied, untied = best[(m, fmt, True)], best[(m, fmt, False)]
                quant_rows.append({"tokens": m, "format": fmt, "float32_ms": round(f32, 3), "tied_ms": round(tied, 3),
                                   "untied_ms": round(untied, 3), "tied_vs_f32": round(f32 / tied, 2),
                                   "untied_vs_f32": round(f32 / untied, 2),
                                   "default": "tied" if m <= moe.EXPERT_TIED_ROWS[fmt] else "untied"})
                print(quant_rows[-1], flush=True)

    cmd = "python experiments/moe_cost.py " + " ".join(sys.argv[1:])
    header = (f"`{cmd.strip()}` — {platform.machine()}, {jax.default_backend()}, jax {jax.__version__}, "
              f"{(time.time() - t0) / 60:.0f} min, float32, random weights, best of {args.rounds} interleaved "
              "timings. XLA's dots throughout (the weights as the checkpoint holds them, no CPU kernels).")
    md = ["# What a mixture of experts costs a decode step, and each way of running the experts", "", header, ""]
    if mlp_rows:
        md += [f"## One MoE MLP on M tokens (hidden 512; ms per call, {STEPS}-call jitted loop)", "",
               "| experts | tokens | dense ms | skip ms | grouped ms | fastest | auto picks | auto vs fastest |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['shape']} | {r['tokens']} | {r['dense_ms']} | {r['skip_ms']} | {r['grouped_ms']} "
               f"| {r['fastest']} | {r['auto']} | {r['auto_vs_fastest']}x |" for r in mlp_rows]
    title = (f"## Decode step: {args.layers} layers, hidden 512, 8 heads of 64 over 2 KV heads, context "
             f"{args.context}, F = {f}")
    sizes = ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in params.items())
    md += [] if not step_rows else ["", title, "",
           f"Speed relative to the dense models (>1: faster than it). Parameters: {sizes}.", "",
           "| model | moe_impl | batch | ms / step | tok/s | vs dense-active | vs dense-total |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['moe_impl']} | {r['batch']} | {r['ms']} | {r['tok_s']} | {r['vs_active']}x "
           f"| {r['vs_total']}x |" for r in sorted(step_rows, key=lambda r: (r["batch"], r["model"]))]
    if quant_rows:
        md += ["", ("## Quantized experts: one MoE MLP under \"skip\" (8 experts of F 1024, top 2, hidden 512; "
                    f"ms per call, {STEPS}-call jitted loop)"), "",
               "Speed relative to float32 experts (>1: faster). `default`: what `moe.EXPERT_TIED_ROWS` picks.", "",
               "| tokens | format | float32 ms | tied ms | untied ms | tied vs f32 | untied vs f32 | default |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['tokens']} | {r['format']} | {r['float32_ms']} | {r['tied_ms']} | {r['untied_ms']} | "
               f"{r['tied_vs_f32']}x | {r['untied_vs_f32']}x | {r['default']} |" for r in quant_rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "mlp": mlp_rows, "decode": step_rows, "quant": quant_rows},
                                                   indent=1) + "\n")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
