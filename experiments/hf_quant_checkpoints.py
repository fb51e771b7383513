"""Pre-quantized checkpoints in and out: compressed-tensors (llm-compressor / vLLM's format) on the
embedded target, each measured here and in transformers in one run.

In: the dense target is exported to an HF directory and quantized by the compressed-tensors library
itself (min / max RTN scales, as an RTN observer computes them) in several schemes; jaxinfer loads
each (`LLM(model=dir)`, no re-rounding) and transformers runs it with compressed-tensors. Out: the
target quantized here (GPTQ int4 g128, RTN w8a8_fp8) is saved with `LLM.save(dir, "hf")` and
transformers runs that. For each: perplexity over held-out windows in both, the largest
difference in any token's log-prob between them, KL(dense || quantized) and top-1 agreement with
the dense model (ours), and the bytes of the decoder projections.

transformers 5.24 runs NVFP4 checkpoints only dequantized at load (to bfloat16), and MXFP4 and
asymmetric int4 likewise; W8A8's activations round differently there (absmax / 127.5 vs vLLM's and our 127).
With activation quantization, float32 rounding differences flip some activations to the next
step, so the log-prob comparison is put beside transformers against itself under 1e-6 noise.
Needs the test extra (torch, transformers, compressed-tensors).

    python experiments/hf_quant_checkpoints.py [--windows 16] [--window-len 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from weight_quant import quality  # experiments/ is on sys.path when this runs as a script

from jaxinfer import LLM
from jaxinfer.checkpoint import export_hf
from jaxinfer.corpus import token_windows
from jaxinfer.wquant import weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import write_compressed  # noqa: E402  (the same writer the tests use)

from report import write_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
INT4_G128 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
SCHEMES = {  # name: (compressed-tensors scheme, run in transformers dequantized at load)
    "W4A16 g128": ({"weights": INT4_G128}, False),
    "W4A16 g128 asym": ({"weights": {**INT4_G128, "symmetric": False}}, True),
    "W8A16 g128": ({"weights": {**INT4_G128, "num_bits": 8}}, False),
    "W8A8 (int8 channel, int8 tokens)": ("W8A8", False),
    "FP8_DYNAMIC (fp8 channel, fp8 tokens)": ("FP8_DYNAMIC", False),
    "NVFP4A16": ("NVFP4A16", True),
    "MXFP4A16": ("MXFP4A16", True),
}
EXPORTS = {  # name: LLM quantization arguments
    "ours GPTQ int4 g128 -> hf": ("int4", {"method": "gptq", "group_size": 128}),
    "ours RTN w8a8_fp8 -> hf": ("w8a8_fp8", {}),
}


def transformers_logprobs(path: Path, windows: np.ndarray, dequantize: bool) -> tuple[float, list, float]:
    """(perplexity, log-probs per window, sensitivity): the largest change in any log-prob when
    transformers runs the same windows with its input embeddings perturbed by 1e-6 relative noise
    (per-token activation quantization rounds discontinuously, so float32 rounding differences
    between two implementations move some activations by a whole step)."""
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    nll, count, lps, sensitivity = 0.0, 0, [], 0.0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in windows:
            emb = model.model.embed_tokens(torch.tensor(w[None]))
            lp = model(inputs_embeds=emb).logits[0].log_softmax(-1).numpy()
            noisy = emb * (1 + 1e-6 * torch.randn(emb.shape, generator=gen))
            lp_noisy = model(inputs_embeds=noisy).logits[0].log_softmax(-1).numpy()
            sensitivity = max(sensitivity, float(np.abs(lp - lp_noisy).max()))
            lps.append(lp)
            nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
            count += len(w) - 1
    return float(np.exp(nll / count)), lps, sensitivity


def measure(name: str, llm: LLM, path: Path, dequantize: bool, windows, dense_lp, dense_bytes) -> dict:
    ppl, kl, agree, lps = quality(llm, dense_lp, windows, batch=1)
    hf_ppl, hf_lps, sensitivity = transformers_logprobs(path, windows, dequantize)
    diff = max(float(np.abs(np.asarray(a[0]) - b).max()) for a, b in zip(lps, hf_lps))
    row = {"checkpoint": name, "formats": llm.quantization.tag() if llm.quantization else "dense",
           "ppl": ppl, "ppl_transformers": hf_ppl, "max_logprob_diff": diff,
           "transformers_sensitivity": sensitivity, "kl": kl, "top1": agree,
           "projection_bytes": weight_bytes(llm.weights)["quantized"] or weight_bytes(llm.weights)["dense_projections"],
           "dequantized_in_transformers": dequantize}
    row["bytes_ratio"] = row["projection_bytes"] / dense_bytes
    print(f"{name}: ppl {ppl:.4f} (transformers {hf_ppl:.4f}), max |d logprob| {diff:.2e} (transformers vs itself "
          f"perturbed {sensitivity:.2e}), KL {kl:.5f}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "hf_quant_checkpoints"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    dense = LLM(args.model, dtype="float32", max_num_seqs=1)
    windows = token_windows(dense.get_tokenizer(), args.windows, args.window_len, "heldout")
    _, _, _, dense_lp = quality(dense, None, windows, batch=1)
    dense_bytes = weight_bytes(dense.weights)["dense_projections"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "dense"
        export_hf(base, dense.cfg, dense.weights, dtype="float32")
        rows.append(measure("dense (exported)", LLM(str(base), max_num_seqs=1), base, False, windows, dense_lp,
                            dense_bytes))
        for name, (scheme, dequantize) in SCHEMES.items():
            path = write_compressed(base, Path(tmp) / f"ct{len(rows)}", scheme)
            rows.append(measure(f"compressed-tensors {name}", LLM(str(path), max_num_seqs=1), path, dequantize,
                                windows, dense_lp, dense_bytes))
        for name, (fmt, qc) in EXPORTS.items():
            llm = LLM(args.model, dtype="float32", max_num_seqs=1, quantization=fmt, quantization_config=qc)
            path = Path(tmp) / f"ours{len(rows)}"
            llm.save(path, "hf")
            rows.append(measure(name, llm, path, False, windows, dense_lp, dense_bytes))

    lines = [f"Embedded {args.model}, float32; {args.windows} held-out windows of {args.window_len} tokens. "
             "ppl / KL / top-1 are jaxinfer's (KL and top-1 against the dense model); 'transformers' runs the same "
             "directory with compressed-tensors; max |d logprob| is the largest difference between the two over "
             "every position and vocabulary entry; 'itself, perturbed' is the same for transformers against itself with its "
             "input embeddings perturbed by 1e-6 relative noise (how far rounding noise alone moves that model). "
             "bytes: the decoder projections' bytes over dense float32.", "",
             "| checkpoint | ppl | ppl (transformers) | max abs d logprob | transformers vs itself, perturbed | KL | top-1 "
             "| bytes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = " (dequantized at load)" if r["dequantized_in_transformers"] else ""
        lines.append(f"| {r['checkpoint']} | {r['ppl']:.4f} | {r['ppl_transformers']:.4f}{note} | "
                     f"{r['max_logprob_diff']:.1e} | {r['transformers_sensitivity']:.1e} | {r['kl']:.5f} | "
                     f"{r['top1']:.3f} | {r['bytes_ratio']:.2f}x |")
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
