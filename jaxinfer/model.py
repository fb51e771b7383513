"""The Llama-family model as pure functions over a weights pytree.

Legend: B batch, T tokens, D model dim, V vocab, N query heads, K kv heads,
H head dim, F ffn dim, L layers.

Layers are a Python list (unrolled under jit), each with its own cache arrays:
scanning over stacked layers copies the per-layer cache every step (FACTS.md). Each
layer is a nested jit (`decoder_layer`), so equal layers are traced and lowered once.
Projections are fused ([D, (N + 2K) H] for q/k/v, [D, 2F] for gate/up) so each
block issues few, large matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import cpu_kernels, moe
from jaxinfer.config import ModelConfig, rope_inv_freq
from jaxinfer.kv.cache import AttentionMeta, KVCache, write_pages, write_slots
from jaxinfer.layers import (
    PanelWeight,
    TiedHead,
    TransposedWeight,
    activation,
    apply_rope,
    attention,
    cap_scores,
    dense_dot,
    gated_activation,
    matmul,
    norm,
    rms_norm,
    rope_cos_sin,
)
from jaxinfer.wquant import MODULES, QuantWeight


@struct.dataclass
class LayerWeights:
    wqkv: jax.Array  # [D, (N + 2K) H]
    wo: jax.Array  # [N H, D]
    w_gate_up: jax.Array | None = None  # [D, 2F]   (a MoE layer's: its shared expert, if any; [D, F]: up alone, gated_mlp=False)
    w_down: jax.Array | None = None  # [F, D]
    attn_norm: jax.Array | None = None  # [D]   (None: OLMo 2, no input norms)
    mlp_norm: jax.Array | None = None  # [D]
    attn_norm_bias: jax.Array | None = None  # [D]   LayerNorm's shift (StarCoder2)
    mlp_norm_bias: jax.Array | None = None  # [D]
    bqkv: jax.Array | None = None  # [(N + 2K) H]   Qwen2
    bo: jax.Array | None = None  # [D]
    q_norm: jax.Array | None = None  # [H]   Qwen3, Gemma 3 ([N H]: OLMo 2)
    k_norm: jax.Array | None = None  # [H]   ([K H]: OLMo 2)
    b_gate_up: jax.Array | None = None  # [2F]
    b_down: jax.Array | None = None  # [D]
    post_attn_norm: jax.Array | None = None  # [D]   Gemma 2 / 3 (sandwich norms)
    post_mlp_norm: jax.Array | None = None  # [D]
    router: jax.Array | None = None  # [D, E]   MoE layers (`jaxinfer.moe`)
    experts_gate_up: jax.Array | None = None  # [E, D, 2Fe]
    experts_down: jax.Array | None = None  # [E, Fe, D]
    shared_gate: jax.Array | None = None  # [D, 1]   Qwen2-MoE: the shared expert's sigmoid gate


@struct.dataclass
class Weights:
    embed: jax.Array  # [V, D]
    layers: list  # [L] LayerWeights
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V] (or a QuantWeight / TransposedWeight / TiedHead); None: tied to embed
    final_norm_bias: jax.Array | None = None  # [D]   LayerNorm's shift (StarCoder2)
    lm_head_bias: jax.Array | None = None  # [V]   Phi-2

    @property
    def dtype(self):
        return self.embed.dtype


def layer_shapes(cfg: ModelConfig, i: int = 0) -> dict[str, tuple[int, ...] | None]:
    """Shape of every LayerWeights field of layer i (None: field absent). A MoE layer's dense MLP
    fields hold its shared expert (Qwen2-MoE), if it has one."""
    d, f, n, k, h = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                     cfg.num_kv_heads, cfg.head_dim)
    qkv = (n + 2 * k) * h
    sparse = cfg.is_moe_layer(i)
    e, fe = cfg.num_experts, cfg.moe_intermediate_size
    if sparse:
        f = cfg.shared_expert_intermediate_size
    up = (2 if cfg.gated_mlp else 1) * f  # gate and up, or up alone
    norm_bias = (d,) if cfg.input_norms and cfg.norm_style == "layernorm" else None
    return {
        "wqkv": (d, qkv), "wo": (n * h, d), "w_gate_up": (d, up) if f else None, "w_down": (f, d) if f else None,
        "attn_norm": (d,) if cfg.input_norms else None,
        "mlp_norm": (d,) if cfg.input_norms else None,
        "attn_norm_bias": norm_bias, "mlp_norm_bias": norm_bias,
        "bqkv": (qkv,) if cfg.qkv_bias else None,
        "bo": (d,) if cfg.o_bias else None,
        "q_norm": ((n * h,) if cfg.qk_norm_full else (h,)) if cfg.qk_norm else None,
        "k_norm": ((k * h,) if cfg.qk_norm_full else (h,)) if cfg.qk_norm else None,
        "b_gate_up": (up,) if cfg.mlp_bias else None,
        "b_down": (d,) if cfg.mlp_bias else None,
        "post_attn_norm": (d,) if cfg.sandwich_norms else None,
        "post_mlp_norm": (d,) if cfg.sandwich_norms else None,
        "router": (d, e) if sparse else None,
        "experts_gate_up": (e, d, 2 * fe) if sparse else None,
        "experts_down": (e, fe, d) if sparse else None,
        "shared_gate": (d, 1) if sparse and f else None,
    }


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Weights:
    """Random weights (normal(0, std) matrices, unit norms, zero biases)."""
    norm_init = jnp.zeros if cfg.norm_style == "gemma" else jnp.ones  # Gemma's norms scale by 1 + weight
    shapes = [layer_shapes(cfg, i) for i in range(cfg.num_layers)]
    keys = iter(jax.random.split(key, cfg.num_layers * len(shapes[0]) + 2))

    def make(name, shape):
        k = next(keys)
        if name.startswith("b") or name.endswith("_bias"):
            return jnp.zeros(shape, dtype)
        if "norm" in name:
            return norm_init(shape, dtype)
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    layers = [LayerWeights(**{n: (None if s is None else make(n, s)) for n, s in layer.items()}) for layer in shapes]
    embed = (std * jax.random.normal(next(keys), (cfg.vocab_size, cfg.hidden_size))).astype(dtype)
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = (std * jax.random.normal(next(keys), (cfg.hidden_size, cfg.vocab_size))).astype(dtype)
    final_bias = jnp.zeros((cfg.hidden_size,), dtype) if cfg.norm_style == "layernorm" else None
    head_bias = jnp.zeros((cfg.vocab_size,), dtype) if cfg.lm_head_bias else None
    return Weights(embed=embed, layers=layers, final_norm=norm_init((cfg.hidden_size,), dtype), lm_head=lm_head,
                   final_norm_bias=final_bias, lm_head_bias=head_bias)


def cast_weights(weights: Weights, dtype) -> Weights:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), weights)


WEIGHT_LAYOUTS = ("auto", "in_out", "out_in", "native")


def runtime_layout(weights: Weights, layout: str = "auto") -> Weights:
    """The dense projections (and the LM head) held as `layout` says: "in_out" leaves the
    [Din, Dout] arrays; "out_in" makes them `TransposedWeight`s ([Dout, Din]); "native" hands them
    to jaxinfer's CPU kernels (`cpu_kernels`; an x86-64 CPU with AVX512-BF16, or AVX2 and FMA for
    float32, and a C++ compiler; ValueError otherwise): bfloat16 as `TransposedWeight(native=True)`
    (products of a few rows go to the bf16 kernel, a tied embedding is read in place as the LM
    head), float32 as
    `PanelWeight`s (every product goes to the f32 kernel; a tied embedding gets a packed copy as
    the head). "auto" is "native" on CPU where the kernels are available, else "out_in" for
    bfloat16 on CPU, and "in_out" otherwise (measurements at `TransposedWeight`, `PanelWeight` and
    in `cpu_kernels`). Quantized projections are unchanged. For float32 on CPU, "in_out" also
    gives tied embeddings a [D, V] copy as the LM head (`TiedHead`: multi-row steps contract it
    ~1.6x faster than the [V, D] embedding; bfloat16 gains nothing from it). `LLM` applies it
    after loading (and quantizing); `dense_layout` undoes it."""
    layout = resolve_layout(weights.dtype, layout)
    if layout == "in_out":
        if jax.default_backend() == "cpu" and weights.lm_head is None and weights.dtype == jnp.float32:
            return weights.replace(lm_head=TiedHead(jnp.array(weights.embed.T)))  # a [D, V] copy
        return weights
    weights = _map_projections(weights, lambda w: layout_projection(w, layout))
    if layout == "native" and weights.lm_head is None:
        head = (PanelWeight.pack(weights.embed.T, tied=True) if weights.dtype == jnp.float32
                else TransposedWeight(weights.embed, native=True, tied=True))
        weights = weights.replace(lm_head=head)
    return weights


def resolve_layout(dtype, layout: str = "auto") -> str:
    """`runtime_layout`'s layout for weights of this dtype, "auto" resolved; ValueError for "native"
    where the kernels cannot run it."""
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(dtype)
    if layout == "auto":
        return ("native" if cpu_kernels.chosen_by_default(dtype)
                else "out_in" if on_cpu and dtype == jnp.bfloat16 else "in_out")
    if layout == "native":
        if not (on_cpu and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))):
            raise ValueError(f"weight_layout='native' runs bfloat16 or float32 weights on CPU; these are "
                             f"{dtype} on {jax.default_backend()}")
        if not cpu_kernels.available(dtype):
            raise ValueError(f"weight_layout='native': {cpu_kernels.unavailable_reason(dtype)}")
    return layout


def layout_projection(w, layout: str):
    """One dense [Din, Dout] projection as a resolved layout holds it: "in_out" as it is, "out_in" a
    `TransposedWeight`, "native" a `PanelWeight` (float32) or a native `TransposedWeight`
    (bfloat16). Anything else (a quantized projection) is returned unchanged."""
    if not isinstance(w, jax.Array) or layout == "in_out":
        return w
    if layout == "native" and w.dtype == jnp.float32:
        return PanelWeight.pack(w)
    return TransposedWeight(w.T, native=layout == "native")


def dense_layout(weights: Weights) -> Weights:
    """Every `TransposedWeight` and `PanelWeight` back to its [Din, Dout] array, and a tied LM
    head's copy (`TiedHead`, a tied `PanelWeight`) or in-place `TransposedWeight` dropped (saving,
    exporting, quantizing)."""
    head = weights.lm_head
    if isinstance(head, TiedHead) or (isinstance(head, (TransposedWeight, PanelWeight)) and head.tied):
        weights = weights.replace(lm_head=None)
    return _map_projections(weights, lambda w: w.dense() if isinstance(w, (TransposedWeight, PanelWeight)) else w)


def loop_layout(weights: Weights) -> Weights:
    """Weights as a decode loop on CPU multiplies them: every `TransposedWeight`, and a tied LM
    head (the [V, D] embedding), as the left operand of products of three or more rows
    (`TransposedWeight.lhs`). The arrays are the same; only how the products are written changes.
    Applied by the static generator's and beam search's decode loops: without it their compiled
    programs held a second copy of those weights. bf16 generate_static of the bench_decode model:
    batch 8 1.15x, batch 32 1.06x; bf16 beam search on the embedded target: within noise (0.99-1.11x)."""
    if jax.default_backend() != "cpu":
        return weights
    weights = _map_projections(weights, lambda w: w.replace(lhs=True) if isinstance(w, TransposedWeight) else w)
    if weights.lm_head is None:
        weights = weights.replace(lm_head=TransposedWeight(weights.embed, lhs=True))
    return weights


def _map_projections(weights: Weights, fn) -> Weights:
    layers = [layer.replace(**{name: fn(getattr(layer, name)) for name in MODULES}) for layer in weights.layers]
    head = None if weights.lm_head is None else fn(weights.lm_head)
    return weights.replace(layers=layers, lm_head=head)


def lm_logits(weights: Weights, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm + LM head on pre-norm hidden states [..., D] -> float32 logits [..., V]
    (`finish_logits`: Granite's scaling, Gemma 2 / 3's soft cap)."""
    x = final_norm(weights, hidden, cfg)
    head = weights.lm_head
    if isinstance(head, QuantWeight):  # float32 logits, whatever the activation dtype
        logits = matmul(x.astype(jnp.float32), head)
    else:
        logits = dense_dot(x, TransposedWeight(weights.embed) if head is None else head)  # tied: the [V, D] embedding
    if weights.lm_head_bias is not None:  # Phi-2
        logits = logits + weights.lm_head_bias.astype(jnp.float32)
    return finish_logits(logits, cfg)


