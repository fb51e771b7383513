"""Decode throughput: jaxinfer vs transformers on the same checkpoint, in one run.

A ~25M-parameter Llama (6 layers, hidden 512, 8 heads, ffn 1536, vocab 8192) is
written with transformers; both frameworks run greedy generation of 128 new
tokens from 16-token prompts at batch 1, 8 and 32, in float32 and bfloat16.
jaxinfer runs its jit-compiled generate (`LLM.generate_static`: prefill, then the
decode `lax.while_loop` on device); transformers runs `generate` (PyTorch eager).
Prints tokens/s for both, their ratio (the median of back-to-back pairs), and jaxinfer's fraction of the
memory-bandwidth roofline: (weight bytes + KV bytes read per decode step) /
step time / the read bandwidth measured here, in this same run. Also the time of one step's
weight matmuls alone (XLA:CPU's dot efficiency at this batch bounds the step from below).

    python experiments/bench_decode.py [--batches 1 8 32] [--dtypes float32 bfloat16]
    python experiments/bench_decode.py --dtypes bfloat16 --weight-layouts in_out out_in   # the layout trade-off
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from report import paired, torch_device

from jaxinfer.layers import ATTENTION_BACKENDS
from jaxinfer.model import WEIGHT_LAYOUTS

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
              tie_word_embeddings=True)
PROMPT_LEN, NEW_TOKENS = 16, 128


def read_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """The median of n jitted full reads of a float32 buffer (GB/s). Measured again before every
    row (the row's roofline uses its own reading): on this shared 2-core VM the reads measure
    42-51 GB/s most of the time, and a best-of-10 once caught 79.5."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    f(x).block_until_ready()
    return nbytes / float(np.median([_timed(lambda: f(x).block_until_ready()) for _ in range(repeats)])) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_checkpoint(path: Path):
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def prepare_jaxinfer(path: Path, dtype: str, batch: int, prompts: np.ndarray, layout: str = "auto",
                     attention: str = "auto"):
    """jaxinfer's jit-compiled generate on these prompts, compiled and warm: (run, stats), where run()
    returns its wall time and stats() the per-step figures (from the best run so far)."""
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.layers import TransposedWeight
    from jaxinfer.wquant import weight_bytes as weight_bytes_of
    llm = LLM(str(path), dtype=dtype, max_num_seqs=batch, weight_layout=layout, attention_backend=attention)
    reqs = [{"prompt_token_ids": p.tolist()} for p in prompts]
    full = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # The jit-compiled static-batch generate: one prefill call, then the whole decode loop on device.
    gen = lambda params: llm.generate_static(reqs, params, batch_size=batch)  # noqa: E731
    gen(full), gen(first)  # compile
    out = gen(full)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in out)
    times = []

    def run() -> float:
        times.append(_timed(lambda: gen(full)))
        return times[-1]

    def stats() -> dict:
        prefill = min(_timed(lambda: gen(first)) for _ in range(2))
        total = min(times)
        step = (total - prefill) / (NEW_TOKENS - 1)
        # every array once (a tied head read in place is the embedding); the embedding only counts
        # where the head reads it in place: otherwise the lookup reads B of its rows
        head = llm.weights.lm_head
        reads_embedding = head is None or (isinstance(head, TransposedWeight) and head.tied)
        weight_bytes = weight_bytes_of(llm.weights)["total"] - (0 if reads_embedding else llm.weights.embed.nbytes)
        cfg = llm.cfg
        itemsize = jnp.dtype(llm.weights.dtype).itemsize
        # KV actually needed per step: 2 (K, V) x layers x batch x mean context x kv heads x head dim
        mean_ctx = PROMPT_LEN + NEW_TOKENS / 2
        kv_bytes = 2 * cfg.num_layers * batch * mean_ctx * cfg.num_kv_heads * cfg.head_dim * itemsize
        return dict(tok_s=batch * NEW_TOKENS / total, step_ms=step * 1e3, matmul_ms=matmul_floor_ms(llm, batch),
                    bytes_per_step=weight_bytes + kv_bytes, first_tokens=out[0].outputs[0].token_ids[:8])
    return run, stats


def matmul_floor_ms(llm, batch: int, steps: int = 64) -> float:
    """One decode step's weight matmuls alone (every layer's qkv, o, gate/up, down and the LM
    head, with `layers.matmul`), `steps` times in a fori_loop on device: the step time jaxinfer
    would have if attention, norms, RoPE, the cache write and sampling were free (ms)."""
    from jaxinfer.layers import matmul, swiglu
    from jaxinfer.model import lm_logits
    weights, cfg = llm.weights, llm.cfg
    q_width = cfg.num_heads * cfg.head_dim

    @jax.jit
    def loop(weights, x):
        def body(_, x):
            for layer in weights.layers:
                x = x + matmul(matmul(x, layer.wqkv)[:, :q_width], layer.wo)
                x = x + matmul(swiglu(matmul(x, layer.w_gate_up)), layer.w_down)
            logits = lm_logits(weights, x, cfg)
            return x + 1e-6 * jnp.max(logits, axis=-1, keepdims=True).astype(x.dtype)
        return jax.lax.fori_loop(0, steps, body, x)

    x = jnp.ones((batch, cfg.hidden_size), weights.dtype) * 0.01
    loop(weights, x).block_until_ready()
    return 1e3 * min(_timed(lambda: loop(weights, x).block_until_ready()) for _ in range(3)) / steps


