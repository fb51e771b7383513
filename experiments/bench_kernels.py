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


def timed(fn, *args, repeats: int, sample_s: float = 0.0) -> float:
    """Median wall time (s) of one jitted call after a warm-up (compile) call.

    sample_s > 0 (accelerators): each sample dispatches enough back-to-back calls to last about
    sample_s and divides, so microsecond kernels are not measured as launch + sync latency."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t
    inner = max(1, min(200, int(sample_s / max(once, 1e-6)))) if sample_s > 0 else 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float32 (padding excluded by the callers)."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured read bandwidth (bytes/s) of a jitted full reduction: the CPU's 'peak'."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    return nbytes / timed(f, x, repeats=repeats)


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Measured device-memory bandwidth (bytes read + written per s) of a jitted x + 1 over 2 GiB."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    return 2 * nbytes / timed(f, x, repeats=repeats, sample_s=0.05)


def hbm_peak(platform_name: str) -> tuple[float | None, str]:
    kind = jax.devices()[0].device_kind
    if platform_name == "cpu":
        return read_bandwidth(), "measured read bandwidth of this CPU (jitted sum of 256 MB)"
    for name, peak in HBM_PEAK.items():
        if name in kind:
            return peak, f"{name} HBM peak (vendor figure)"
    return None, f"unknown peak for {kind!r}"


# ------------------------------------------------------------------ flash (prefill)

def bench_flash(platform_name: str, seq_lens, head_dims, total_tokens: int, hidden: int, repeats: int,
                sample_s: float = 0.0, block_sizes: fa.BlockSizes | None = None, impls=None):
    rows = []
    impls = impls or {"cpu": ["xla"], "gpu": ["xla", "cudnn", "pallas_triton"], "tpu": ["xla", "pallas_mosaic"]}[
        platform_name]
    dtype = jnp.float32 if platform_name == "cpu" else jnp.bfloat16  # bf16 is slower than f32 on CPU
    for h in head_dims:
        n = hidden // h
        for s in seq_lens:
            b = max(total_tokens // s, 1)
            ks = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(key, (b, s, n, h), jnp.float32).astype(dtype) for key in ks)
            flops = 4 * b * n * s * s * h / 2  # QK^T and PV, causal half
            outs = {}
            for impl in impls:
                row = dict(kernel="flash", impl=impl, batch=b, seq_len=s, heads=n, head_dim=h,
                           dtype=jnp.dtype(dtype).name)
                if block_sizes is not None and impl.startswith("pallas"):
                    row.update(block_q=block_sizes.block_q, block_k=block_sizes.block_k,
                               num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)
                try:
                    if impl.startswith("pallas"):
                        fn = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True,
                                                                        block_sizes=block_sizes))
                    else:
                        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                            q, k, v, is_causal=True, implementation=impl))
                    sec = timed(fn, q, k, v, repeats=repeats, sample_s=sample_s)
                    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
                    outs[impl] = fn(q, k, v)
                    if impl != "xla" and "xla" in outs:  # correctness at the benchmark's own shapes
                        row.update(rel_err_vs_xla=rel_err(outs[impl], outs["xla"]))
                except Exception as e:  # e.g. cuDNN missing for a shape: record, keep going
                    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
                print(_fmt(row), flush=True)
            del outs
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


def bench_paged(platform_name: str, batches, contexts, formats, repeats: int, peak, measured=None,
                max_tokens: int | None = None, sample_s: float = 0.0,
                block_sizes: pa.BlockSizes | None = None, page_size: int = 16, impls=None):
    """measured: the device's measured copy bandwidth (bytes/s), reported beside the vendor peak.
    max_tokens: skip batch x context cells holding more cached tokens (memory and time)."""
    rows = []
    n, kh, h, ps = 32, 8, 128, page_size
    dtype = jnp.float32 if platform_name == "cpu" else jnp.bfloat16
    impls = impls or {"cpu": ["xla_gather"], "gpu": ["xla_gather", "pallas_triton"],
                      "tpu": ["xla_gather", "pallas_mosaic"]}[platform_name]
    for fmt in formats:
        for b in batches:
            for ctx in contexts:
                if max_tokens is not None and b * ctx > max_tokens:
                    continue
                q, k, v, table, kv_lens, q_lens, quant = _paged_problem(b, ctx, n, kh, h, ps, fmt, dtype)
                kv_bytes = k.nbytes + v.nbytes + sum(quant[x].nbytes for x in ("k_scale", "v_scale")
                                                     if x in quant)
                outs = {}
                for impl in impls:
                    row = dict(kernel="paged_decode", impl=impl, kv_format=fmt or jnp.dtype(dtype).name,
                               batch=b, context=ctx, heads=n, kv_heads=kh, head_dim=h, page_size=ps,
                               kv_mbytes=kv_bytes / 1e6)
                    if block_sizes is not None and impl.startswith("pallas"):
                        row.update(block_k=block_sizes.block_k, num_warps=block_sizes.num_warps,
                                   num_stages=block_sizes.num_stages, num_splits=block_sizes.num_splits)
                    try:
                        if impl.startswith("pallas"):
                            fn = jax.jit(lambda *a, quant=quant: pa.paged_attention(
                                *a, block_sizes=block_sizes, **quant))
                        else:
                            fn = jax.jit(lambda *a, quant=quant: _xla_paged(*a, quant))
                        sec = timed(fn, q, k, v, table, kv_lens, q_lens, repeats=repeats, sample_s=sample_s)
                        row.update(us=sec * 1e6, gbs=kv_bytes / sec / 1e9,
                                   frac_of_peak=None if peak is None else kv_bytes / sec / peak)
                        if measured:
                            row.update(frac_of_measured=kv_bytes / sec / measured)
                        outs[impl] = fn(q, k, v, table, kv_lens, q_lens)
                        if impl != "xla_gather" and "xla_gather" in outs:
                            row.update(rel_err_vs_xla=rel_err(outs[impl], outs["xla_gather"]))
                    except Exception as e:
                        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    rows.append(row)
                    print(_fmt(row), flush=True)
                del q, k, v, quant, outs
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


def summary(report) -> list[str]:
    """The issue's two ratios: Pallas flash TFLOP/s over cuDNN's (target >= 0.7), and paged
    decode GB/s as a fraction of HBM bandwidth at long contexts (target >= 0.6)."""
    lines = []
    by = {}
    for r in report["flash"]:
        if "tflops" in r and "block_q" not in r:
            by.setdefault((r["head_dim"], r["seq_len"]), {})[r["impl"]] = r["tflops"]
    for (h, sl), d in sorted(by.items()):
        if "cudnn" in d and any(k.startswith("pallas") for k in d):
            pallas = next(v for k, v in d.items() if k.startswith("pallas"))
            lines.append(f"flash H={h} S={sl}: pallas {pallas:.0f} / cudnn {d['cudnn']:.0f} TFLOP/s = "
                         f"{pallas / d['cudnn']:.2f} of cuDNN (xla {d.get('xla', float('nan')):.0f})")
    for r in report["paged"]:
        if r["impl"].startswith("pallas") and "gbs" in r and r["context"] >= 16384 and "block_k" not in r:
            xla = next((x for x in report["paged"] if x["impl"] == "xla_gather" and "gbs" in x
                        and (x["kv_format"], x["batch"], x["context"]) == (r["kv_format"], r["batch"],
                                                                           r["context"])), None)
            meas = f", {r['frac_of_measured']:.2f} of measured copy bw" if "frac_of_measured" in r else ""
            lines.append(f"paged {r['kv_format']} B={r['batch']} ctx={r['context']}: {r['gbs']:.0f} GB/s = "
                         f"{r['frac_of_peak']:.2f} of peak{meas}"
                         + (f"; xla gather {xla['gbs']:.0f} GB/s" if xla else ""))
    return lines


def write_results(report, platform_name: str):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"bench_kernels_{platform_name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [f"# Attention kernels on {report['device']} ({platform_name})", "",
          f"jax {report['jax']}, {report['date']}. `python experiments/bench_kernels.py"
          f"{' --quick' if report['quick'] else ''}{' --tune' if report.get('tune') else ''}`", ""]
    md += [f"Host 1-minute load average {report['load_avg_start']:.1f} at start, "
           f"{report['load_avg_end']:.1f} at end (other jobs on the machine slow every row alike).", ""]
    if report.get("note"):
        md += [f"**{report['note']}**", ""]
    md += ["## Flash attention (prefill, causal)", "",
           "TFLOP/s counts the causal half: 2 * B * N * S^2 * H.", ""]
    md += _table([r for r in report["flash"] if "block_q" not in r],
                 ["impl", "dtype", "batch", "seq_len", "heads", "head_dim", "ms", "tflops", "rel_err_vs_xla"])
    tune = [r for r in report["flash"] if "block_q" in r]
    if tune:
        md += ["", "Flash block sizes tried (Pallas Triton):", ""]
        md += _table(tune, ["seq_len", "head_dim", "block_q", "block_k", "num_warps", "num_stages", "ms",
                            "tflops"])
    peak_desc = report["peak_desc"]
    peak = report["peak_bytes_per_s"]
    md += ["", "## Paged decode attention (T = 1)", "",
           f"GB/s = K/V page (+ scale) bytes read / time. Peak: {peak_desc}"
           + ("" if peak is None else f" = {peak / 1e9:.0f} GB/s") + ".", ""]
    if report.get("measured_bytes_per_s"):
        gbs = report["measured_bytes_per_s"] / 1e9
        md += [f"Measured device copy bandwidth (x + 1 over 2 GiB, bytes read + written): {gbs:.0f} GB/s.", ""]
    md += _table([r for r in report["paged"] if "block_k" not in r],
                 ["impl", "kv_format", "batch", "context", "kv_mbytes", "us", "gbs", "frac_of_peak",
                  "frac_of_measured", "rel_err_vs_xla"])
    tune = [r for r in report["paged"] if "block_k" in r]
    if tune:
        md += ["", "Paged block sizes tried (Pallas Triton):", ""]
        md += _table(tune, ["kv_format", "batch", "context", "block_k", "num_warps", "num_stages", "num_splits",
                            "us", "gbs", "frac_of_peak"])
    if report.get("summary"):
        md += ["", "## Against the targets", ""] + [f"- {line}" for line in report["summary"]]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smallest grid (a smoke run)")
    ap.add_argument("--tune", action="store_true",
                    help="accelerators: also try a few kernel block sizes at one flash and one paged shape")
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
                         hidden=2048, sample_s=0.02)
        # up to 1M cached tokens per cell (8 GB of bf16 K/V): several times the L2, minutes of device time
        paged_cfg = dict(batches=[1, 8, 32, 128], contexts=[1024, 8192, 32768],
                         formats=[None, "int8", "fp8_e4m3", "int4"], max_tokens=1 << 20, sample_s=0.02)
    if args.quick:
        flash_cfg.update(seq_lens=flash_cfg["seq_lens"][:1], head_dims=[128])
        paged_cfg.update(batches=paged_cfg["batches"][:1], contexts=paged_cfg["contexts"][:1],
                         formats=paged_cfg["formats"][:2])
    report = dict(platform=platform_name, device=jax.devices()[0].device_kind, jax=jax.__version__,
                  python=platform.python_version(), date=time.strftime("%Y-%m-%d"), quick=args.quick, tune=args.tune,
                  note=INTERPRET_NOTE if platform_name == "cpu" else None,
                  peak_bytes_per_s=peak, peak_desc=peak_desc, load_avg_start=os.getloadavg()[0])
    measured = None if platform_name == "cpu" else copy_bandwidth()
    report["measured_bytes_per_s"] = measured
    if measured:
        print(f"measured copy bandwidth {measured / 1e9:.0f} GB/s; {peak_desc}", flush=True)
    report["flash"] = bench_flash(platform_name, repeats=args.repeats, **flash_cfg)
    report["paged"] = bench_paged(platform_name, repeats=args.repeats, peak=peak, measured=measured, **paged_cfg)
    if args.tune and platform_name != "cpu":
        kernel_only = ["pallas_triton" if platform_name == "gpu" else "pallas_mosaic"]
        # (a first H200 run: 128x64 w8 s3 332, 128x128 w8 s2 335, 64x64 w4 s3 323, 128x32 w4 s3 297,
        # 64x128 w4 s2 274 TFLOP/s at S = 8192, H = 128)
        # (the second, with exp2: 128x128 w8 s3 411, 128x64 w8 s4 379, default 128x64 w8 s3 391 at S = 8192;
        # 128x128 is swept over the lengths to decide the head_dim 128 default)
        for bs, lens in ((fa.BlockSizes(128, 128, 8, 3), [1024, 2048, 4096, 8192, 16384]),
                         (fa.BlockSizes(128, 128, 8, 2), [4096, 16384]), (fa.BlockSizes(128, 64, 8, 2), [4096])):
            report["flash"] += bench_flash(
                platform_name, seq_lens=lens, head_dims=[128], total_tokens=16384, hidden=2048,
                repeats=args.repeats, sample_s=0.02, block_sizes=bs, impls=kernel_only)
        # (a first H200 run, bf16 B=8 ctx=32768: block_k 64 / 128 / 256 at 4 warps 2076 / 2254 / 1995 GB/s,
        # 128 / 256 at 8 warps 2277 / 2050, one split 979)
        for bs in (pa.BlockSizes(num_stages=3), pa.BlockSizes(num_stages=4), pa.BlockSizes(block_k=64, num_stages=4)):
            report["paged"] += bench_paged(
                platform_name, batches=[8], contexts=[32768], formats=[None, "int8"], repeats=args.repeats,
                peak=peak, measured=measured, sample_s=0.02, block_sizes=bs, impls=kernel_only)
    report["load_avg_end"] = os.getloadavg()[0]
    report["summary"] = summary(report)
    print("\n".join(report["summary"]), flush=True)
    write_results(report, platform_name)


if __name__ == "__main__":
    main()