def final_norm(weights: Weights, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The final norm (RMSNorm in the model's style, or LayerNorm) of pre-norm hidden states."""
    return norm(hidden, weights.final_norm, weights.final_norm_bias, cfg.rms_norm_eps, cfg.norm_style)


def finish_logits(logits: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The LM head's float32 products as the model's logits: divided by Granite's logits_scaling,
    times Cohere's logit_scale, soft-capped by Gemma 2 / 3's final_logit_softcapping (each only where
    the model has it)."""
    if cfg.logits_scaling != 1.0:
        logits = logits / jnp.float32(cfg.logits_scaling)
    if cfg.logit_scale != 1.0:  # Cohere
        logits = logits * jnp.float32(cfg.logit_scale)
    return cap_scores(logits, cfg.final_logit_softcapping)


def embed_tokens(weights: Weights, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Token embeddings [..., D] of tokens [...]; Gemma multiplies them by sqrt(hidden_size),
    the factor rounded to the weight dtype first (as transformers does)."""
    x = weights.embed[tokens]
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    if cfg.embedding_multiplier != 1.0:  # Granite: a float32 product, rounded once (as torch's by a Python float)
        x = (x.astype(jnp.float32) * jnp.float32(cfg.embedding_multiplier)).astype(x.dtype)
    return x


def attention_block(layer: LayerWeights, cfg: ModelConfig, x: jax.Array, cos, sin,
                    k_pages, v_pages, meta: AttentionMeta, backend: str, window: int | None):
    """Attention (pre-norm, but for OLMo 2) with cache write (keys older than `window` masked; None: none).
    x [B, T, D] -> (delta [B, T, D], k_pages, v_pages)."""
    b, t, _ = x.shape
    n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hn = x if layer.attn_norm is None else norm(x, layer.attn_norm, layer.attn_norm_bias, cfg.rms_norm_eps,
                                                cfg.norm_style)
    with jax.named_scope("proj"):
        qkv = matmul(hn, layer.wqkv)  # [B, T, (N + 2K) H]
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv
    if cfg.qkv_per_head:  # GPT-NeoX: [q_h, k_h, v_h] per head -> [q; k; v]
        qkv = qkv.reshape(b, t, n, 3, h).swapaxes(2, 3).reshape(b, t, 3 * n * h)
    q, k, v = jnp.split(qkv, [n * h, (n + kh) * h], axis=-1)
    if cfg.qk_norm_full:  # OLMo 2: over all heads' dims at once
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps, cfg.norm_style)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps, cfg.norm_style)
    q = q.reshape(b, t, n, h)  # [B, T, N, H]
    k = k.reshape(b, t, kh, h)  # [B, T, K, H]
    v = v.reshape(b, t, kh, h)
    if layer.q_norm is not None and not cfg.qk_norm_full:  # per head (Qwen3, Gemma 3)
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps, cfg.norm_style)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps, cfg.norm_style)
    if cos is not None:  # None: a layer without RoPE (SmolLM3's NoPE layers)
        q, k = apply_rope(q, cos, sin, cfg.rope_interleaved), apply_rope(k, cos, sin, cfg.rope_interleaved)

    if k_pages is None:  # no cache (training, scoring): the new tokens are the whole context
        with jax.named_scope("attention"):
            out = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), meta, scale=cfg.attention_scale,
                            backend="xla", sliding_window=window, soft_cap=cfg.attn_logit_softcapping)
    else:
        with jax.named_scope("kv_write"):
            page, offset = write_slots(meta, t, k_pages.shape[2], k_pages.shape[0])
            k_pages = write_pages(k_pages, k, page, offset, meta)
            v_pages = write_pages(v_pages, v, page, offset, meta)
        with jax.named_scope("attention"):
            out = attention(q, k_pages, v_pages, meta, scale=cfg.attention_scale, backend=backend,
                            sliding_window=window, soft_cap=cfg.attn_logit_softcapping)  # [B, T, N, H]
    with jax.named_scope("proj"):
        out = matmul(out.reshape(b, t, n * h), layer.wo)
    if layer.bo is not None:
        out = out + layer.bo
    if layer.post_attn_norm is not None:
        out = rms_norm(out, layer.post_attn_norm, cfg.rms_norm_eps, cfg.norm_style)
    return out, k_pages, v_pages


