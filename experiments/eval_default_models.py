"""Evaluate the embedded default models on the held-out stdlib packages.

    python experiments/eval_default_models.py [--models jaxinfer/assets/models] [--workdir runs/default_models]

Writes experiments/results/default_models.{json,md}:
- held-out perplexity of stdlib-target and stdlib-draft (float32, from the shipped bf16
  weights) over non-overlapping windows of --window tokens of the held-out stream, next to
  unigram (add-one) and bigram baselines (add-one, and Dirichlet-smoothed toward the unigram
  with its strength chosen on the last 5% of the training tokens) fitted on the training
  tokens and scored on exactly the same predicted tokens;
- greedy agreement of draft and target (fraction of positions where their argmax match;
  predicts greedy speculative acceptance) and the mean overlap sum_x min(p, q) (the expected
  acceptance of speculative sampling at temperature 1, Leviathan et al. 2023, Theorem 3.5);
- the target's held-out loss by position in 2,048-token windows (how far its context reaches);
- max |logit difference| between transformers and jaxinfer on the exported target (float32);
- a greedy completion of "def __init__(self" by the target.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer import corpus  # noqa: E402
from jaxinfer.checkpoint import load_hf  # noqa: E402
from jaxinfer.model import forward  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POS_BUCKETS = ((0, 256), (256, 512), (512, 1024), (1024, 2048))


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows [W, length] covering the stream (the tail shorter than length is dropped)."""
    n = tokens.size // length
    return tokens[: n * length].reshape(n, length).astype(np.int32)


