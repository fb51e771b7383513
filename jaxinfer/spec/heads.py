"""Draft heads that ride on the target model: EAGLE and Medusa. Params, forward, orbax I/O.

Legend: B batch, T tokens, D model dim, V vocab, K Medusa heads, R Medusa inner width,
F EAGLE ffn dim.

Both reuse the target's embedding, final norm and LM head (not stored with the head).
The target feature is `model.forward`'s `hidden`: the last layer's output before the
final norm, the state the LM head reads.

- EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
  Uncertainty"): at position t the head reads the feature f_t and the embedding of the
  next token x_{t+1}, fuses them with one linear layer [2D -> D], runs one decoder layer
  (the target's layer shapes, its own small KV cache), and predicts the feature
  f_{t+1}; the target's LM head turns that into the distribution of x_{t+2}. Drafting
  feeds its own predicted features back in.
- Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
  Multiple Decoding Heads"): K residual blocks on the feature f_t at the last verified
  position; block i predicts the token i + 1 places after the one the LM head predicts
  (x_{t+i+1}), so one target pass yields K proposals.

Params are plain dicts of arrays (what orbax stores best); a head directory holds
`head_config.json` (method, sizes, the target it was trained for, the training recipe)
and the orbax checkpoint `params/`, and may hold `token_counts.npy`: how often each token
occurs in the head's training data.

Reduced draft vocabulary (EAGLE-3's d2t, FR-Spec's frequency-ranked drafting): with
`draft_vocab_size` N the head drafts among the N most frequent tokens only, scoring them
with those N rows of the LM head instead of all V (`head_logits`). The others get logit
-inf, so q is exactly the distribution the drafts are drawn from and verification stays
lossless; a token outside the set is never drafted and is only emitted as a correction or
bonus.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.kv.cache import AttentionMeta, KVCache
from jaxinfer.layers import dense_dot, matmul, rms_norm
from jaxinfer.model import (
    LayerWeights,
    Weights,
    decoder_layer,
    final_norm,
    finish_logits,
    layer_shapes,
    layout_projection,
    lm_logits,
    rope_tables,
)

HEAD_METHODS = ("eagle", "medusa")
# ModelConfig fields by which a layer departs from Llama's (Gemma's, OLMo 2's, MoE models'); an EAGLE
# head keeps their defaults (a dense MLP)
LAYER_STYLE_FIELDS = ("hidden_act", "norm_style", "scale_embeddings", "sandwich_norms", "input_norms", "qk_norm_full",
                      "query_pre_attn_scalar", "layer_types", "local_rope_theta", "attn_logit_softcapping",
                      "final_logit_softcapping", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "norm_topk_prob", "shared_expert_intermediate_size", "dense_layers", "embedding_multiplier",
                      "residual_multiplier", "attention_multiplier", "gated_mlp",
                      "qkv_per_head", "parallel_residual", "shared_input_norm", "rope_interleaved",
                      "rope_layers")
_TARGET_KEYS = ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


# ----------------------------------------------------------------------------- EAGLE

def eagle_config(target: ModelConfig, intermediate_size: int | None = None) -> ModelConfig:
    """The head's one decoder layer: the target's attention shapes, optionally a narrower MLP.
    It is a Llama layer whatever the target: the fields by which Gemma's, OLMo 2's or a MoE model's
    layers depart from Llama's (LAYER_STYLE_FIELDS) keep their defaults (SwiGLU, pre-norm RMSNorm, global RoPE
    and attention; a Mistral target's sliding window kept), since the training step (train_heads)
    writes this layer out. The target's final norm and LM head still read the target's config
    (`head_logits`)."""
    llama = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in LAYER_STYLE_FIELDS}
    return dataclasses.replace(target, num_layers=1, intermediate_size=intermediate_size or target.intermediate_size,
                               sliding_window=target.sliding_window if target.layer_types is None else None, **llama)


def init_eagle(hcfg: ModelConfig, key: jax.Array, std: float = 0.02) -> dict:
    """Random EAGLE head: fc [2D, D] (+ bias) and one decoder layer (dict of LayerWeights fields)."""
    d = hcfg.hidden_size
    k_fc, k_layer = jax.random.split(key)
    shapes = {n: s for n, s in layer_shapes(hcfg).items() if s is not None}
    keys = dict(zip(shapes, jax.random.split(k_layer, len(shapes))))
    layer = {}
    for name, shape in shapes.items():
        if "norm" in name:
            layer[name] = jnp.ones(shape, jnp.float32)
        elif name.startswith("b"):
            layer[name] = jnp.zeros(shape, jnp.float32)
        else:
            layer[name] = std * jax.random.normal(keys[name], shape, jnp.float32)
    # fc starts as "feature + embedding" so the untrained head already passes the feature on.
    eye = jnp.eye(d, dtype=jnp.float32)
    fc = jnp.concatenate([eye, eye], axis=0) + std * jax.random.normal(k_fc, (2 * d, d))
    return {"fc": fc, "fc_bias": jnp.zeros((d,), jnp.float32), "layer": layer}


def eagle_forward(head: dict, hcfg: ModelConfig, target: Weights, features: jax.Array, tokens: jax.Array,
                  positions: jax.Array, kv: KVCache | None, meta: AttentionMeta | None,
                  backend: str = "xla") -> tuple[jax.Array, KVCache | None]:
    """Predicted next features. features [B, T, D] (f_t), tokens [B, T] (x_{t+1}),
    positions [B, T] (t) -> (f_hat_{t+1} [B, T, D], kv).

    kv: the head's one-layer cache (or None: causal attention over the T inputs, for
    training). The caller applies `lm_logits(target, f_hat)` for token probabilities.
    """
    emb = target.embed[tokens].astype(features.dtype)  # [B, T, D]
    x = matmul(jnp.concatenate([features, emb], axis=-1), head["fc"]) + head["fc_bias"]  # [B, T, D]
    layer = LayerWeights(**head["layer"])
    cos, sin = rope_tables(hcfg, positions, x.dtype)
    if kv is None:
        b, t = tokens.shape
        if meta is None:
            full = jnp.full((b,), t, jnp.int32)
            meta = AttentionMeta(page_table=jnp.zeros((b, 1), jnp.int32), kv_lens=full, q_lens=full,
                                 contiguous=True)
        k_pages = v_pages = None
    else:
        k_pages, v_pages = kv.k[0], kv.v[0]
    with jax.named_scope("eagle"):
        x, k_pages, v_pages = decoder_layer(layer, hcfg, x, cos, sin, k_pages, v_pages, meta, backend,
                                            hcfg.layer_window(0))
    return x, (None if kv is None else KVCache(k=[k_pages], v=[v_pages]))


# ----------------------------------------------------------------------------- Medusa

def init_medusa(d: int, num_heads: int, inner: int, key: jax.Array, std: float = 0.02) -> dict:
    """K residual blocks h + W2 silu(W1 rms_norm(h)); W2 starts at zero, so every head starts
    as the target's own LM head (Medusa's initialization)."""
    return {"norm": jnp.ones((num_heads, d), jnp.float32),
            "w1": std * jax.random.normal(key, (num_heads, d, inner), jnp.float32),
            "w2": jnp.zeros((num_heads, inner, d), jnp.float32)}


def medusa_features(head: dict, hidden: jax.Array, eps: float) -> jax.Array:
    """hidden [..., D] -> every head's residual output [..., K, D]."""
    h = hidden[..., None, :]  # [..., 1, D]
    hn = rms_norm(h, head["norm"], eps)  # [..., K, D]
    inner = jax.nn.silu(jnp.einsum("...kd,kdr->...kr", hn, head["w1"].astype(hn.dtype)))  # [..., K, R]
    return h + jnp.einsum("...kr,krd->...kd", inner, head["w2"].astype(hn.dtype))


