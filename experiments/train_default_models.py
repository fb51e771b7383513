"""Train the embedded default models (stdlib-target, stdlib-draft) and export them.

    python experiments/train_default_models.py --model all            # target, then draft
    # stages: target-pre -> target-mid -> target (warm restarts), draft-pre -> draft (distilled)
    python experiments/train_default_models.py --model target --minutes 30   # stop after 30 min;
    python experiments/train_default_models.py --model target                # ...rerun resumes

Everything is deterministic given --seed: corpus order, tokenizer, init, batches. Runs
resume from the orbax checkpoints under --workdir (default runs/default_models, git-ignored);
a finished run only re-exports. The draft is distilled from the exported target (the
weights that ship), so train the target first. Works unchanged on a GPU (jax picks the
device); --batch-scale multiplies the batch size there (and then it is a different run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer import corpus, train  # noqa: E402
from jaxinfer.checkpoint import export_hf, load_hf  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.model import init_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _llama(d: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=d,
                       intermediate_size=ffn, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=corpus.BOS, eos_token_ids=(corpus.EOS,))


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model and its recipe: phases are (steps, batch, seq_len); the last phase uses long
    windows so that relative distances up to its seq_len are seen in training."""

    cfg: ModelConfig
    phases: tuple[tuple[int, int, int], ...]
    lr: float
    warmup: int
    distill_weight: float = 0.0
    init_from: str | None = None  # start from the final params of this preset's run
    export: bool = True
    data_seed: int = 0  # offsets the batch order, so stages do not replay the same batches
    residual_init_scale: bool = False  # GPT-2: wo and w_down init std / sqrt(2 L)

    def train_config(self, seed: int) -> train.TrainConfig:
        steps = sum(p[0] for p in self.phases)
        b, t = self.phases[0][1], self.phases[0][2]
        return train.TrainConfig(steps=steps, batch_size=b, seq_len=t, lr=self.lr, warmup_steps=self.warmup,
                                 seed=seed, eval_every=200, eval_batches=4, ckpt_every=100,
                                 distill_weight=self.distill_weight)


VOCAB = 4096
PRESETS = {
    # 11.0M parameters (9.4M outside the tied embedding). Measured on the 2-core dev machine:
    # ~1,450 tok/s at 256-token windows, ~720 tok/s at 1,024 (uncontended); 1,800 steps of
    # 2,048 tokens (3.7M tokens, ~1.4 epochs) fit in about an hour.
    # lr 2e-3 made it learn slower per step than the 1M draft (held-out 4.65 vs 4.54 nats at
    # step 600), so: lr 1e-3 and GPT-2's 1/sqrt(2L) init of the residual output projections.
    # After 1,300 steps (2.7M tokens) it was only ~0.1 nat ahead of the draft's label
    # pre-training, so a second cosine cycle (warm restart, Loshchilov & Hutter 2017) at a
    # lower peak continued it to 2,400 steps (~5M tokens, ~2 epochs): held-out 3.95 nats,
    # still behind the 1M draft's 3.81 after its 2,000 steps. A controlled rerun at lr 3e-3
    # learned exactly as fast per step as the draft (held-out 5.17 vs 5.19 at step 200, 4.92
    # vs ~4.9 at 300) and its train loss (3.49) showed no overfitting: at a few million
    # tokens both sizes are limited by steps, not capacity. So the third cycle spends another
    # hour on steps at a higher peak (2,350 steps, ~4.8M tokens, ~4 epochs in all).
    "target-pre": Preset(_llama(384, 6, 6, 2, 1024, VOCAB), phases=((1100, 8, 256), (200, 2, 1024)),
                         lr=1e-3, warmup=100, residual_init_scale=True, export=False),
    "target-mid": Preset(_llama(384, 6, 6, 2, 1024, VOCAB), phases=((900, 8, 256), (200, 2, 1024)),
                         lr=6e-4, warmup=50, init_from="target-pre", data_seed=300, export=False),
    "target": Preset(_llama(384, 6, 6, 2, 1024, VOCAB), phases=((2200, 8, 256), (150, 2, 1024)),
                     lr=1.5e-3, warmup=100, init_from="target-mid", data_seed=400),
    # 1.1M parameters, ~10x fewer FLOPs per token than the target (LM head included: 2.2 vs
    # 22 MFLOP). Two stages: next-token pre-training on the labels (needs no target, so it can
    # run while the target trains), then distillation from the exported target (0.8 KL + 0.2 CE).
    "draft-pre": Preset(_llama(128, 3, 2, 1, 384, VOCAB), phases=((1600, 8, 256), (400, 2, 1024)),
                        lr=3e-3, warmup=60, export=False, data_seed=100),
    "draft": Preset(_llama(128, 3, 2, 1, 384, VOCAB), phases=((300, 8, 256), (100, 2, 1024)),
                    lr=1e-3, warmup=20, distill_weight=0.8, init_from="draft-pre",
                    data_seed=200),
}
STAGES = {"target": ["target-pre", "target-mid", "target"], "draft-pre": ["draft-pre"],
          "draft": ["draft-pre", "draft"], "all": ["target-pre", "target-mid", "target", "draft-pre", "draft"]}


def flops_per_token(cfg: ModelConfig, context: int = 0) -> float:
    """Forward FLOPs per token: weight products (LM head included) + attention at a context."""
    return cfg.matmul_flops_per_token() + cfg.attention_flops_per_token(context)


def build_batcher(name: str, preset: Preset, data: corpus.CorpusData, seed: int) -> train.PhasedBatcher:
    phases, until = [], 0
    for i, (steps, b, t) in enumerate(preset.phases):
        until += steps
        phases.append((until, train.TokenBatcher(data.train, b, t, seed=seed * 1000 + preset.data_seed + i)))
    return train.PhasedBatcher(phases)