def model_pass(weights, cfg, wins: np.ndarray, batch: int, fn):
    """Apply fn(logits [B, T-1, V], targets [B, T-1]) -> dict of [B, T-1] arrays to every batch of windows."""
    @jax.jit
    def step(w, toks):
        b, t = toks.shape
        pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1))
        logits, _, _ = forward(w, cfg, toks[:, :-1], pos, None, None)
        return fn(logits, toks[:, 1:])

    outs = []
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        out = jax.device_get(step(weights, jnp.asarray(chunk)))
        outs.append({k: v[: batch - pad] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def nll_and_argmax(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return {"nll": -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0],
            "argmax": jnp.argmax(logits, -1).astype(jnp.int32)}


def unigram_bigram(train: np.ndarray, vocab: int, prev: np.ndarray, nxt: np.ndarray) -> dict:
    """NLL per token of unigram / bigram baselines fitted on `train`, scored on (prev -> nxt)."""
    def fit(tokens):
        uni = np.bincount(tokens, minlength=vocab).astype(np.float64)
        bi = np.zeros((vocab, vocab), np.float64)
        np.add.at(bi, (tokens[:-1], tokens[1:]), 1.0)
        return uni, bi

    def dirichlet_nll(uni, bi, k, a, b):
        p_uni = (uni + 1) / (uni.sum() + vocab)
        return -np.log((bi[a, b] + k * p_uni[b]) / (bi.sum(1)[a] + k))

    train = train.astype(np.int64)
    cut = int(train.size * 0.95)
    uni_f, bi_f = fit(train[:cut])
    val = train[cut:]
    grid = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)
    val_nll = {k: float(dirichlet_nll(uni_f, bi_f, k, val[:-1], val[1:]).mean()) for k in grid}
    best_k = min(val_nll, key=val_nll.get)
    uni, bi = fit(train)
    prev, nxt = prev.astype(np.int64), nxt.astype(np.int64)
    return {
        "unigram_add1": -np.log((uni[nxt] + 1) / (uni.sum() + vocab)),
        "bigram_add1": -np.log((bi[prev, nxt] + 1) / (bi.sum(1)[prev] + vocab)),
        "bigram_dirichlet": dirichlet_nll(uni, bi, best_k, prev, nxt),
        "bigram_dirichlet_k": best_k,
    }


def hf_logit_diff(model_dir: Path, tokens: np.ndarray) -> float:
    """max |logits_transformers - logits_jaxinfer| in float32 on tokens [B, T]."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    cfg, w = load_hf(model_dir, "float32")
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ours = np.asarray(forward(w, cfg, jnp.asarray(tokens), pos, None, None)[0])
    return float(np.max(np.abs(ours - ref)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(REPO / "jaxinfer" / "assets" / "models"))
    p.add_argument("--workdir", default=str(REPO / "runs" / "default_models"))
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "default_models"))
    args = p.parse_args(argv)
    t0 = time.time()
    models = Path(args.models)
    data = corpus.build_corpus(args.workdir, vocab_size=corpus.DEFAULT_VOCAB_SIZE)
    wins = windows(data.heldout, args.window + 1)
    prev, nxt = wins[:, :-1], wins[:, 1:]
    n_tok = int(nxt.size)
    print(f"held-out: {len(wins)} windows of {args.window} predicted tokens = {n_tok:,} tokens "
          f"(of {data.heldout.size:,})", flush=True)

    res: dict = {"heldout_packages": list(corpus.HELDOUT_PACKAGES), "window": args.window,
                 "heldout_tokens_scored": n_tok, "perplexity": {}, "nll": {}}
    cfg_t, w_t = load_hf(models / "stdlib-target", "float32")
    cfg_d, w_d = load_hf(models / "stdlib-draft", "float32")
    vocab = cfg_t.vocab_size

    base = unigram_bigram(data.train, vocab, prev, nxt)
    res["bigram_dirichlet_k"] = base.pop("bigram_dirichlet_k")
    for name, nll in base.items():
        res["nll"][name] = float(nll.mean())

    out_t = model_pass(w_t, cfg_t, wins, args.batch, nll_and_argmax)
    out_d = model_pass(w_d, cfg_d, wins, args.batch, nll_and_argmax)
    res["nll"]["stdlib-target"] = float(out_t["nll"].mean())
    res["nll"]["stdlib-draft"] = float(out_d["nll"].mean())
    res["perplexity"] = {k: math.exp(v) for k, v in res["nll"].items()}
    res["top1_accuracy"] = {"stdlib-target": float((out_t["argmax"] == nxt).mean()),
                            "stdlib-draft": float((out_d["argmax"] == nxt).mean())}
    res["greedy_agreement"] = float((out_t["argmax"] == out_d["argmax"]).mean())

    @jax.jit
    def overlap(wt, wd, toks):
        b, t = toks.shape
        pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1))
        pt = jax.nn.softmax(forward(wt, cfg_t, toks[:, :-1], pos, None, None)[0], -1)
        pd = jax.nn.softmax(forward(wd, cfg_d, toks[:, :-1], pos, None, None)[0], -1)
        return jnp.sum(jnp.minimum(pt, pd), -1)  # [B, T]
    sub = wins[:: max(1, len(wins) // 16)][:16]
    res["sampling_acceptance_t1"] = float(np.mean([np.asarray(overlap(w_t, w_d, jnp.asarray(sub[i:i + 4])))
                                                   for i in range(0, len(sub), 4)]))
    print(json.dumps({k: res[k] for k in ("perplexity", "greedy_agreement", "sampling_acceptance_t1")},
                     indent=1), flush=True)

    long = windows(data.heldout, 2049)
    out_long = model_pass(w_t, cfg_t, long, 2, nll_and_argmax)
    res["target_nll_by_position"] = {f"{a}-{b}": float(out_long["nll"][:, a:b].mean()) for a, b in POS_BUCKETS}

    res["max_abs_logit_diff_transformers_f32"] = hf_logit_diff(models / "stdlib-target", wins[:2, :512])

    from jaxinfer import LLM, SamplingParams
    llm = LLM(model=str(models / "stdlib-target"), dtype="float32")
    prompt = "def __init__(self"
    text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].text
    res["sample"] = {"prompt": prompt, "max_tokens": 48, "greedy_completion": text}
    res["params"] = {"stdlib-target": cfg_t.num_params(), "stdlib-draft": cfg_d.num_params()}
    res["seconds"] = round(time.time() - t0, 1)
    res["jax"] = jax.__version__

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(r: dict) -> str:
    rows = [("stdlib-target", "jaxinfer, %.2fM params" % (r["params"]["stdlib-target"] / 1e6)),
            ("stdlib-draft", "jaxinfer, %.2fM params" % (r["params"]["stdlib-draft"] / 1e6)),
            ("bigram_dirichlet", f"bigram, Dirichlet prior on unigram (k={r['bigram_dirichlet_k']})"),
            ("bigram_add1", "bigram, add-one"), ("unigram_add1", "unigram, add-one")]
    lines = [f"# Default models on the held-out stdlib packages ({', '.join(r['heldout_packages'])})", "",
             f"{r['heldout_tokens_scored']:,} tokens scored, windows of {r['window']} tokens, float32.", "",
             "| model | what | NLL (nats/token) | perplexity |", "|---|---|---|---|"]
    for k, what in rows:
        lines.append(f"| {k} | {what} | {r['nll'][k]:.4f} | {r['perplexity'][k]:.2f} |")
    lines += ["", f"- greedy agreement draft vs target (argmax equal): {r['greedy_agreement']:.4f}",
              f"- mean sum_x min(p_target, p_draft) (speculative sampling acceptance at T=1): "
              f"{r['sampling_acceptance_t1']:.4f}",
              f"- top-1 next-token accuracy: target {r['top1_accuracy']['stdlib-target']:.4f}, "
              f"draft {r['top1_accuracy']['stdlib-draft']:.4f}",
              "- target NLL by position in 2,048-token windows: " + ", ".join(
                  f"{k}: {v:.3f}" for k, v in r["target_nll_by_position"].items()),
              f"- transformers vs jaxinfer, exported target, float32: max |logit diff| = "
              f"{r['max_abs_logit_diff_transformers_f32']:.2e}", "",
              f"Greedy completion of `{r['sample']['prompt']}` ({r['sample']['max_tokens']} tokens):", "",
              "```python", r["sample"]["prompt"] + r["sample"]["greedy_completion"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
