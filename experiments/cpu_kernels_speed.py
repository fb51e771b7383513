"""jaxinfer's native CPU kernels (`jaxinfer.cpu_kernels`) against XLA, side by side in one run.

For each of --dtypes (bfloat16, float32):
1. Projections: the 25 weight matmuls of one decode step of bench_decode's model (6 layers,
   hidden 512, ffn 1536, vocab 8192) in one jitted call, for 1..512 activation rows, both through
   `layers.dense_dot` as the model runs them. bf16: XLA's dot on a `TransposedWeight` (one row
   padded to two) vs `cpu_kernels.bf16_matmul` (called directly, as dense_dot leaves more than
   MAX_ROWS rows to XLA). float32: XLA's dot on the [Din, Dout] array ("in_out") vs a
   `PanelWeight` (`cpu_kernels.f32_matmul`). Reported: ms per call and the weight bytes streamed
   per second.
2. Attention: one step's attention for 6 layers (8 heads of 64, MHA) over a contiguous cache of S
   slots, all of them valid, for batch B and T query tokens per row (1: decode; more:
   speculative verification, causal among them): the "xla" backend (what `generate_static`
   runs) vs "native" (`cpu_kernels.attention`). Reported: ms and the K/V bytes read per second.
3. Prefill attention (why the kernel is left to decode and verification): one row of T tokens,
   causal, over T cache slots, 6 layers: XLA's path vs the kernel called directly.

Every variant is timed in alternation (the median of --repeats rounds of 20 calls each), so
drift on the shared machine hits both sides. Writes experiments/results/cpu_kernels_speed.{json,md}.

    python experiments/cpu_kernels_speed.py [--dtypes bfloat16 float32] [--rows 1 2 4 8 16 32 64 128 512]
                                            [--attention 8x144 32x144 1x144x9] [--prefill 128 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import cpu_kernels
from jaxinfer.kv.cache import AttentionMeta, BitsPages
from jaxinfer.layers import PanelWeight, TransposedWeight, attention, dense_dot

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return jax.devices()[0].device_kind
D, F, V, LAYERS, HEADS, HEAD_DIM = 512, 1536, 8192, 6, 8, 64


def timed_alternating(fns: dict, repeats: int, calls: int = 20) -> dict:
    """Median ms per call of each zero-argument function, rounds interleaved."""
    for f in fns.values():
        f().block_until_ready()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                out = f()
            out.block_until_ready()
            times[name].append((time.perf_counter() - t) / calls * 1e3)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def projections(rng, dtype):
    """The step's weights as the model holds them for each side: {"xla": ..., "native": ...}."""
    shapes = []
    for _ in range(LAYERS):
        shapes += [(3 * D, D), (D, D), (2 * F, D), (D, F)]  # qkv, o, gate/up, down as [Dout, Din]
    shapes.append((V, D))  # the tied LM head
    wts = [jnp.asarray(rng.standard_normal(s) * 0.02, dtype) for s in shapes]
    if dtype == jnp.bfloat16:
        return {"xla": [TransposedWeight(wt) for wt in wts], "native": [TransposedWeight(wt, native=True) for wt in wts]}
    return {"xla": [wt.T for wt in wts], "native": [PanelWeight.pack(wt.T) for wt in wts]}


def cache(rng, shape, dtype):
    """A random cache array as the CPU caches hold it: bf16 as bits (kv/bits.py), float32 plain."""
    values = jnp.asarray(rng.standard_normal(shape), dtype)
    if dtype == jnp.float32:
        return values
    return BitsPages(jax.lax.bitcast_convert_type(values, jnp.uint16), jnp.dtype(jnp.bfloat16))


def matmul_step(native: bool):
    def step(x, weights):
        acc = jnp.zeros((), jnp.float32)
        for w in weights:
            xi = x[:, :w.shape[0]]
            # bf16: the kernel called directly (dense_dot would leave more than MAX_ROWS rows to XLA)
            y = cpu_kernels.bf16_matmul(xi, w.wt) if native and x.dtype == jnp.bfloat16 else dense_dot(xi, w)
            acc = acc + y[:, 0].sum()
        return acc
    return jax.jit(step)