def prepare_transformers(path: Path, dtype: str, batch: int, prompts: np.ndarray):
    """transformers' greedy `generate` (PyTorch eager) on the same prompts, warm: (run, stats)."""
    import torch
    import transformers
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = torch_device()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=tdt).eval().to(device)
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        out = model.generate(ids, **kw)
    times = []

    def run() -> float:
        with torch.no_grad():
            times.append(_timed(lambda: (model.generate(ids, **kw), sync())))
        return times[-1]

    def stats() -> dict:
        return dict(tok_s=batch * NEW_TOKENS / min(times), first_tokens=out[0, PROMPT_LEN:PROMPT_LEN + 8].tolist())
    return run, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=4, help="timed jaxinfer / transformers pairs per row")
    ap.add_argument("--weight-layouts", nargs="+", default=["auto"], choices=list(WEIGHT_LAYOUTS),
                    help="jaxinfer's LLM(weight_layout=...): one row per layout")
    ap.add_argument("--attention-backends", nargs="+", default=["auto"], choices=list(ATTENTION_BACKENDS),
                    help="jaxinfer's LLM(attention_backend=...): one row per backend (and layout)")
    ap.add_argument("--out", default=None, help="results path without suffix (default: "
                    "experiments/results/bench_decode, or bench_decode_gpu when jax runs on a GPU)")
    args = ap.parse_args()
    backend, tdev = jax.default_backend(), torch_device()
    out = Path(args.out or RESULTS / ("bench_decode" if backend == "cpu" else f"bench_decode_{backend}"))

    bw = read_bandwidth_gbs()
    print(f"measured read bandwidth: {bw:.1f} GB/s   backend: {backend} ({jax.devices()[0].device_kind})   "
          f"transformers on: {tdev}   cpu: {platform.processor() or platform.machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = write_checkpoint(Path(tmp))
        print(f"model: {n_params / 1e6:.1f}M parameters, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy")
        rng = np.random.default_rng(0)
        for dtype in args.dtypes:
            for b in args.batches:
                prompts = rng.integers(3, CONFIG["vocab_size"], size=(b, PROMPT_LEN))
                t_run, t_stats = prepare_transformers(Path(tmp), dtype, b, prompts)
                for layout, attention in itertools.product(args.weight_layouts, args.attention_backends):
                    if (dtype, layout) in (("float32", "out_in"), ("bfloat16", "in_out")):  # XLA's slower layout
                        continue
                    j_run, j_stats = prepare_jaxinfer(Path(tmp), dtype, b, prompts, layout, attention)
                    ratio = float(np.median(paired(t_run, j_run, args.repeats, warmup=False)[0]))
                    j, t = j_stats(), t_stats()
                    row_bw = read_bandwidth_gbs()
                    roofline = j["bytes_per_step"] / (j["step_ms"] / 1e3) / (row_bw * 1e9)
                    # transformers' time per generated position over jaxinfer's matmuls alone: the ratio
                    # jaxinfer would reach if everything but the weight matmuls (and its prefill) were free
                    bound = (b / t["tok_s"] * 1e3) / j["matmul_ms"]
                    row = dict(dtype=dtype, batch=b, weight_layout=layout, attention_backend=attention,
                               jaxinfer_tok_s=round(j["tok_s"], 1),
                               transformers_tok_s=round(t["tok_s"], 1), ratio=round(ratio, 2),
                               step_ms=round(j["step_ms"], 2), matmul_ms=round(j["matmul_ms"], 2),
                               roofline=round(roofline, 3), bandwidth_gbs=round(row_bw, 1), matmul_bound=round(bound, 2),
                               same_first_tokens=j["first_tokens"] == t["first_tokens"])
                    rows.append(row)
                    print(f"{dtype:9s} batch {b:3d} {layout:6s} {attention:6s}: jaxinfer {row['jaxinfer_tok_s']:8.1f} tok/s   "
                          f"transformers {row['transformers_tok_s']:7.1f} tok/s   ratio {row['ratio']:5.2f}x   "
                          f"step {row['step_ms']:6.2f} ms (matmuls alone {row['matmul_ms']:6.2f})   "
                          f"roofline {roofline:5.1%} of {row_bw:.1f} GB/s   matmul bound {bound:4.2f}x   "
                          f"same greedy start: {row['same_first_tokens']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(bandwidth_gbs=round(bw, 2), params=n_params, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                  backend=backend, device=jax.devices()[0].device_kind, transformers_device=tdev,
                  rows=rows)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [("| dtype | batch | weight layout | attention | jaxinfer tok/s | transformers tok/s | ratio | step ms | "
              "matmuls alone ms | matmul bound | roofline (read GB/s) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['weight_layout']} | {r['attention_backend']} | {r['jaxinfer_tok_s']} | {r['transformers_tok_s']} | "
              f"{r['ratio']}x | {r['step_ms']} | {r['matmul_ms']} | {r['matmul_bound']}x | {r['roofline']:.1%} ({r['bandwidth_gbs']}) |"
              for r in rows]
    out.with_suffix(".md").write_text(
        f"{jax.devices()[0].device_kind} (jax {backend}, transformers on {tdev}). "
        f"Read bandwidth {bw:.1f} GB/s at the start (each row's roofline uses the median of 10 reads "
        f"measured just after it); {n_params / 1e6:.1f}M params; "
        f"{NEW_TOKENS} new tokens from {PROMPT_LEN}-token prompts, greedy. tok/s: the best of "
        f"{args.repeats} runs; ratio: the median of {args.repeats} back-to-back jaxinfer / transformers pairs "
        "(the shared machine's speed drifts between rows). \"matmuls alone\": one step's "
        "weight matmuls (all layers and the LM head) timed by themselves in a loop on device, the step time "
        "if attention, norms, the cache write and sampling were free. \"matmul bound\": transformers' time per "
        "generated position / matmuls alone, the ratio jaxinfer would reach with everything else free.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
