"""What the paged KV cache costs a decode step on the XLA path: paged vs contiguous, same work.

The engine's decode attention (`layers.attention_paged_loop`) gathers every row's pages
through its page table, 64 slots at a time, before the attention products of each chunk;
`generate_static` reads a float32 contiguous cache in place. Times one decode forward of the
embedded target over each layout (same rows, same cache slots per row, same context), inside
one jitted fori_loop, in one run.
The pages of the paged cache are a random permutation, as they end up after a while of serving.
Writes experiments/results/paged_decode_cost.{json,md}.

    python experiments/paged_decode_cost.py [--model stdlib-target] [--batches 8 24 48] [--slots 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from verify_cost import loop_ms  # experiments/ is on sys.path when this runs as a script

from jaxinfer.checkpoint import load_hf
from jaxinfer.kv.cache import AttentionMeta, init_contiguous, init_paged
from jaxinfer.llm import resolve_model

RESULTS = Path(__file__).parent / "results"
PAGE = 16
STEPS = 20


def decode_ms(weights, cfg, batch: int, slots: int, context: int, paged: bool) -> float:
    pages_per_row = slots // PAGE
    if paged:
        num_pages = batch * pages_per_row + 1
        kv = init_paged(cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim, weights.dtype)
        perm = np.random.default_rng(0).permutation(num_pages - 1)[:batch * pages_per_row]
        table = jnp.asarray(perm.reshape(batch, pages_per_row), jnp.int32)
    else:
        kv, table = init_contiguous(cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim, weights.dtype)
    meta = AttentionMeta(page_table=table, kv_lens=jnp.full((batch,), context, jnp.int32),
                         q_lens=jnp.ones((batch,), jnp.int32), contiguous=not paged)
    return loop_ms(weights, cfg, kv, meta, 1, STEPS)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 24, 48])
    ap.add_argument("--slots", type=int, default=512, help="cache slots per row (both layouts)")
    ap.add_argument("--context", type=int, default=400, help="tokens in each row's cache")
    args = ap.parse_args()
    cfg, weights = load_hf(resolve_model(args.model), "float32")
    rows = []
    for b in args.batches:
        contiguous = decode_ms(weights, cfg, b, args.slots, args.context, paged=False)
        paged = decode_ms(weights, cfg, b, args.slots, args.context, paged=True)
        rows.append(dict(batch=b, contiguous_ms=round(contiguous, 2), paged_ms=round(paged, 2),
                         paged_over_contiguous=round(paged / contiguous, 2)))
        print(f"batch {b:2d}: contiguous {contiguous:6.2f} ms  paged {paged:6.2f} ms  "
              f"({paged / contiguous:.2f}x)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = dict(model=args.model, slots=args.slots, context=args.context, page_size=PAGE, rows=rows)
    (RESULTS / "paged_decode_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"One decode forward ({args.model}, float32, XLA attention, {args.slots} cache slots per row, "
          f"context {args.context}, pages of {PAGE}): paged cache vs contiguous. "
          "`python experiments/paged_decode_cost.py`", "",
          "| batch | contiguous ms | paged ms | paged / contiguous |", "|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['contiguous_ms']} | {r['paged_ms']} | {r['paged_over_contiguous']}x |" for r in rows]
    (RESULTS / "paged_decode_cost.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'paged_decode_cost.md'}")


if __name__ == "__main__":
    main()
