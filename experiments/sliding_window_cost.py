"""What Gemma's interleaved sliding-window layers buy a decode step, and what soft-capping costs.

A Gemma 3-shaped model (random weights; by default 6 layers, hidden 256, 4 query heads of 64 over
1 KV head, 4096-token vocabulary) decodes one token per row over the engine's paged cache (pages
of 16 in a random order) at several context lengths, inside one jitted fori_loop
(`verify_cost.loop_timer`). Every variant runs the same weights:
- global: every layer attends to the whole context (`layer_types` all full_attention);
- 5:1 window: Gemma 3's pattern, five sliding-window layers (--window tokens) to each global one;
  the attention paths start each row at its window (the native kernel's and the ragged path's
  first block, the loop's first chunk), so those layers read --window keys, not the context;
- 5:1 window + soft cap: the same with Gemma 2's attention logit soft-capping (cap 50): a tanh
  per score (the native kernel's from its vector exp, 8 or 16 scores at a time; XLA's fused into
  the score products).
Timings are interleaved (--rounds passes over every compiled variant, best kept). KV memory is
the same for all: the engine keeps every layer's keys for the whole context (vLLM's hybrid
allocator frees a sliding layer's pages once they leave the window; jaxinfer does not).
Writes experiments/results/sliding_window_cost.{json,md}.

    python experiments/sliding_window_cost.py [--contexts 512 2048 8192] [--batch 4] [--window 512]
                                              [--backends native xla]
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
import numpy as np
from report import best_interleaved  # experiments/ is on sys.path when this runs as a script
from verify_cost import loop_timer

from jaxinfer import cpu_kernels
from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, init_paged
from jaxinfer.model import init_weights, runtime_layout

RESULTS = Path(__file__).parent / "results"
PAGE = 16
STEPS = 40


def gemma3_shaped(layers: int, window: int) -> ModelConfig:
    return ModelConfig(
        architecture="Gemma3ForCausalLM", vocab_size=4096, hidden_size=256, intermediate_size=1024,
        num_layers=layers, num_heads=4, num_kv_heads=1, head_dim=64, max_position_embeddings=32768,
        tie_word_embeddings=True, qk_norm=True, hidden_act="gelu_pytorch_tanh", norm_style="gemma",
        scale_embeddings=True, sandwich_norms=True, query_pre_attn_scalar=64.0, sliding_window=window,
        layer_types=tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)),
        rope_theta=1_000_000.0, local_rope_theta=10_000.0)


def variants(cfg: ModelConfig) -> dict[str, ModelConfig]:
    return {"global": dataclasses.replace(cfg, layer_types=("full_attention",) * cfg.num_layers),
            "5:1 window": cfg,
            "5:1 window + soft cap": dataclasses.replace(cfg, attn_logit_softcapping=50.0)}


def paged_meta(batch: int, context: int, kv_dtype, cfg: ModelConfig):
    pages = -(-(context + 1) // PAGE)
    num_pages = batch * pages + 1
    kv = init_paged(cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
    kv = jax.tree_util.tree_map(  # random keys and values: the softmax sees real scores
        lambda a: jax.random.normal(jax.random.PRNGKey(a.size % 97), a.shape, jnp.float32).astype(a.dtype), kv)
    table = np.random.default_rng(0).permutation(num_pages - 1)[:batch * pages].reshape(batch, pages)
    meta = AttentionMeta(page_table=jnp.asarray(table.astype(np.int32)),
                         kv_lens=jnp.full((batch,), context + 1, jnp.int32), q_lens=jnp.ones((batch,), jnp.int32))
    return kv, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--backends", nargs="+", default=["native", "xla"], choices=["native", "xla"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "sliding_window_cost"))
    args = ap.parse_args()

    t0 = time.time()
    base = gemma3_shaped(args.layers, args.window)
    weights = init_weights(base, jax.random.PRNGKey(0), std=0.05)
    timers = {}
    for backend in args.backends:
        if backend == "native" and not cpu_kernels.available(jnp.float32):
            print(f"skipping native: {cpu_kernels.unavailable_reason(jnp.float32)}")
            continue
        w = runtime_layout(weights, "auto")
        for context in args.contexts:
            kv, meta = paged_meta(args.batch, context, jnp.float32, base)
            for name, cfg in variants(base).items():
                timers[(backend, context, name)] = loop_timer(w, cfg, kv, meta, 1, STEPS, backend)
                print(f"compiled {backend} context {context} {name}", flush=True)
    best = best_interleaved(timers, args.rounds)
    rows = []
    for (backend, context, name), ms in best.items():
        ref = best[(backend, context, "global")]
        rows.append({"backend": backend, "context": context, "variant": name, "ms": round(ms, 3),
                     "vs_global": round(ref / ms, 2)})
        print(f"{backend:6s} context {context:5d}  {name:22s} {ms:8.3f} ms   {ref / ms:.2f}x global's speed")

    cmd = "python experiments/sliding_window_cost.py " + " ".join(sys.argv[1:])
    md = [f"# Decode step of a Gemma 3-shaped model: global layers vs 5:1 sliding windows ({args.window} tokens)", "",
          (f"`{cmd.strip()}` — {platform.machine()}, jax {jax.__version__}, {(time.time() - t0) / 60:.0f} min. "
           f"{args.layers} layers, hidden 256, 4 query heads of 64 over 1 KV head, float32, batch {args.batch}, "
           f"one new token per row over a paged cache (pages of {PAGE}, random order); best of {args.rounds} "
           f"interleaved timings of a {STEPS}-step jitted loop. Speed relative to the all-global model on the same "
           "backend and context (>1: faster). KV memory is the same for all (every layer keeps the whole context)."),
          "", "| backend | context | variant | ms / step | speed vs global |", "|---|---|---|---|---|"]
    md += [f"| {r['backend']} | {r['context']} | {r['variant']} | {r['ms']} | {r['vs_global']}x |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
