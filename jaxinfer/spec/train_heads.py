"""Training EAGLE and Medusa heads on a frozen target's features (optax, orbax via jaxinfer.train).

Legend: B batch, T tokens, D model dim, V vocab, J unrolled EAGLE draft steps, K Medusa heads.

Features are computed on the fly: every step runs the frozen target (no gradient) on a
[B, T + 1] window of the training split and trains the head on its hidden states and its
next-token distributions p_t (soft labels: self-distillation, so the head learns what the
target would say, which is what verification accepts).

EAGLE (Li et al. 2024): head input at t is (f_t, x_{t+1}); it predicts f_{t+1}. Loss =
SmoothL1(f_hat_{t+1}, f_{t+1}) (features scaled by their RMS) + w_cls * CE(p_{t+1},
softmax(LM(f_hat_{t+1}))). Drafting feeds predicted features back in, so training unrolls
J steps the way drafting runs them ("training-time test", EAGLE-3): pass j reads at t the
feature pass j-1 predicted at t-1, and attends to the keys drafting would have cached
there: true-feature keys (pass 0) up to t-j, then one key of each later pass.

Medusa (Cai et al. 2024): head i on f_t is trained towards p_{t+i+1} (the target's
distribution of x_{t+i+2}), weighted 0.8^i as in the paper.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.layers import apply_rope, einsum_f32, matmul, rms_norm
from jaxinfer.model import LayerWeights, Weights, forward, lm_logits, mlp_block, rope_tables
from jaxinfer.spec.heads import medusa_logits


@dataclasses.dataclass(frozen=True)
class HeadLossConfig:
    """Loss knobs of head training (saved in the head's recipe)."""

    unroll: int = 2  # EAGLE: J draft steps trained as drafting runs them
    cls_weight: float = 1.0  # EAGLE: weight of the token cross-entropy next to the feature regression
    noise: float = 0.0  # EAGLE: uniform noise on input features, as a fraction of their RMS (EAGLE-1 uses 0.1 abs.)
    medusa_decay: float = 0.8  # Medusa: weight of head i is decay^i


def target_features(target: Weights, cfg: ModelConfig, inputs: jax.Array):
    """Frozen target on inputs [B, T]: (hidden f [B, T, D], log p [B, T, V]) without gradient."""
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, hidden, _ = forward(jax.lax.stop_gradient(target), cfg, inputs, positions, None, None)
    return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))