def attention_step(backend: str, caches, meta):
    """6 layers' attention in one call; backend "kernel": `cpu_kernels.attention` called directly
    (what the "native" backend runs for every width since stop 51)."""
    def one(q, k, v):
        if backend == "kernel":
            return cpu_kernels.attention(q, k, v, meta, scale=HEAD_DIM ** -0.5)
        return attention(q, k, v, meta, scale=HEAD_DIM ** -0.5, backend=backend)

    def step(q):
        for k, v in caches:
            q = q + (1e-3 * one(q, k, v)).astype(q.dtype)
        return q
    return jax.jit(step)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 9, 16, 32, 64, 128, 512])
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512], help="tokens of one prefill row")
    ap.add_argument("--attention", nargs="+", default=["1x144", "8x144", "32x144", "32x512", "1x200x5", "1x200x9"],
                    help="BATCHxSLOTS[xTOKENS] cases (TOKENS query tokens per row, default 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "cpu_kernels_speed"))
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"the native kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    rng = np.random.default_rng(0)
    xla_mm, native_mm = matmul_step(False), matmul_step(True)
    rows_out, attn_out, prefill_out, weight_bytes = [], [], [], {}
    for dname in args.dtypes:
        dtype = jnp.dtype(dname)
        weights = projections(rng, dtype)
        weight_bytes[dname] = sum(w.nbytes for w in weights["xla"])
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, F)), dtype)
            t = timed_alternating({"xla": lambda x=x, w=weights["xla"]: xla_mm(x, w),
                                   "native": lambda x=x, w=weights["native"]: native_mm(x, w)}, args.repeats)
            row = {"dtype": dname, "rows": m, "xla_ms": round(t["xla"], 3), "native_ms": round(t["native"], 3),
                   "speedup": round(t["xla"] / t["native"], 2),
                   "native_gb_s": round(weight_bytes[dname] / t["native"] / 1e6, 1),
                   "xla_gb_s": round(weight_bytes[dname] / t["xla"] / 1e6, 1)}
            rows_out.append(row)
            print(f"{dname} matmuls, {m:3d} rows: xla {row['xla_ms']:.3f} ms ({row['xla_gb_s']} GB/s)   native "
                  f"{row['native_ms']:.3f} ms ({row['native_gb_s']} GB/s)   {row['speedup']}x", flush=True)
        for case in args.attention:
            b, s, *rest = map(int, case.split("x"))
            t_q = rest[0] if rest else 1
            caches = [(cache(rng, (b, HEADS, s, HEAD_DIM), dtype), cache(rng, (b, HEADS, s, HEAD_DIM), dtype))
                      for _ in range(LAYERS)]
            meta = AttentionMeta(page_table=jnp.zeros((b, 1), jnp.int32), kv_lens=jnp.full((b,), s, jnp.int32),
                                 q_lens=jnp.full((b,), t_q, jnp.int32), contiguous=True, bits_loop=False)
            q = jnp.asarray(rng.standard_normal((b, t_q, HEADS, HEAD_DIM)), dtype)
            fns = {name: attention_step(name, caches, meta) for name in ("xla", "native")}
            t = timed_alternating({name: lambda f=f, q=q: f(q) for name, f in fns.items()}, args.repeats)
            kv_bytes = 2 * LAYERS * b * HEADS * s * HEAD_DIM * dtype.itemsize
            row = {"dtype": dname, "batch": b, "slots": s, "tokens": t_q, "xla_ms": round(t["xla"], 3),
                   "native_ms": round(t["native"], 3), "speedup": round(t["xla"] / t["native"], 2),
                   "native_gb_s": round(kv_bytes / t["native"] / 1e6, 1)}
            attn_out.append(row)
            print(f"{dname} attention, batch {b:3d} x {s} slots x {t_q} tokens: xla {row['xla_ms']:.3f} ms   native "
                  f"{row['native_ms']:.3f} ms ({row['native_gb_s']} GB/s of K/V)   {row['speedup']}x", flush=True)
        for t_len in args.prefill:
            caches = [(cache(rng, (1, HEADS, t_len, HEAD_DIM), dtype), cache(rng, (1, HEADS, t_len, HEAD_DIM), dtype))
                      for _ in range(LAYERS)]
            meta = AttentionMeta(page_table=jnp.zeros((1, 1), jnp.int32), kv_lens=jnp.full((1,), t_len, jnp.int32),
                                 q_lens=jnp.full((1,), t_len, jnp.int32), contiguous=True)
            q = jnp.asarray(rng.standard_normal((1, t_len, HEADS, HEAD_DIM)), dtype)
            fns = {name: attention_step(name, caches, meta) for name in ("xla", "kernel")}
            t = timed_alternating({name: lambda f=f, q=q: f(q) for name, f in fns.items()}, args.repeats, calls=5)
            row = {"dtype": dname, "tokens": t_len, "xla_ms": round(t["xla"], 3), "kernel_ms": round(t["kernel"], 3),
                   "kernel_over_xla": round(t["kernel"] / t["xla"], 2)}
            prefill_out.append(row)
            print(f"{dname} prefill attention, {t_len} tokens: xla {row['xla_ms']:.3f} ms   kernel {row['kernel_ms']:.3f} "
                  f"ms   kernel/xla {row['kernel_over_xla']}x", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"weight_bytes": weight_bytes, "matmul": rows_out,
                                                    "attention": attn_out, "prefill": prefill_out}, indent=2) + "\n")
    lines = ["| dtype | rows | XLA ms | native ms | speedup | native GB/s | XLA GB/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['rows']} | {r['xla_ms']} | {r['native_ms']} | {r['speedup']}x | {r['native_gb_s']} | "
              f"{r['xla_gb_s']} |" for r in rows_out]
    lines += ["", "| dtype | batch x slots x tokens | XLA ms | native ms | speedup | native K/V GB/s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} x {r['slots']} x {r['tokens']} | {r['xla_ms']} | {r['native_ms']} | "
              f"{r['speedup']}x | {r['native_gb_s']} |" for r in attn_out]
    lines += ["", "| dtype | prefill tokens | XLA ms | kernel ms | kernel / XLA |", "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['tokens']} | {r['xla_ms']} | {r['kernel_ms']} | {r['kernel_over_xla']}x |"
              for r in prefill_out]
    out.with_suffix(".md").write_text(
        f"{cpu_name()}; kernels built for {'AVX512-BF16' if cpu_kernels.available(jnp.bfloat16) else 'AVX2 + FMA'}; "
        f"jax {jax.__version__}. `python experiments/cpu_kernels_speed.py {' '.join(sys.argv[1:])}`. "
        f"Projections: one decode step's 25 matmuls of bench_decode's model ("
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in weight_bytes.items()) + " of weights) in one call. Attention: "
        f"6 layers, {HEADS} heads of {HEAD_DIM}, contiguous cache, every slot valid. Medians of {args.repeats} "
        "alternating rounds of 20 calls.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