def final_params(name: str, args):
    """Params of the finished run of preset `name` (from its last orbax checkpoint)."""
    preset = PRESETS[name]
    tc = preset.train_config(args.seed)
    ckpt = train.Checkpointer(Path(args.workdir) / name / "checkpoints")
    if ckpt.latest_step() != tc.steps:
        raise SystemExit(f"{name} has not finished ({ckpt.latest_step()}/{tc.steps} steps); run it first")
    like = train.init_state(init_weights(preset.cfg, jax.random.PRNGKey(args.seed)), train.make_optimizer(tc))
    state, _ = ckpt.restore(like)
    ckpt.close()
    return state.params


def last_eval(workdir: Path) -> dict:
    """The last record of workdir/metrics.jsonl that has a held-out loss."""
    recs = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if r.get("heldout_ce") is not None]
    return {k: recs[-1][k] for k in ("step", "loss_ema", "heldout_ce")} if recs else {}


def run_model(name: str, args, data: corpus.CorpusData) -> dict:
    preset = PRESETS[name]
    cfg = preset.cfg
    tc = preset.train_config(args.seed)
    workdir = Path(args.workdir) / name
    teacher = None
    extra: tuple = ()
    if preset.distill_weight > 0:
        tdir = Path(args.out) / "stdlib-target"
        if not (tdir / "model.safetensors").is_file():
            raise SystemExit(f"{tdir}: train and export the target first (--model target)")
        t_cfg, t_weights = load_hf(tdir, "float32")
        teacher, extra = (t_cfg, t_weights), (t_weights,)
    loss_fn = train.lm_loss_fn(cfg, teacher, preset.distill_weight)
    heldout = train.eval_batches(data.heldout, tc.eval_batches, tc.batch_size, tc.seq_len)
    params = init_weights(cfg, jax.random.PRNGKey(args.seed))
    if preset.residual_init_scale:
        scale = (2 * cfg.num_layers) ** -0.5
        params = params.replace(layers=[layer.replace(wo=layer.wo * scale, w_down=layer.w_down * scale)
                                        for layer in params.layers])
    if args.init_from is not None and name == args.stages[0]:
        icfg, params = load_hf(args.init_from, "float32")
        if icfg.to_hf_dict() != cfg.to_hf_dict():
            raise SystemExit(f"--init-from {args.init_from}: its config differs from preset {name!r}")
        print(f"{name}: starting from the exported weights in {args.init_from}", flush=True)
    elif preset.init_from is not None:
        params = final_params(preset.init_from, args)
    print(f"{name}: {cfg.num_params() / 1e6:.2f}M params, {flops_per_token(cfg) / 1e6:.1f} MFLOP/token, "
          f"{tc.steps} steps, phases (steps, batch, seq) {preset.phases}", flush=True)
    state, summary = train.train(
        loss_fn, params, tc, build_batcher(name, preset, data, args.seed), workdir=workdir, heldout=heldout,
        extra=extra, max_seconds=args.minutes * 60 if args.minutes else None, desc=name,
        meta={"model": name, "config": cfg.to_hf_dict()})
    summary_path = workdir / "summary.json"
    prev = json.loads(summary_path.read_text()) if summary_path.is_file() else {"sessions": []}
    prev["sessions"].append({k: v for k, v in summary.items()})
    prev["train_seconds"] = sum(s["seconds"] for s in prev["sessions"])
    summary_path.write_text(json.dumps(prev, indent=1) + "\n")
    if int(state.step) < tc.steps:
        print(f"{name}: stopped at step {int(state.step)}/{tc.steps}; rerun to resume", flush=True)
        raise SystemExit(3)
    if not preset.export:
        return summary
    out = Path(args.out) / f"stdlib-{name}"
    export_hf(out, cfg, state.params, dtype="bfloat16", tokenizer_json=data.tokenizer_path,
              generation_config={"bos_token_id": corpus.BOS, "eos_token_id": corpus.EOS,
                                 "pad_token_id": corpus.PAD, "do_sample": False})
    (out / "tokenizer_config.json").write_text(json.dumps(corpus.tokenizer_config_json(), indent=2) + "\n")
    recipe = {"model": f"stdlib-{name}", "params": cfg.num_params(), "flops_per_token": flops_per_token(cfg),
              "phases": preset.phases, "train_config": dataclasses.asdict(tc),
              "train_seconds": round(prev["train_seconds"]), "final": last_eval(workdir),
              "corpus": {"heldout_packages": list(corpus.HELDOUT_PACKAGES), "train_tokens": int(data.train.size),
                         "heldout_tokens": int(data.heldout.size), "vocab_size": VOCAB},
              "python": sys.version.split()[0], "jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "command": f"python experiments/train_default_models.py --model {name} --seed {args.seed}"}
    (workdir / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"{name}: exported {out} ({recipe['final']})", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(STAGES), default="all",
                   help="draft runs draft-pre (if not done) and then the distillation from the target")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of this invocation per model; rerun to resume")
    p.add_argument("--out", default=str(REPO / "jaxinfer" / "assets" / "models"))
    p.add_argument("--workdir", default=str(REPO / "runs" / "default_models"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=list(PRESETS), default=None, help="run only this stage")
    p.add_argument("--init-from", default=None, metavar="HF_DIR",
                   help="start the first stage from these exported weights instead of its init_from "
                        "stage's checkpoints (e.g. when only that stage's export survives)")
    args = p.parse_args(argv)
    args.stages = [args.stage] if args.stage else STAGES[args.model]
    t0 = time.time()
    data = corpus.build_corpus(args.workdir, vocab_size=VOCAB)
    for name in args.stages:
        run_model(name, args, data)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
