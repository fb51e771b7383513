"""Attention kernel benchmark: Pallas flash / paged attention against the XLA (and cuDNN) paths.

On a GPU:
  * flash attention (prefill, causal), TFLOP/s for sequence lengths 1k-16k and head_dim 64/128
    (16k tokens per call, hidden 2048): Pallas Triton kernel vs jax.nn.dot_product_attention
    with implementation="xla" and "cudnn";
  * paged decode attention (T = 1), GB/s of K/V (+ scale) bytes read, for a batch x context grid,
    bf16 and quantized pages (int8, fp8_e4m3, int4): Pallas Triton kernel vs the XLA gather
    reference (gather pages through the page table, dequantize, einsum), and as a fraction of
    the HBM peak.
On a CPU, Pallas kernels only run in interpret mode, which is for correctness, not speed: this
script then times the XLA paths alone (at smaller sizes) and says so. On a TPU it times the
Mosaic kernels against the XLA paths.

    python experiments/bench_kernels.py [--repeats 5] [--quick]

Writes experiments/results/bench_kernels_{cpu,gpu,tpu}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer.kv.cache import AttentionMeta  # noqa: E402
from jaxinfer.layers import attention_reference  # noqa: E402
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import kv_formats as kvf  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# HBM peak by device kind (vendor figures, bytes/s); FACTS.md: H100 SXM 3.35 TB/s.
HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}
INTERPRET_NOTE = ("CPU host: Pallas kernels run only in interpret mode, which checks correctness and is "
                  "not a speed path, so only the XLA implementations are timed here; the Pallas rows "
                  "need a GPU (Triton) or TPU (Mosaic).")


def timed(fn, *args, repeats: int) -> float:
    """Median wall time (s) of a jitted call after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured read bandwidth (bytes/s) of a jitted full reduction: the CPU's 'peak'."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    return nbytes / timed(f, x, repeats=repeats)


def hbm_peak(platform_name: str) -> tuple[float | None, str]:
    kind = jax.devices()[0].device_kind
    if platform_name == "cpu":
        return read_bandwidth(), "measured read bandwidth of this CPU (jitted sum of 256 MB)"
    for name, peak in HBM_PEAK.items():
        if name in kind:
            return peak, f"{name} HBM peak (vendor figure)"
    return None, f"unknown peak for {kind!r}"


# ------------------------------------------------------------------ flash (prefill)

def bench_flash(platform_name: str, seq_lens, head_dims, total_tokens: int, hidden: int, repeats: int):
    rows = []
    impls = {"cpu": ["xla"], "gpu": ["pallas_triton", "xla", "cudnn"], "tpu": ["pallas_mosaic", "xla"]}[
        platform_name]
    dtype = jnp.float32 if platform_name == "cpu" else jnp.bfloat16  # bf16 is slower than f32 on CPU
    for h in head_dims:
        n = hidden // h
        for s in seq_lens:
            b = max(total_tokens // s, 1)
            ks = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(key, (b, s, n, h), jnp.float32).astype(dtype) for key in ks)
            flops = 4 * b * n * s * s * h / 2  # QK^T and PV, causal half
            for impl in impls:
                row = dict(kernel="flash", impl=impl, batch=b, seq_len=s, heads=n, head_dim=h,
                           dtype=jnp.dtype(dtype).name)
                try:
                    if impl.startswith("pallas"):
                        fn = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True))
                    else:
                        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                            q, k, v, is_causal=True, implementation=impl))
                    sec = timed(fn, q, k, v, repeats=repeats)
                    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
                except Exception as e:  # e.g. cuDNN missing for a shape: record, keep going
                    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows


# ------------------------------------------------------------------ paged decode

def _paged_problem(b, ctx, n, kh, h, ps, fmt, dtype):
    pp = ctx // ps
    num_pages = b * pp
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, 1, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (num_pages, kh, ps, h), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (num_pages, kh, ps, h), jnp.float32).astype(dtype)
    table = jax.random.permutation(ks[3], num_pages).reshape(b, pp).astype(jnp.int32)
    kv_lens = jnp.full((b,), ctx, jnp.int32)
    q_lens = jnp.ones((b,), jnp.int32)
    quant = {}
    if fmt is not None:
        kd, ksc, _ = kvf.quantize(k, fmt)
        vd, vsc, _ = kvf.quantize(v, fmt)
        k, v = kd, vd
        quant = dict(k_scale=ksc, v_scale=vsc, kv_format=fmt)
    return q, k, v, table, kv_lens, q_lens, quant


def _xla_paged(q, k, v, table, kv_lens, q_lens, quant):
    """The XLA gather path: gather each row's pages, dequantize them, layers.attention_reference."""
    b = q.shape[0]
    meta = AttentionMeta(page_table=jnp.arange(b, dtype=jnp.int32)[:, None], kv_lens=kv_lens, q_lens=q_lens,
                         contiguous=True)

    def rows_of(pages, scale):  # [P, K, ps, X] -> [B, K, S, H] (dequantized)
        g = pages[table]  # [B, pp, K, ps, X]
        if quant:
            g = kvf.dequantize(g, scale[table], None, quant["kv_format"], dtype=q.dtype)
        bb, pp, kh, ps, hd = g.shape
        return g.transpose(0, 2, 1, 3, 4).reshape(bb, kh, pp * ps, hd)

    k_rows = rows_of(k, quant.get("k_scale"))
    v_rows = rows_of(v, quant.get("v_scale"))
    return attention_reference(q, k_rows, v_rows, meta, scale=q.shape[-1] ** -0.5)


