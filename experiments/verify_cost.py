"""What a speculative round's verification costs: one target forward over T = k+1 tokens vs T = 1.

Speculative decoding pays off when tau (tokens per round) exceeds the cost of a round in plain
steps; the verify forward is the floor of that cost. On a GPU, decode is memory-bound and T = k+1
costs about what T = 1 does; on a CPU the weight matmuls at M = B*T rows are not free. Times the
embedded target's forward (contiguous cache, context ~200 tokens) at each T inside one jitted
fori_loop, in one run, and writes experiments/results/verify_cost.{json,md}.

    python experiments/verify_cost.py [--model stdlib-target] [--batches 1 8] [--tokens 1 2 3 5 9]
                                      [--dtypes float32 bfloat16] [--weight-layout in_out]
                                      [--attention-backend xla] [--out experiments/results/verify_cost]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.checkpoint import load_hf
from jaxinfer.kv.cache import AttentionMeta, init_contiguous
from jaxinfer.layers import ATTENTION_BACKENDS, resolve_backend
from jaxinfer.llm import resolve_model
from jaxinfer.model import WEIGHT_LAYOUTS, forward, runtime_layout

RESULTS = Path(__file__).parent / "results"


def loop_timer(weights, cfg, kv, meta: AttentionMeta, t: int, steps: int = 100, backend: str = "xla"):
    """Compile (and warm up) a jitted fori_loop of `steps` forwards over t new tokens per row into
    cache kv (each feeds its argmax to the next; meta is fixed, so every step rewrites the same
    slots). Returns timed(): the best-of-3 time (ms) of one forward, the program reused."""
    batch = meta.kv_lens.shape[0]

    @jax.jit
    def loop(weights, kv):
        def body(i, carry):
            kv, tok = carry
            tokens = jnp.broadcast_to(tok, (batch, t))
            logits, _, kv = forward(weights, cfg, tokens, meta.query_positions(t), kv, meta, backend=backend)
            return kv, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (kv, jnp.ones((batch, 1), jnp.int32)))[1]

    loop(weights, kv).block_until_ready()

    def timed() -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            loop(weights, kv).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best / steps
    return timed


def loop_ms(weights, cfg, kv, meta: AttentionMeta, t: int, steps: int = 100, backend: str = "xla") -> float:
    """Best-of-3 time (ms) of one forward (`loop_timer`, compiled and timed once)."""
    return loop_timer(weights, cfg, kv, meta, t, steps, backend)()


def forward_timer(weights, cfg, batch: int, t: int, context: int = 200, steps: int = 100, backend: str = "xla"):
    """`loop_timer` for one forward over t new tokens per row after `context` cached ones,
    contiguous cache."""
    kv, page_table = init_contiguous(cfg.num_layers, batch, context + t + 64, cfg.num_kv_heads, cfg.head_dim,
                                     weights.dtype)
    meta = AttentionMeta(page_table=page_table, kv_lens=jnp.full((batch,), context + t, jnp.int32),
                         q_lens=jnp.full((batch,), t, jnp.int32), contiguous=True)
    return loop_timer(weights, cfg, kv, meta, t, steps, backend)


def forward_ms(weights, cfg, batch: int, t: int, context: int = 200, steps: int = 100, backend: str = "xla") -> float:
    """One forward over t new tokens per row after `context` cached ones, contiguous cache (ms)."""
    return forward_timer(weights, cfg, batch, t, context, steps, backend)()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--weight-layout", default="in_out", choices=list(WEIGHT_LAYOUTS),
                    help="the weights as LLM(weight_layout=...) holds them (auto: what LLM does)")
    ap.add_argument("--attention-backend", default="xla", choices=list(ATTENTION_BACKENDS),
                    help="as LLM(attention_backend=...)")
    ap.add_argument("--out", default=str(RESULTS / "verify_cost"))
    args = ap.parse_args()
    rows, backends = [], {}
    for dtype in args.dtypes:
        backend = backends[dtype] = resolve_backend(args.attention_backend, dtype)
        cfg, weights = load_hf(resolve_model(args.model), dtype)
        weights = runtime_layout(weights, args.weight_layout)
        for b in args.batches:
            base = None
            for t in args.tokens:
                ms = forward_ms(weights, cfg, b, t, backend=backend)
                base = base or ms
                rows.append(dict(dtype=dtype, batch=b, tokens=t, ms=round(ms, 3), vs_one_token=round(ms / base, 2)))
                print(f"{dtype:9s} batch {b:2d}  T={t}: {ms:7.3f} ms per forward   {ms / base:5.2f}x T={args.tokens[0]}",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "weight_layout": args.weight_layout, "attention_backend": backends, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    md = [f"Target forward over T new tokens per row ({args.model}, context 200; weight layout "
          f"{args.weight_layout}, attention {backends}), "
          f"relative to T = {args.tokens[0]} in the same dtype. `python experiments/verify_cost.py "
          + " ".join(sys.argv[1:]) + "`", "",
          "| dtype | batch | T | ms | vs T=1 |", "|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['batch']} | {r['tokens']} | {r['ms']} | {r['vs_one_token']}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