def soft_ce(logits: jax.Array, target_logp: jax.Array) -> jax.Array:
    """Cross-entropy of softmax(logits) [..., V] against the distribution exp(target_logp): [...]."""
    return -jnp.sum(jnp.exp(target_logp) * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _smooth_l1(x: jax.Array) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


# ----------------------------------------------------------------------------- EAGLE

def eagle_unrolled(head: dict, hcfg: ModelConfig, target: Weights, feats: jax.Array, next_tokens: jax.Array,
                   unroll: int) -> list[jax.Array]:
    """J passes of the EAGLE head over a window, as drafting would run them.

    feats [B, T, D] true features f_t; next_tokens [B, T] the tokens x_{t+1}. Pass 0 reads
    (f_t, x_{t+1}); pass j reads (pass j-1's prediction at t-1, x_{t+1}). Query (j, t) sees
    key (i, s) iff s <= t and i == max(0, j - (t - s)): at drafting step j the head cache
    holds true-feature entries up to P-1 = t-j and one drafted entry per step after it.
    Returns the J predictions [B, T, D] (pass j at t predicts f_{t+1}).
    """
    b, t, d = feats.shape
    n, kh, h = hcfg.num_heads, hcfg.num_kv_heads, hcfg.head_dim
    layer = LayerWeights(**head["layer"])
    emb = target.embed[next_tokens].astype(feats.dtype)  # [B, T, D]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(hcfg, positions, feats.dtype)
    tq = jnp.arange(t)[:, None]  # query position
    ts = jnp.arange(t)[None, :]  # key position
    keys, values, outs = [], [], []
    inp = feats
    for j in range(unroll):
        x = matmul(jnp.concatenate([inp, emb], axis=-1), head["fc"]) + head["fc_bias"]  # [B, T, D]
        hn = rms_norm(x, layer.attn_norm, hcfg.rms_norm_eps)
        qkv = matmul(hn, layer.wqkv)  # [B, T, (N + 2K) H]
        if layer.bqkv is not None:
            qkv = qkv + layer.bqkv
        q, k, v = jnp.split(qkv, [n * h, (n + kh) * h], axis=-1)
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kh, h), v.reshape(b, t, kh, h)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, hcfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, hcfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys.append(k)
        values.append(v)
        kk = jnp.stack(keys, axis=1)  # [B, j+1, T, K, H]
        vv = jnp.stack(values, axis=1)
        qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
        scores = einsum_f32("btkgh,biskh->bkgtis", qg, kk) * h ** -0.5  # [B, K, G, T, j+1, T]
        src = jnp.maximum(0, j - (tq - ts))  # [T, T] the pass whose key query t sees at s
        mask = (ts <= tq)[:, None, :] & (jnp.arange(j + 1)[None, :, None] == src[:, None, :])  # [T, j+1, T]
        scores = jnp.where(mask, scores, -jnp.inf)
        probs = jax.nn.softmax(scores.reshape(b, kh, n // kh, t, -1), axis=-1).reshape(scores.shape)
        attn = einsum_f32("bkgtis,biskh->btkgh", probs.astype(vv.dtype), vv).reshape(b, t, n * h)
        out = matmul(attn.astype(x.dtype), layer.wo)
        if layer.bo is not None:
            out = out + layer.bo
        x = x + out
        x = x + mlp_block(layer, hcfg, x)
        outs.append(x)
        inp = jnp.concatenate([feats[:, :1], x[:, :-1]], axis=1)  # pass j+1 at t reads pass j's f_hat_t
    return outs


def eagle_loss_fn(tcfg: ModelConfig, hcfg: ModelConfig, lc: HeadLossConfig):
    """loss(head, batch [B, T + 1], target) -> (loss, aux) for jaxinfer.train.train."""

    def loss(head, batch, target):
        inputs = batch[:, :-1]  # [B, T] x_0..x_{T-1}
        b, t = inputs.shape
        feats, logp = target_features(target, tcfg, inputs)  # f_t, log p_t (law of x_{t+1})
        scale = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(feats.astype(jnp.float32)))))
        inp = feats
        if lc.noise > 0:
            key = jax.random.fold_in(jax.random.PRNGKey(1), jnp.sum(batch[:, :4]))  # varies with the batch
            u = jax.random.uniform(key, feats.shape, minval=-1.0, maxval=1.0)
            inp = feats + lc.noise * scale * u
        preds = eagle_unrolled(head, hcfg, target, inp, batch[:, 1:], lc.unroll)
        f_next = feats[:, 1:]  # [B, T-1] targets f_{t+1}
        logp_next = logp[:, 1:]
        total, aux = 0.0, {}
        for j, pred in enumerate(preds):
            valid = (jnp.arange(t - 1) >= j).astype(jnp.float32)[None, :]  # pass j needs t - j >= 0
            denom = jnp.sum(valid) * b
            reg = jnp.sum(jnp.mean(_smooth_l1((pred[:, :-1] - f_next) / scale), axis=-1) * valid) / denom
            lg = lm_logits(target, pred[:, :-1], tcfg)  # [B, T-1, V]
            ce = jnp.sum(soft_ce(lg, logp_next) * valid) / denom
            agree = jnp.sum((jnp.argmax(lg, -1) == jnp.argmax(logp_next, -1)) * valid) / denom
            total = total + reg + lc.cls_weight * ce
            aux[f"reg{j}"], aux[f"ce{j}"], aux[f"top1_{j}"] = reg, ce, agree
        aux["ce"] = aux["ce0"]
        return total / lc.unroll, aux

    return loss


# ----------------------------------------------------------------------------- Medusa

def medusa_loss_fn(tcfg: ModelConfig, lc: HeadLossConfig):
    """loss(head, batch [B, T + 1], target) -> (loss, aux): head i on f_t against p_{t+i+1}."""

    def loss(head, batch, target):
        inputs = batch[:, :-1]
        b, t = inputs.shape
        feats, logp = target_features(target, tcfg, inputs)
        logits = medusa_logits(head, target, feats, tcfg)  # [B, T, K, V]
        k = logits.shape[2]
        total, norm, aux = 0.0, 0.0, {}
        for i in range(k):
            lg = logits[:, :t - i - 1, i]  # positions whose label p_{t+i+1} is in the window
            lab = logp[:, i + 1:]
            ce = jnp.mean(soft_ce(lg, lab))
            w = lc.medusa_decay ** i
            total, norm = total + w * ce, norm + w
            aux[f"ce{i}"] = ce
            aux[f"top1_{i}"] = jnp.mean(jnp.argmax(lg, -1) == jnp.argmax(lab, -1))
        aux["ce"] = aux["ce0"]
        return total / norm, aux

    return loss
