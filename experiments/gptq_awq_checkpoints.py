"""GPTQ and AWQ checkpoints (AutoGPTQ / GPTQModel and AutoAWQ layouts) on the embedded target: what
loading them costs in quality and saves in bytes, and whether transformers computes the same model.

The dense target is exported to an HF directory and written in each layout by the test suite's writer
(tests/hf_models.py, round to nearest per group: the packing is the point here, not the rounding
method): GPTQ 4-bit g128 symmetric (v1 zero points), GPTQ 4-bit g128 asymmetric in activation order
(desc_act, a g_idx per projection), GPTQ 8-bit g128 asymmetric (gptq_v2), AWQ 4-bit g128 (GEMM).
jaxinfer loads each with `LLM(model=dir)` (the stored codes, no re-rounding). Reported: perplexity
over held-out windows, KL(dense || quantized) and top-1 agreement with the dense model, the decoder
projections' bytes. When GPTQModel is importable (transformers' GPTQ and AWQ backend; it needs its
own dependencies and does not install with the test extra), transformers runs each directory too:
the largest difference in any token's log-prob between it and jaxinfer, and the same against
jaxinfer with the dequantized weights rounded to float16, which is how GPTQModel's CPU kernels
dequantize (so the second column isolates the layout from that rounding).

    python experiments/gptq_awq_checkpoints.py [--windows 8] [--window-len 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from weight_quant import quality  # experiments/ is on sys.path when this runs as a script

from jaxinfer import LLM
from jaxinfer.checkpoint import export_hf
from jaxinfer.corpus import token_windows
from jaxinfer.wquant import MODULES, QuantWeight, weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import write_awq, write_gptq  # noqa: E402  (the writer the tests use)

from report import write_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name: (writer, arguments)
    "GPTQ int4 g128 sym (v1)": (write_gptq, {"bits": 4, "group": 128, "sym": True}),
    "GPTQ int4 g128 asym, desc_act (v1)": (write_gptq, {"bits": 4, "group": 128, "sym": False, "desc_act": True}),
    "GPTQ int8 g128 asym (gptq_v2)": (write_gptq, {"bits": 8, "group": 128, "sym": False, "fmt": "gptq_v2"}),
    "AWQ int4 g128 (GEMM)": (write_awq, {"group": 128}),
}


def float16_dequantized(llm: LLM) -> LLM:
    """A copy of llm whose quantized projections are their dequantized weights rounded to float16."""
    def r16(w):
        return w.dense().astype(jnp.float16).astype(jnp.float32) if isinstance(w, QuantWeight) else w
    layers = [layer.replace(**{m: r16(getattr(layer, m)) for m in MODULES}) for layer in llm.weights.layers]
    twin = LLM.__new__(LLM)
    twin.__dict__.update(llm.__dict__)
    twin.weights = llm.weights.replace(layers=layers)
    return twin


def transformers_logprobs(path: Path, windows: np.ndarray) -> list[np.ndarray] | None:
    """transformers (GPTQModel kernels, float32 activations) on the windows; None without GPTQModel."""
    try:
        import gptqmodel  # noqa: F401
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        return [model(torch.tensor(w[None])).logits[0].log_softmax(-1).numpy() for w in windows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "gptq_awq_checkpoints"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    dense = LLM(args.model, dtype="float32", max_num_seqs=1)
    windows = token_windows(dense.get_tokenizer(), args.windows, args.window_len, "heldout")
    dense_ppl, _, _, dense_lp = quality(dense, None, windows, batch=1)
    dense_bytes = weight_bytes(dense.weights)["dense_projections"]
    rows = [{"checkpoint": "dense", "ppl": dense_ppl, "kl": 0.0, "top1": 1.0, "bytes_ratio": 1.0}]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "dense"
        export_hf(base, dense.cfg, dense.weights, dtype="float32")
        for name, (writer, kw) in VARIANTS.items():
            path = Path(tmp) / f"q{len(rows)}"
            writer(base, path, **kw)
            llm = LLM(str(path), max_num_seqs=1)
            ppl, kl, top1, lps = quality(llm, dense_lp, windows, batch=1)
            row = {"checkpoint": name, "loaded_as": llm.quantization.tag(), "ppl": ppl, "kl": kl, "top1": top1,
                   "bytes_ratio": weight_bytes(llm.weights)["quantized"] / dense_bytes}
            hf = transformers_logprobs(path, windows)
            if hf is not None:
                _, _, _, lps16 = quality(float16_dequantized(llm), None, windows, batch=1)
                row["max_logprob_diff"] = max(float(np.abs(np.asarray(a[0]) - b).max()) for a, b in zip(lps, hf))
                row["max_logprob_diff_f16"] = max(float(np.abs(np.asarray(a[0]) - b).max()) for a, b in zip(lps16, hf))
            rows.append(row)
            print(row, flush=True)

    peer = "max_logprob_diff" in rows[-1]
    lines = ["# GPTQ and AWQ checkpoints\n",
             "`python experiments/gptq_awq_checkpoints.py` (the transformers columns: run where GPTQModel imports).\n",
             f"Embedded {args.model}, float32; {args.windows} held-out windows of {args.window_len} tokens. "
             "ppl / KL / top-1 are jaxinfer's (KL and top-1 against the dense model); bytes: the decoder "
             "projections' bytes over dense float32. "
             + ("transformers: the same directory in transformers with GPTQModel's kernels (float32 "
                "activations); |d| the largest log-prob difference from jaxinfer over every position and "
                "vocabulary entry, then from jaxinfer with its dequantized weights rounded to float16 (as "
                "GPTQModel dequantizes)." if peer else "transformers: not run (GPTQModel is not installed)."),
             "", "| checkpoint | ppl | KL | top-1 | bytes |" + (" transformers max abs d | vs float16-rounded |"
                                                              if peer else ""),
             "|---|---|---|---|---|" + ("---|---|" if peer else "")]
    for r in rows:
        line = f"| {r['checkpoint']} | {r['ppl']:.4f} | {r['kl']:.5f} | {r['top1']:.3f} | {r['bytes_ratio']:.2f}x |"
        if peer:
            line += (f" {r['max_logprob_diff']:.1e} | {r['max_logprob_diff_f16']:.1e} |" if "max_logprob_diff" in r
                     else " - | - |")
        lines.append(line)
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