def medusa_logits(head: dict, target: Weights, hidden: jax.Array, target_cfg: ModelConfig) -> jax.Array:
    """hidden [..., D] at position t -> logits [..., K, V]; head i is the distribution of x_{t+i+2}."""
    return head_logits(head, target, medusa_features(head, hidden, target_cfg.rms_norm_eps), target_cfg)


def head_logits(head: dict, target: Weights, hidden: jax.Array, target_cfg: ModelConfig) -> jax.Array:
    """A head's draft logits [..., V] from predicted features [..., D]: the target's final norm and
    LM head, or, when `with_draft_vocab` gave the head a reduced vocabulary, only its rows
    (the other tokens -inf)."""
    if "draft_ids" not in head:
        return lm_logits(target, hidden, target_cfg)
    x = final_norm(target, hidden, target_cfg)
    sub = dense_dot(x, head["draft_head"])  # [..., N] float32
    if target.lm_head_bias is not None:
        sub = sub + target.lm_head_bias[head["draft_ids"]].astype(jnp.float32)
    sub = finish_logits(sub, target_cfg)
    full = jnp.full(sub.shape[:-1] + (target.embed.shape[0],), -jnp.inf, jnp.float32)
    return full.at[..., head["draft_ids"]].set(sub)


def with_draft_vocab(head: dict, target: Weights, target_cfg: ModelConfig, counts: np.ndarray, size: int,
                     layout: str = "in_out") -> dict:
    """The head's params plus its reduced draft vocabulary: the `size` most frequent tokens by
    `counts` [V] (ties: lower id first) and their LM-head rows as a [D, N] projection."""
    if not 1 <= size <= target_cfg.vocab_size:
        raise ValueError(f"draft_vocab_size={size!r} must be in [1, {target_cfg.vocab_size}] (the target's vocab)")
    ids = np.sort(np.argsort(-np.asarray(counts), kind="stable")[:size]).astype(np.int32)
    lm = target.lm_head
    if target_cfg.tie_word_embeddings or lm is None:
        rows = jnp.asarray(target.embed)[ids].T  # [D, N]
    else:
        dense = lm.dense() if hasattr(lm, "dense") else lm  # a TransposedWeight / PanelWeight layout
        if not isinstance(dense, jax.Array):
            raise ValueError(f"draft_vocab_size needs a float LM head; this target's is a {type(lm).__name__}")
        rows = dense[:, ids]
    return {**head, "draft_ids": jnp.asarray(ids), "draft_head": layout_projection(rows, layout)}


