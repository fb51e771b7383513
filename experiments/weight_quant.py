"""Weight quantization: what each format and method costs in quality and buys in bytes and speed.

On the embedded target, for every configuration (dense; RTN int8 / int4 g128 / int4 g32 /
fp8_e4m3 / nvfp4 / mxfp4 / w8a8 (int8 weights and per-token int8 activations); GPTQ int8, int4 g128
and w8a8; AWQ int4 g128 with and without its clipping search, and nvfp4; a hybrid int4 policy;
int8 / w8a8 / GPTQ int4 with the LM head quantized too; GPTQ in activation order), all in one run:
  * perplexity over held-out windows (teacher-forced, no cache) and its change vs dense;
  * KL(dense || quantized) of the next-token distributions, and top-1 agreement with dense;
  * greedy agreement: mean number of leading generated tokens equal to dense's, over held-out
    prompts;
  * bytes of the decoder projections (codes + scales), of the LM head (the embedding when tied and
    dense; a quantized head is its own copy) and of the whole model;
  * decode throughput of the static loop (`LLM.generate_static`) at each batch size, measured
    in --pairs back-to-back pairs with dense (alternating which goes first); the ratio is the
    median of the pairs' ratios.
Writes experiments/results/weight_quant.{md,json}.

    python experiments/weight_quant.py [--windows 32] [--window-len 256] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from report import write_report  # experiments/ is on sys.path when this runs as a script

from jaxinfer import LLM, SamplingParams
from jaxinfer.corpus import heldout_prompts, token_windows
from jaxinfer.model import forward
from jaxinfer.wquant import weight_bytes

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "dense": (None, None),
    "int8 rtn": ("int8", {}),
    "int8 gptq": ("int8", {"method": "gptq"}),
    "int4 g128 rtn": ("int4", {}),
    "int4 g128 gptq": ("int4", {"method": "gptq"}),
    "int4 g128 awq": ("int4", {"method": "awq"}),
    "int4 g128 awq, no clip": ("int4", {"method": "awq", "clip": False}),
    "int4 g32 rtn": ("int4", {"group_size": 32}),
    "int4 g128 rtn, int8 w_down + layer 0": ("int4", {"overrides": {"w_down": "int8", "layers.0": "int8"}}),
    "fp8_e4m3 rtn": ("fp8_e4m3", {}),
    "nvfp4 rtn": ("nvfp4", {}),
    "mxfp4 rtn": ("mxfp4", {}),
    "nvfp4 awq": ("nvfp4", {"method": "awq"}),
    "w8a8 rtn": ("w8a8", {}),
    "w8a8 gptq": ("w8a8", {"method": "gptq"}),
    "int8 rtn, int8 head": ("int8", {"lm_head": "int8"}),
    "w8a8 rtn, w8a8 head": ("w8a8", {"lm_head": "w8a8"}),
    "int4 g128 gptq, int8 head": ("int4", {"method": "gptq", "lm_head": "int8"}),
    "int4 g128 gptq act_order": ("int4", {"method": "gptq", "act_order": True}),
    "int8 gptq act_order": ("int8", {"method": "gptq", "act_order": True}),
    # mixture-of-experts models (experiments/upcycle_moe.py): experts only, and GPTQ / AWQ with each expert
    # calibrated on the tokens routed to it instead of on every token (calibrate_all_experts)
    "int4 g128 rtn, experts only": ("int4", {"skip": ["wqkv", "wo", "w_gate_up", "w_down"]}),
    "int4 g128 gptq, routed calibration": ("int4", {"method": "gptq", "calibrate_all_experts": False}),
    "int4 g128 awq, routed calibration": ("int4", {"method": "awq", "calibrate_all_experts": False}),
}


@functools.partial(jax.jit, static_argnames="cfg")
def _logprobs(weights, cfg, tokens):
    logits, _, _ = forward(weights, cfg, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                           None, None)
    return jax.nn.log_softmax(logits, axis=-1)


def quality(llm: LLM, dense_lp: list | None, windows: np.ndarray, batch: int = 8):
    """(perplexity, mean KL(dense || this), top-1 agreement with dense, log-probs per batch)."""
    nll, kl, agree, count, lps = 0.0, 0.0, 0.0, 0, []
    for i in range(0, len(windows), batch):
        tok = jnp.asarray(windows[i:i + batch])
        lp = _logprobs(llm.weights, llm.cfg, tok)
        lps.append(lp)
        tgt = tok[:, 1:]
        nll -= float(jnp.sum(jnp.take_along_axis(lp[:, :-1], tgt[..., None], axis=-1)))
        count += tgt.size
        if dense_lp is not None:
            ref = dense_lp[i // batch]
            kl += float(jnp.sum(jnp.exp(ref) * (ref - lp)))
            agree += float(jnp.sum(jnp.argmax(ref, -1) == jnp.argmax(lp, -1)))
    n_pos = windows.shape[0] * windows.shape[1]
    return float(np.exp(nll / count)), kl / n_pos, agree / n_pos, lps


def greedy(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate_static(prompts, sp, batch_size=len(prompts))]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def decode_tok_s(llm: LLM, prompts, batch: int, new_tokens: int) -> float:
    """Tokens/s of the static loop generating new_tokens for every prompt, in batches of `batch`."""
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate_static(prompts, sp, batch_size=batch)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if "experts" not in c], choices=list(CONFIGS))
    ap.add_argument("--out", default=str(RESULTS / "weight_quant"))
    args = ap.parse_args()

    dense = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.batches))
    tok = dense.get_tokenizer()
    windows = token_windows(tok, args.windows, args.window_len, "heldout")
    prompts = [{"prompt_token_ids": tok.encode(p.text)} for p in heldout_prompts(tok, num=args.prompts)]
    speed_prompts = prompts * (max(args.batches) // len(prompts) + 1)
    d_ppl, _, _, d_lp = quality(dense, None, windows)
    d_greedy = greedy(dense, prompts, args.greedy_tokens)
    for b in args.batches:  # compile dense's programs once, outside the timed pairs
        decode_tok_s(dense, speed_prompts[:b], b, args.new_tokens)
    rows = []
    for name in args.configs:
        quant, qconf = CONFIGS[name]
        t0 = time.perf_counter()
        llm = dense if quant is None else LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.batches),
                                              quantization=quant, quantization_config=qconf)
        quant_s = time.perf_counter() - t0
        ppl, kl, top1, _ = quality(llm, d_lp, windows)
        outs = greedy(llm, prompts, args.greedy_tokens)
        row = dict(config=name, ppl=round(ppl, 4), ppl_change_pct=round(100 * (ppl / d_ppl - 1), 2),
                   kl=round(kl, 5), top1_agreement=round(top1, 4),
                   greedy_prefix=round(float(np.mean([common_prefix(a, b) for a, b in zip(outs, d_greedy)])), 1),
                   **{f"{k}_bytes": v for k, v in weight_bytes(llm.weights).items()},
                   load_quantize_s=round(quant_s, 1))
        for b in args.batches:
            decode_tok_s(llm, speed_prompts[:b], b, args.new_tokens)  # compile
            ratios, tps = [], []
            for i in range(args.pairs):
                order = (dense, llm) if i % 2 == 0 else (llm, dense)
                r = {id(m): decode_tok_s(m, speed_prompts[:b], b, args.new_tokens) for m in order}
                ratios.append(r[id(llm)] / r[id(dense)])
                tps.append(r[id(llm)])
            row[f"tok_s_b{b}"] = round(float(np.median(tps)), 1)
            row[f"speedup_b{b}"] = round(float(np.median(ratios)), 3)
            row[f"speedup_b{b}_pairs"] = [round(x, 3) for x in ratios]
        print(row, flush=True)
        rows.append(row)
    cfg = dense.cfg
    dense_proj = rows[0]["dense_projections_bytes"] if rows[0]["config"] == "dense" else None
    lines = [f"# Weight quantization on {args.model} ({args.dtype}, {cfg.num_layers} layers, hidden "
             f"{cfg.hidden_size})", "",
             f"`python experiments/weight_quant.py {shlex.join(sys.argv[1:])}`".replace(" `", "`")
             + f" — {args.windows} held-out windows of {args.window_len} tokens (teacher-forced); greedy agreement over "
             f"{args.prompts} held-out prompts x {args.greedy_tokens} tokens; decode speed: static loop, "
             f"{args.new_tokens} new tokens, median of {args.pairs} back-to-back pairs with dense; jax "
             f"{jax.__version__}, {jax.default_backend()}.", "",
             "| config | ppl | Δppl | KL vs dense | top-1 agree | greedy prefix | projection MB (× dense) | "
             "LM head MB | " + " | ".join(f"tok/s b{b} (× dense)" for b in args.batches) + " | quantize s |",
             "|---" * (9 + len(args.batches)) + "|"]
    for r in rows:
        proj = r["quantized_bytes"] + r["dense_projections_bytes"]
        ratio = f" ({proj / dense_proj:.3f}x)" if dense_proj else ""
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['kl']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['greedy_prefix']} / {args.greedy_tokens} | "
                     f"{proj / 2**20:.2f}{ratio} | {r['lm_head_bytes'] / 2**20:.2f} | "
                     + " | ".join(f"{r[f'tok_s_b{b}']} ({r[f'speedup_b{b}']:.2f}x)" for b in args.batches)
                     + f" | {r['load_quantize_s']} |")
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
