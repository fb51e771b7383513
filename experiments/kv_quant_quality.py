"""KV-cache quantization: what each format costs in quality and buys in capacity.

On the embedded target and the held-out split, for every kv_cache_dtype:
  * perplexity (and its change vs `auto`) and the KL divergence of next-token distributions
    vs `auto`, teacher-forced through the cache in chunks of --chunk tokens: every key that
    attention reads, the current chunk's included, comes from the quantized cache;
  * the same perplexity through the engine, `LLM(kv_cache_dtype=X, max_num_batched_tokens=small)`
    with prompt_logprobs (chunked prefill over the quantized paged cache) on a subset;
  * greedy agreement with `auto` over 256 generated tokens from 32 held-out prompts;
  * bytes per token (K+V, all layers, scales included) and their ratio to a bf16 cache;
  * concurrent sequences that fit in a fixed KV budget in the engine.
Writes experiments/results/kv_quant_quality.{json,md,png}.

    python experiments/kv_quant_quality.py [--windows 16] [--window-len 512] [--chunk 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import LLM, SamplingParams
from jaxinfer.corpus import build_corpus, heldout_prompts
from jaxinfer.kv.cache import AttentionMeta, init_contiguous
from jaxinfer.kv.memory import kv_bytes_per_token
from jaxinfer.kv.quant import KVQuantSpec
from jaxinfer.model import forward

RESULTS = Path(__file__).parent / "results"
FORMATS = ["auto", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int4_kivi", "nvfp4"]
TARGETS = {"fp8_e4m3": (0.5, 0.53), "int8": (0.5, 0.53), "int4": (3.0, 0.3), "int4_kivi": (3.0, 0.3),
           "nvfp4": (3.0, 0.3)}


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "chunk"))
def chunked_logprobs(weights, cfg, spec, chunk: int, tokens):
    """Teacher-forced log-probs [B, T, V] of windows tokens [B, T], fed in chunks through a
    (quantized) contiguous cache: each chunk attends to the cached prefix and to itself,
    all read back from the cache."""
    b, t = tokens.shape
    kv, table = init_contiguous(cfg.num_layers, b, t, cfg.num_kv_heads, cfg.head_dim, weights.dtype, spec)
    outs = []
    for start in range(0, t, chunk):
        n = min(chunk, t - start)
        meta = AttentionMeta(table, jnp.full((b,), start + n, jnp.int32), jnp.full((b,), n, jnp.int32),
                             contiguous=True)
        pos = jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (b, n))
        logits, _, kv = forward(weights, cfg, tokens[:, start:start + n], pos, kv, meta)
        outs.append(jax.nn.log_softmax(logits, axis=-1))
    return jnp.concatenate(outs, axis=1)


def windows(heldout: np.ndarray, n: int, length: int) -> np.ndarray:
    """n evenly spaced windows of the held-out stream: [n, length] int32."""
    starts = np.linspace(0, len(heldout) - length - 1, n).astype(int)
    return np.stack([heldout[s:s + length] for s in starts]).astype(np.int32)


def teacher_forced(llm: LLM, toks: np.ndarray, chunk: int, ref_lp=None):
    """(perplexity, KL(auto || fmt) mean, log-probs) over windows, batch of 4 at a time."""
    spec = llm.engine.kv_quant
    nll, kl, lps = [], [], []
    for i in range(0, len(toks), 4):
        lp = chunked_logprobs(llm.weights, llm.cfg, spec, chunk, jnp.asarray(toks[i:i + 4]))
        tgt = toks[i:i + 4, 1:]
        nll.append(-np.take_along_axis(np.asarray(lp[:, :-1]), tgt[..., None], axis=-1)[..., 0])
        if ref_lp is not None:
            r = ref_lp[i // 4]
            kl.append(np.asarray(jnp.sum(jnp.exp(r) * (r - lp), axis=-1)))
        lps.append(lp)
    ppl = math.exp(float(np.mean(np.concatenate(nll))))
    return ppl, (float(np.mean(np.concatenate(kl))) if kl else 0.0), lps


def engine_perplexity(llm: LLM, toks: np.ndarray) -> float:
    """Perplexity from prompt_logprobs through the engine (chunked prefill over the paged cache)."""
    outs = llm.generate([{"prompt_token_ids": t.tolist()} for t in toks],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    nll = [-pl[t].logprob for o in outs for pl, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
    return math.exp(float(np.mean(nll)))


def capacity(model: str, fmt: str, budget: int, prompt_len: int, out_len: int, n: int, vocab: int) -> int:
    """Most sequences the engine ran at once with `budget` bytes of KV (prompt + output each)."""
    llm = LLM(model, kv_cache_dtype=fmt, kv_cache_memory_bytes=budget, max_num_seqs=n, block_size=32,
              max_num_batched_tokens=2048, enable_prefix_caching=False, max_model_len=prompt_len + out_len + 16)
    rng = np.random.default_rng(0)
    eng = llm.engine
    for i in range(n):
        eng.add_request(str(i), {"prompt_token_ids": rng.integers(3, vocab, prompt_len).tolist()},
                        SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0))
    most = 0
    while eng.has_unfinished_requests():
        eng.step()
        most = max(most, eng.get_stats().num_running)
    return most


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--engine-windows", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--budget-mib", type=float, default=24.0)
    ap.add_argument("--workdir", default="runs/default_models")
    args = ap.parse_args()

    data = build_corpus(args.workdir, verbose=False)
    toks = windows(data.heldout, args.windows, args.window_len)
    base = LLM(args.model)
    cfg = base.cfg
    prompts = [p.text for p in heldout_prompts(base.get_tokenizer(), num=args.prompts, prompt_tokens=48)]
    greedy = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
    bf16_bytes = kv_bytes_per_token(cfg, "auto", 2)
    rows, ref_lp, ref_tokens = [], None, None
    print(f"model {base.model_dir.name}: {cfg.num_layers} layers, {cfg.num_kv_heads} kv heads, head_dim "
          f"{cfg.head_dim}; {args.windows} held-out windows of {args.window_len} tokens, chunks of {args.chunk}")
    for fmt in FORMATS:
        t0 = time.perf_counter()
        llm = LLM(args.model, kv_cache_dtype=fmt, max_num_batched_tokens=args.chunk, block_size=32)
        ppl, kl, lps = teacher_forced(llm, toks, args.chunk, ref_lp)
        eng_ppl = engine_perplexity(llm, toks[:args.engine_windows])
        outs = llm.generate_static(prompts, greedy, batch_size=8)
        gen = [o.outputs[0].token_ids for o in outs]
        if fmt == "auto":
            ref_lp, ref_tokens, ref_ppl, ref_eng = lps, gen, ppl, eng_ppl
        same = np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(gen, ref_tokens)])
        prefix = np.mean([next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                          for a, b in zip(gen, ref_tokens)])
        per_token = kv_bytes_per_token(cfg, fmt, jnp.dtype(llm.weights.dtype).itemsize)  # auto: model dtype
        cap = capacity(args.model, fmt, int(args.budget_mib * 2 ** 20), 256, 64, 96, cfg.vocab_size)
        row = dict(format=fmt, ppl=ppl, ppl_change_pct=100 * (ppl / ref_ppl - 1), kl=kl, engine_ppl=eng_ppl,
                   engine_ppl_change_pct=100 * (eng_ppl / ref_eng - 1),
                   greedy_agreement=float(same), greedy_prefix=float(prefix), bytes_per_token=per_token,
                   bytes_vs_bf16=per_token / bf16_bytes, concurrent_seqs=cap, seconds=time.perf_counter() - t0)
        if fmt in TARGETS:
            dp, db = TARGETS[fmt]
            row["meets_target"] = bool(row["ppl_change_pct"] <= dp and row["bytes_vs_bf16"] <= db)
        rows.append(row)
        print(f"{fmt:9s} ppl {ppl:8.4f} ({row['ppl_change_pct']:+6.2f}%)  KL {kl:.5f}  engine ppl {eng_ppl:8.4f} "
              f"({row['engine_ppl_change_pct']:+6.2f}%)  "
              f"greedy agree {same:6.1%} (prefix {prefix:5.1f})  bytes/token {per_token:7.0f} "
              f"({row['bytes_vs_bf16']:.3f}x bf16)  fits {cap} seqs  "
              + (f"target {'met' if row.get('meets_target') else 'MISSED'}" if fmt in TARGETS else ""),
              flush=True)

    RESULTS.mkdir(exist_ok=True)
    meta = dict(model=str(base.model_dir), windows=args.windows, window_len=args.window_len, chunk=args.chunk,
                where="teacher-forced chunked prefill: every attention read, including the current chunk, "
                      "comes from the quantized cache (write then read); engine column: LLM(kv_cache_dtype=X, "
                      f"max_num_batched_tokens={args.chunk}) prompt_logprobs on {args.engine_windows} windows",
                budget_mib=args.budget_mib, capacity_workload="96 requests of 256 prompt + 64 output tokens, "
                "max_num_seqs 96 (KIVI reserves a full-precision residual group for each of the 96 slots)")
    (RESULTS / "kv_quant_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = [f"Quantization acts on every key read: {meta['where']}.", "",
          f"| kv_cache_dtype | ppl | Δppl | KL vs auto | engine ppl | engine Δppl | greedy agree ({args.gen_tokens} tok) "
          "| matching prefix | bytes/token | vs bf16 | seqs in budget | target |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tgt = ("met" if r.get("meets_target") else "missed") if "meets_target" in r else ""
        md.append(f"| {r['format']} | {r['ppl']:.4f} | {r['ppl_change_pct']:+.2f}% | {r['kl']:.5f} | "
                  f"{r['engine_ppl']:.4f} | {r['engine_ppl_change_pct']:+.2f}% | {r['greedy_agreement']:.1%} | "
                  f"{r['greedy_prefix']:.1f} | "
                  f"{r['bytes_per_token']:.0f} | {r['bytes_vs_bf16']:.3f} | {r['concurrent_seqs']} | {tgt} |")
    (RESULTS / "kv_quant_quality.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(r["bytes_vs_bf16"], r["ppl_change_pct"])
            ax.annotate(r["format"], (r["bytes_vs_bf16"], r["ppl_change_pct"]))
        ax.set_xlabel("KV bytes per token / bf16 cache")
        ax.set_ylabel("perplexity change vs auto (%)")
        ax.set_title("KV cache quantization: quality vs memory")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "kv_quant_quality.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {RESULTS / 'kv_quant_quality.md'}")


if __name__ == "__main__":
    main()
