"""What the paged KV cache costs a decode step on the XLA path, per attention implementation.

One decode forward of the embedded target over each cache, inside one jitted fori_loop
(`verify_cost.loop_ms`), all in one run:
- contiguous: `generate_static`'s float32 cache [B, K, S, H], read in place; every row holds S
  slots, the longest row's length rounded up to 64;
- paged, loop: `layers.attention_paged_loop`, which steps every row through the longest row's
  64-slot chunks (gather, products, online softmax);
- paged, ragged: `layers.attention_paged_ragged` (the engine's decode path), whose work items
  follow each row's own length.
Two length mixes with the same mean context: "uniform" (every row at --context tokens) and
"mixed" (lengths drawn uniformly from [16, 2 * context - 16], as rows of a serving batch are).
The pages of the paged cache are a random permutation, as they end up after a while of serving.
Writes experiments/results/paged_decode_cost.{json,md}.

    python experiments/paged_decode_cost.py [--model stdlib-target] [--batches 8 24 48] [--context 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from verify_cost import loop_ms  # experiments/ is on sys.path when this runs as a script

from jaxinfer import layers
from jaxinfer.checkpoint import load_hf
from jaxinfer.kv.cache import AttentionMeta, init_contiguous, init_paged
from jaxinfer.llm import resolve_model

RESULTS = Path(__file__).parent / "results"
PAGE = 16
STEPS = 20


def row_lengths(batch: int, context: int, mix: str, seed: int = 0) -> np.ndarray:
    if mix == "uniform":
        return np.full((batch,), context, np.int32)
    return np.random.default_rng(seed).integers(16, 2 * context - 15, size=batch).astype(np.int32)


def decode_ms(weights, cfg, lens: np.ndarray, layout: str) -> float:
    batch = len(lens)
    if layout == "contiguous":
        slots = -(-int(lens.max()) // 64) * 64
        kv, table = init_contiguous(cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim, weights.dtype)
    else:
        pages = [-(-int(n) // PAGE) for n in lens]
        num_pages = sum(pages) + 1
        kv = init_paged(cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim, weights.dtype)
        perm = np.random.default_rng(0).permutation(num_pages - 1)
        table = np.zeros((batch, max(pages)), np.int32)
        start = 0
        for b, n in enumerate(pages):
            table[b, :n] = perm[start:start + n]
            start += n
        table = jnp.asarray(table)
    meta = AttentionMeta(page_table=table, kv_lens=jnp.asarray(lens), q_lens=jnp.ones((batch,), jnp.int32),
                         contiguous=layout == "contiguous")
    ragged_max = layers.RAGGED_MAX_TOKENS
    layers.RAGGED_MAX_TOKENS = ragged_max if layout == "paged_ragged" else 0  # read when the step is traced
    try:
        return loop_ms(weights, cfg, kv, meta, 1, STEPS)
    finally:
        layers.RAGGED_MAX_TOKENS = ragged_max


LAYOUTS = ("contiguous", "paged_loop", "paged_ragged")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 24, 48])
    ap.add_argument("--context", type=int, default=300, help="mean tokens in a row's cache")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timings per layout (best is kept)")
    args = ap.parse_args()
    cfg, weights = load_hf(resolve_model(args.model), "float32")
    rows = []
    for mix in ("uniform", "mixed"):
        for b in args.batches:
            lens = row_lengths(b, args.context, mix)
            # Best of --rounds, the layouts interleaved: a slow moment of this shared machine then
            # costs one sample of each, not one layout's only sample.
            times = {layout: [] for layout in LAYOUTS}
            for _ in range(args.rounds):
                for layout in LAYOUTS:
                    times[layout].append(decode_ms(weights, cfg, lens, layout))
            ms = {layout: round(min(t), 2) for layout, t in times.items()}
            row = dict(mix=mix, batch=b, cached_tokens=int(lens.sum()), longest=int(lens.max()),
                       **{f"{k}_ms": v for k, v in ms.items()},
                       loop_over_ragged=round(ms["paged_loop"] / ms["paged_ragged"], 2),
                       ragged_over_contiguous=round(ms["paged_ragged"] / ms["contiguous"], 2))
            rows.append(row)
            print(f"{mix:7s} batch {b:2d} ({row['cached_tokens']} tokens, longest {row['longest']}): "
                  + "  ".join(f"{k} {v:6.2f} ms" for k, v in ms.items())
                  + f"  loop/ragged {row['loop_over_ragged']:.2f}x  ragged/contiguous {row['ragged_over_contiguous']:.2f}x",
                  flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = dict(model=args.model, context=args.context, page_size=PAGE, rounds=args.rounds, rows=rows)
    (RESULTS / "paged_decode_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [(f"One decode forward ({args.model}, float32, XLA attention, pages of {PAGE}, mean context "
           f"{args.context}, best of {args.rounds} interleaved rounds): a contiguous cache vs a paged one read by `attention_paged_loop` (every row up to "
           "the longest) and by `attention_paged_ragged` (each row up to its own length; the engine's decode "
           "path). `python experiments/paged_decode_cost.py`"), "",
          ("| lengths | batch | cached tokens | longest | contiguous ms | paged loop ms | paged ragged ms "
           "| loop / ragged | ragged / contiguous |"), "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['mix']} | {r['batch']} | {r['cached_tokens']} | {r['longest']} | {r['contiguous_ms']} "
           f"| {r['paged_loop_ms']} | {r['paged_ragged_ms']} | {r['loop_over_ragged']}x | {r['ragged_over_contiguous']}x |"
           for r in rows]
    (RESULTS / "paged_decode_cost.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'paged_decode_cost.md'}")


if __name__ == "__main__":
    main()