def load_token_counts(path: str | Path, vocab_size: int) -> np.ndarray:
    """token_counts.npy of a head directory ([V] counts of its training data's tokens)."""
    f = Path(path) / "token_counts.npy"
    if not f.is_file():
        raise ValueError(f"draft_vocab_size: the head at {str(path)!r} has no token_counts.npy (write it with "
                         "experiments/train_spec_heads.py --head <method> --token-counts-only)")
    counts = np.load(f)
    if counts.shape != (vocab_size,):
        raise ValueError(f"{str(f)!r} holds {counts.shape} counts; the target has vocab_size={vocab_size}")
    return counts


def medusa_num_heads(head: dict) -> int:
    return head["w1"].shape[0]


# ----------------------------------------------------------------------------- I/O

def save_head(path: str | Path, method: str, params: dict, target: ModelConfig, sizes: dict,
              recipe: dict | None = None, dtype=jnp.bfloat16) -> Path:
    """Write head_config.json and the orbax checkpoint params/ (stored in `dtype`)."""
    import orbax.checkpoint as ocp
    if method not in HEAD_METHODS:
        raise ValueError(f"method={method!r}; heads exist for {HEAD_METHODS}")
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "sizes": sizes, "dtype": jnp.dtype(dtype).name,
            "target": {k: getattr(target, k) for k in _TARGET_KEYS}, "recipe": recipe or {}}
    (path / "head_config.json").write_text(json.dumps(meta, indent=1) + "\n")
    stored = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", stored, force=True)
    return path


def load_head(path: str | Path, target: ModelConfig, dtype=jnp.float32) -> tuple[dict, dict]:
    """(head_config dict, params in dtype) of a head directory, checked against the target."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if not (path / "head_config.json").is_file() or not (path / "params").exists():
        raise ValueError(f"speculative head {str(path)!r}: expected head_config.json and params/ there")
    meta = json.loads((path / "head_config.json").read_text())
    mismatch = {k: (v, getattr(target, k)) for k, v in meta["target"].items() if getattr(target, k) != v}
    if mismatch:
        detail = ", ".join(f"{k}={a} (target has {b})" for k, (a, b) in mismatch.items())
        raise ValueError(f"speculative head {str(path)!r} was trained for another target: {detail}")
    with ocp.StandardCheckpointer() as ckpt:
        m = ckpt.metadata(path / "params")
        tree = m.item_metadata.tree if hasattr(m, "item_metadata") else m
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        params = ckpt.restore(path / "params", abstract)
    return meta, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