def bench_paged(platform_name: str, batches, contexts, formats, repeats: int, peak):
    rows = []
    n, kh, h, ps = 32, 8, 128, 16
    dtype = jnp.float32 if platform_name == "cpu" else jnp.bfloat16
    impls = {"cpu": ["xla_gather"], "gpu": ["pallas_triton", "xla_gather"],
             "tpu": ["pallas_mosaic", "xla_gather"]}[platform_name]
    for fmt in formats:
        for b in batches:
            for ctx in contexts:
                q, k, v, table, kv_lens, q_lens, quant = _paged_problem(b, ctx, n, kh, h, ps, fmt, dtype)
                kv_bytes = k.nbytes + v.nbytes + sum(quant[x].nbytes for x in ("k_scale", "v_scale")
                                                     if x in quant)
                for impl in impls:
                    row = dict(kernel="paged_decode", impl=impl, kv_format=fmt or jnp.dtype(dtype).name,
                               batch=b, context=ctx, heads=n, kv_heads=kh, head_dim=h, page_size=ps,
                               kv_mbytes=kv_bytes / 1e6)
                    try:
                        if impl.startswith("pallas"):
                            fn = jax.jit(lambda *a, quant=quant: pa.paged_attention(*a, **quant))
                        else:
                            fn = jax.jit(lambda *a, quant=quant: _xla_paged(*a, quant))
                        sec = timed(fn, q, k, v, table, kv_lens, q_lens, repeats=repeats)
                        row.update(us=sec * 1e6, gbs=kv_bytes / sec / 1e9,
                                   frac_of_peak=None if peak is None else kv_bytes / sec / peak)
                    except Exception as e:
                        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    rows.append(row)
                    print(_fmt(row), flush=True)
    return rows


# ------------------------------------------------------------------ output

def _fmt(row) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _table(rows, cols) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c, r.get("error", "") if c in ("tflops", "gbs") else "")
            cells.append(f"{val:.3g}" if isinstance(val, float) else str(val))
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_results(report, platform_name: str):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"bench_kernels_{platform_name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [f"# Attention kernels on {report['device']} ({platform_name})", "",
          f"jax {report['jax']}, {report['date']}. `python experiments/bench_kernels.py"
          f"{' --quick' if report['quick'] else ''}`", ""]
    md += [f"Host 1-minute load average {report['load_avg_start']:.1f} at start, "
           f"{report['load_avg_end']:.1f} at end (other jobs on the machine slow every row alike).", ""]
    if report.get("note"):
        md += [f"**{report['note']}**", ""]
    md += ["## Flash attention (prefill, causal)", "",
           "TFLOP/s counts the causal half: 2 * B * N * S^2 * H.", ""]
    md += _table(report["flash"], ["impl", "dtype", "batch", "seq_len", "heads", "head_dim", "ms", "tflops"])
    peak_desc = report["peak_desc"]
    peak = report["peak_bytes_per_s"]
    md += ["", "## Paged decode attention (T = 1)", "",
           f"GB/s = K/V page (+ scale) bytes read / time. Peak: {peak_desc}"
           + ("" if peak is None else f" = {peak / 1e9:.0f} GB/s") + ".", ""]
    md += _table(report["paged"], ["impl", "kv_format", "batch", "context", "kv_mbytes", "us", "gbs",
                                   "frac_of_peak"])
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smallest grid (a smoke run)")
    args = ap.parse_args(argv)
    platform_name = jax.default_backend()
    if platform_name not in ("cpu", "gpu", "tpu"):
        platform_name = "gpu"
    peak, peak_desc = hbm_peak(platform_name)
    if platform_name == "cpu":  # XLA paths at sizes a 2-core host finishes in about a minute
        print(INTERPRET_NOTE)
        flash_cfg = dict(seq_lens=[1024, 2048], head_dims=[64, 128], total_tokens=4096, hidden=1024)
        paged_cfg = dict(batches=[1, 8], contexts=[1024, 4096], formats=[None, "int8", "int4"])
    else:
        flash_cfg = dict(seq_lens=[1024, 2048, 4096, 8192, 16384], head_dims=[64, 128], total_tokens=16384,
                         hidden=2048)
        paged_cfg = dict(batches=[1, 8, 32, 128], contexts=[1024, 4096, 16384, 32768],
                         formats=[None, "int8", "fp8_e4m3", "int4"])
    if args.quick:
        flash_cfg.update(seq_lens=flash_cfg["seq_lens"][:1], head_dims=[128])
        paged_cfg.update(batches=paged_cfg["batches"][:1], contexts=paged_cfg["contexts"][:1],
                         formats=paged_cfg["formats"][:2])
    report = dict(platform=platform_name, device=jax.devices()[0].device_kind, jax=jax.__version__,
                  python=platform.python_version(), date=time.strftime("%Y-%m-%d"), quick=args.quick,
                  note=INTERPRET_NOTE if platform_name == "cpu" else None,
                  peak_bytes_per_s=peak, peak_desc=peak_desc, load_avg_start=os.getloadavg()[0])
    report["flash"] = bench_flash(platform_name, repeats=args.repeats, **flash_cfg)
    report["paged"] = bench_paged(platform_name, repeats=args.repeats, peak=peak, **paged_cfg)
    report["load_avg_end"] = os.getloadavg()[0]
    write_results(report, platform_name)


if __name__ == "__main__":
    main()
