"""A mixture-of-experts model to measure on, made from the embedded target by sparse upcycling
(Komatsuzaki et al., 2022): every layer's MLP copied into E experts, each copy's weights perturbed
by relative noise so that the experts differ, and a random router choosing k of them per token
(Mixtral's architecture: softmax, top k, renormalized). The experts' outputs average to about the
dense MLP's, so the model keeps most of the target's quality while its activations, routing and
expert weights are those of a trained model's layers, not of random ones: what quantizing the
experts costs can be measured on it (`experiments/weight_quant.py --model <dir>`).

    python experiments/upcycle_moe.py --out /tmp/stdlib-moe [--experts 8] [--top-k 2] [--noise 0.05]

Writes an HF directory (config.json, safetensors in float32, the target's tokenizer) that `LLM`,
and transformers, load.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.checkpoint import export_hf, load_hf
from jaxinfer.llm import resolve_model


def upcycle(model: str, experts: int, top_k: int, noise: float, seed: int = 0):
    """(config, weights) of the upcycled model (see the module docstring)."""
    src = resolve_model(model)
    cfg, weights = load_hf(src)
    if cfg.num_experts:
        raise ValueError(f"{model} is a mixture-of-experts model already")
    moe_cfg = dataclasses.replace(cfg, architecture="MixtralForCausalLM", num_experts=experts,
                                  num_experts_per_tok=top_k, moe_intermediate_size=cfg.intermediate_size,
                                  norm_topk_prob=True)
    rng = np.random.default_rng(seed)
    layers = []
    for layer in weights.layers:
        gate_up, down = np.asarray(layer.w_gate_up, np.float32), np.asarray(layer.w_down, np.float32)
        jitter = lambda w: w * (1 + noise * rng.standard_normal((experts, *w.shape), np.float32))
        router = rng.standard_normal((cfg.hidden_size, experts), np.float32) / np.sqrt(cfg.hidden_size)
        layers.append(layer.replace(w_gate_up=None, w_down=None, router=jnp.asarray(router),
                                    experts_gate_up=jnp.asarray(jitter(gate_up)),
                                    experts_down=jnp.asarray(jitter(down))))
    return moe_cfg, weights.replace(layers=layers), src


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05, help="relative std of each expert's weight perturbation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg, weights, src = upcycle(args.model, args.experts, args.top_k, args.noise, args.seed)
    out = Path(args.out)
    export_hf(out, cfg, weights, dtype="float32", tokenizer_json=src / "tokenizer.json")
    for name in ("tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    print(f"{out}: {cfg.architecture}, {cfg.num_experts} experts (top {cfg.num_experts_per_tok}) per layer, "
          f"{cfg.num_params() / 1e6:.1f}M parameters ({jax.default_backend()})")


if __name__ == "__main__":
    main()