def mlp_block(layer: LayerWeights, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Gated MLP (SwiGLU; GeGLU for Gemma), or a mixture of such experts (`jaxinfer.moe`, plus
    Qwen2-MoE's sigmoid-gated shared expert), pre-norm but for OLMo 2. x [B, T, D] -> delta [B, T, D]."""
    hn = x if layer.mlp_norm is None else norm(x, layer.mlp_norm, layer.mlp_norm_bias, cfg.rms_norm_eps, cfg.norm_style)
    if layer.router is None:
        out = dense_mlp(layer, cfg, hn)
    else:
        with jax.named_scope("experts"):
            out = moe.sparse_mlp(hn, layer.router, layer.experts_gate_up, layer.experts_down, cfg)
        if layer.shared_gate is not None:
            gate = jax.nn.sigmoid(matmul(hn, layer.shared_gate))  # [B, T, 1]
            out = out + gate * dense_mlp(layer, cfg, hn)
    if layer.post_mlp_norm is not None:
        out = rms_norm(out, layer.post_mlp_norm, cfg.rms_norm_eps, cfg.norm_style)
    return out


def dense_mlp(layer: LayerWeights, cfg: ModelConfig, hn: jax.Array) -> jax.Array:
    """The gated MLP of w_gate_up and w_down on normed hn [B, T, D] -> [B, T, D]."""
    with jax.named_scope("proj"):
        gu = matmul(hn, layer.w_gate_up)  # [B, T, 2F]
    if layer.b_gate_up is not None:
        gu = gu + layer.b_gate_up
    with jax.named_scope("proj"):
        act = gated_activation(gu, cfg.hidden_act) if cfg.gated_mlp else activation(gu, cfg.hidden_act)
        out = matmul(act, layer.w_down)
    if layer.b_down is not None:
        out = out + layer.b_down
    return out


def rope_tables(cfg: ModelConfig, positions: jax.Array, dtype, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """RoPE tables (cos, sin) [B, T, 1, rotary_dim / 2] for positions [B, T]: the config's frequencies
    (`rope_inv_freq`; local: Gemma 3's sliding layers') and YaRN's attention factor."""
    inv_freq = jnp.asarray(np.asarray(rope_inv_freq(cfg, local=local), np.float32))
    scaled = not (local and cfg.local_rope_theta is not None)  # the local base is never scaled
    return rope_cos_sin(positions, inv_freq, dtype, cfg.rope_scaling.attention_factor if scaled else 1.0)


def layer_rope(cfg: ModelConfig, positions: jax.Array, dtype) -> list[tuple[jax.Array, jax.Array]]:
    """Every layer's RoPE tables (`rope_tables`). The layers share one pair, except Gemma 3's
    sliding layers, which rotate with a base of their own, and SmolLM3's NoPE layers (None, None)."""
    tables = {False: rope_tables(cfg, positions, dtype)}
    if cfg.rope_layers is not None:  # SmolLM3: (None, None) for a layer that does not rotate
        return [tables[False] if use else (None, None) for use in cfg.rope_layers]
    if cfg.local_rope_theta is None:
        return [tables[False]] * cfg.num_layers
    tables[True] = rope_tables(cfg, positions, dtype, local=True)
    return [tables[cfg.layer_window(i) is not None] for i in range(cfg.num_layers)]


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "window"))
def decoder_layer(layer: LayerWeights, cfg: ModelConfig, x: jax.Array, cos, sin, k_pages, v_pages,
                  meta: AttentionMeta, backend: str, window: int | None):
    """One decoder layer: x [B, T, D] -> (x [B, T, D], k_pages, v_pages). window: its sliding
    window (`cfg.layer_window`).

    A nested jit, so that tracing a forward traces and lowers each distinct layer once: layers
    with the same weight types and shapes reuse the first one's jaxpr and MLIR function, and XLA
    inlines the calls before it optimizes, so the compiled program is the one the unrolled loop
    gave. Tracing plus lowering no longer grows with the depth of the model."""
    delta, k_pages, v_pages = attention_block(layer, cfg, x, cos, sin, k_pages, v_pages, meta, backend, window)
    if cfg.parallel_residual:  # GPT-NeoX: the MLP reads the layer's input too; (mlp + attention) + x as transformers
        return (residual_scaled(mlp_block(layer, cfg, x), cfg) + residual_scaled(delta, cfg)) + x, k_pages, v_pages
    x = x + residual_scaled(delta, cfg)
    return x + residual_scaled(mlp_block(layer, cfg, x), cfg), k_pages, v_pages


def residual_scaled(delta: jax.Array, cfg: ModelConfig) -> jax.Array:
    """A block's output as it joins the residual stream: times Granite's residual_multiplier (a
    float32 product rounded once, as torch multiplies by a Python float), else unchanged."""
    if cfg.residual_multiplier == 1.0:
        return delta
    return (delta.astype(jnp.float32) * jnp.float32(cfg.residual_multiplier)).astype(delta.dtype)


def forward(weights: Weights, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            kv: KVCache | None, meta: AttentionMeta | None, *, backend: str = "xla",
            logits_at: jax.Array | None = None, num_layers: int | None = None):
    """Run the model on tokens [B, T] at positions [B, T], writing their K/V into kv.

    logits_at: optional [B, M] indices into T; logits are computed only there
    (prefill needs the last position, not all T). num_layers: run only the first
    layers (self-speculative drafting); their caches are the only ones written.
    kv=None runs without a cache (training, scoring): causal attention over the
    tokens themselves; meta=None then means every row is all T tokens long.
    Returns (logits [B, T or M, V] float32, hidden [B, T, D] pre-final-norm, kv).
    """
    num_layers = cfg.num_layers if num_layers is None else num_layers
    b, t = tokens.shape
    if kv is None:
        kv = KVCache(k=[None] * cfg.num_layers, v=[None] * cfg.num_layers)
        if meta is None:
            full = jnp.full((b,), t, jnp.int32)
            meta = AttentionMeta(page_table=jnp.zeros((b, 1), jnp.int32), kv_lens=full, q_lens=full,
                                 contiguous=True)
    x = embed_tokens(weights, cfg, tokens)  # [B, T, D]
    rope = layer_rope(cfg, positions, x.dtype)
    new_k, new_v = list(kv.k), list(kv.v)
    for i in range(num_layers):
        cos, sin = rope[i]
        with jax.named_scope(f"layer{i}"):
            x, new_k[i], new_v[i] = decoder_layer(weights.layers[i], cfg, x, cos, sin, kv.k[i], kv.v[i], meta,
                                                  backend, cfg.layer_window(i))
    hidden = x
    if logits_at is not None:
        hidden_sel = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)  # [B, M, D]
    else:
        hidden_sel = hidden
    with jax.named_scope("lm_head"):
        logits = lm_logits(weights, hidden_sel, cfg)
    return logits, hidden, KVCache(k=new_k, v=new_v)
