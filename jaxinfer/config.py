"""ModelConfig: the static description of a Llama-family model.

Built from a Hugging Face ``config.json``. Frozen and hashable, so it can be a
static argument of jitted functions. Both config styles are read: the classic
``rope_theta`` / ``rope_scaling`` keys and the ``rope_parameters`` dict written by
transformers >= 5.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

MODEL_TYPES = {  # architecture -> HF model_type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Olmo2ForCausalLM": "olmo2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "PhiForCausalLM": "phi",
    "CohereForCausalLM": "cohere",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "SmolLM3ForCausalLM": "smollm3",
    "Cohere2ForCausalLM": "cohere2",
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
GEMMA = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
MOE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")  # sparse MoE MLPs
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
FUSED_QKV = ("Phi3ForCausalLM", "GPTNeoXForCausalLM")  # checkpoints with q/k/v in one module
FUSED_GATE_UP = ("Phi3ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM")  # and with gate/up in one
LLAMA3_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")  # of the MLP: act(gate) * up, or act(up) (gated_mlp=False)
LAYER_TYPES = ("full_attention", "sliding_attention")
# layers.rms_norm's orders of rounding; LayerNorm (StarCoder2), and without a shift (Cohere)
NORM_STYLES = ("llama", "gemma", "olmo2", "layernorm", "cohere")
MOE_IMPLS = ("auto", "dense", "skip", "grouped")  # how `moe.experts_forward` runs the experts


class ConfigError(ValueError):
    """A config.json that jaxinfer cannot serve."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` in HF terms); hashable."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn (Peng et al., YaRN): rotations bounding the interpolated / extrapolated bands, whether
    # their dims are rounded outward, and the factor cos and sin are multiplied by
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    # longrope (Phi-3, LongRoPE): per-frequency divisors of the base frequencies, one set for
    # contexts within original_max_position_embeddings (short) and one beyond it (long), and
    # which set this model rotates with. transformers picks per forward, by the longest position
    # it holds, so a sequence that grows past the original context keeps keys rotated with the
    # short set beside new ones rotated with the long set. A KV cache cannot re-rotate its keys,
    # so jaxinfer picks once, as vLLM does: the long set when the context the model is served
    # for (LLM's max_model_len; from config.json, max_position_embeddings) exceeds the original
    # context (`ModelConfig.with_context`). Either way cos and sin carry attention_factor.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    long: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model hyper-parameters. Field names follow HF where they exist."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama attention_bias=True also puts a bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None  # Mistral: keys older than this are masked
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE rotates the first rotary_dim dims of each head only
    gated_mlp: bool = True  # act(gate) * up; False (StarCoder2): act(up), w_gate_up holding up alone
    # GPT-NeoX (Pythia): wqkv's columns per head ([q_h, k_h, v_h] for each head h, as the checkpoint's
    # query_key_value holds them), and attention and MLP both reading the layer's input, their
    # outputs added to it together (use_parallel_residual)
    qkv_per_head: bool = False
    parallel_residual: bool = False
    # Phi-1.5 / Phi-2: one input LayerNorm that attention and MLP share (held as attn_norm and
    # mlp_norm, equal), and a bias on the LM head
    shared_input_norm: bool = False
    lm_head_bias: bool = False
    rope_interleaved: bool = False  # Cohere: RoPE turns dims (2i, 2i + 1) together, not (i, i + rotary_dim / 2)
    rope_layers: tuple[bool, ...] | None = None  # SmolLM3: whether each layer rotates q / k (None: all do)
    logit_scale: float = 1.0  # Cohere: logits times this
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # one of ACTIVATIONS (Gemma: gelu_pytorch_tanh)
    # RMSNorm's order of rounding (layers.NORM_STYLES): Gemma scales by (1 + weight) in float32,
    # OLMo 2 by the weight in float32, before rounding. Gemma multiplies embeddings by
    # sqrt(hidden_size), rounded to the weight dtype (as transformers does)
    norm_style: str = "llama"
    scale_embeddings: bool = False
    sandwich_norms: bool = False  # Gemma 2 / 3, OLMo 2: a norm after attention and after the MLP too
    input_norms: bool = True  # False (OLMo 2): attention and MLP read the residual stream unnormalized
    qk_norm_full: bool = False  # OLMo 2: q and k normalized over all heads at once, before the split
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim)
    # Granite's scalars (muP): embeddings times embedding_multiplier, each block's output times
    # residual_multiplier before it joins the residual stream, attention_multiplier as the
    # attention scale (None: from query_pre_attn_scalar / head_dim), logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # per layer, one of LAYER_TYPES (Gemma 2 / 3); None: sliding_window, if any, applies to every layer
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (never scaled)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2 / 3: the same on the logits
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; 0 experts: every MLP dense). A MoE layer's
    # router sends each token to the top num_experts_per_tok of num_experts SwiGLU experts (each
    # moe_intermediate_size wide) and sums their outputs weighted by the router's softmax
    # probabilities, renormalized over the chosen ones when norm_topk_prob. Qwen2-MoE adds a shared
    # expert every token goes through, scaled by sigmoid(x . shared_gate). dense_layers: layers
    # whose MLP is dense (intermediate_size wide): Qwen's mlp_only_layers and decoder_sparse_step
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    moe_impl: str = "auto"  # one of MOE_IMPLS (jaxinfer's choice, not the checkpoint's; LLM(moe_impl=...))

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if not (0 < self.partial_rotary_factor <= 1) or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor!r} must be in (0, 1] and leave an "
                              f"even number of rotated dims (head_dim={self.head_dim} gives {self.rotary_dim})")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")
        if self.qkv_per_head and self.num_kv_heads != self.num_heads:
            raise ConfigError(f"qkv_per_head (GPT-NeoX) needs num_kv_heads == num_heads, not {self.num_kv_heads} "
                              f"of {self.num_heads}")
        rs = self.rope_scaling
        if rs.rope_type == "longrope" and not (len(rs.short_factor) == len(rs.long_factor) == self.rotary_dim // 2):
            raise ConfigError(f"longrope short_factor / long_factor have {len(rs.short_factor)} / "
                              f"{len(rs.long_factor)} values; the rotated dims need {self.rotary_dim // 2} each")
        if self.norm_style not in NORM_STYLES:
            raise ConfigError(f"norm_style={self.norm_style!r} is not one of {', '.join(NORM_STYLES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ConfigError(f"layer_types={list(self.layer_types)!r} must name one of {', '.join(LAYER_TYPES)} "
                                  f"for each of the {self.num_layers} layers")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={self.moe_impl!r} is not one of {', '.join(MOE_IMPLS)}")
        if self.num_experts:
            if self.architecture not in MOE:
                raise ConfigError(f"num_experts={self.num_experts} needs a mixture-of-experts architecture "
                                  f"({', '.join(MOE)}), not {self.architecture}")
            if self.architecture == "MixtralForCausalLM" and (
                    not self.norm_topk_prob or self.dense_layers or self.shared_expert_intermediate_size):
                raise ConfigError("MixtralForCausalLM renormalizes its top-k probabilities (norm_topk_prob=True) "
                                  "and has no dense layers and no shared expert")
            if self.shared_expert_intermediate_size and self.architecture != "Qwen2MoeForCausalLM":
                raise ConfigError(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size}: only "
                                  f"Qwen2MoeForCausalLM has a shared expert, not {self.architecture}")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok!r} must be in "
                                  f"[1, num_experts={self.num_experts}]")
            if not (isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0):
                raise ConfigError(f"moe_intermediate_size={self.moe_intermediate_size!r} must be a positive integer")
            if self.mlp_bias or not self.gated_mlp:
                raise ConfigError("experts (num_experts > 0) are gated MLPs without biases (mlp_bias=False, gated_mlp=True)")
            if not set(self.dense_layers) <= set(range(self.num_layers)):
                raise ConfigError(f"dense_layers={list(self.dense_layers)!r} must be layer indices "
                                  f"in [0, {self.num_layers})")
        for name in ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                     "logit_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value!r} must be positive (or null)")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts."""
        return self.num_experts > 0 and i not in self.dense_layers

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i (None: it attends to the whole context)."""
        if self.layer_types is not None and self.layer_types[i] == "full_attention":
            return None
        return self.sliding_window

    def layer_type_names(self) -> list[str]:
        """Each layer's transformers layer type: "sliding_attention" where it has a window."""
        return ["full_attention" if self.layer_window(i) is None else "sliding_attention"
                for i in range(self.num_layers)]

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (the rest pass through), as transformers
        rounds it: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def fused_qkv(self) -> bool:
        """Whether the checkpoint stores q/k/v as one module (Phi-3's qkv_proj, GPT-NeoX's
        query_key_value), as our wqkv holds them."""
        return self.architecture in FUSED_QKV

    @property
    def fused_gate_up(self) -> bool:
        """Whether the checkpoint stores gate/up as one module (Phi-3's and GLM's gate_up_proj, gate rows
        first), as our w_gate_up holds them."""
        return self.architecture in FUSED_GATE_UP

    def with_context(self, max_model_len: int) -> ModelConfig:
        """This config served for contexts up to max_model_len: a longrope model rotates with its
        long factors when max_model_len exceeds original_max_position_embeddings, with its short
        ones otherwise (vLLM's rule; see RopeScaling). Other models are unchanged."""
        rs = self.rope_scaling
        if rs.rope_type != "longrope":
            return self
        long = max_model_len > rs.original_max_position_embeddings
        return self if long == rs.long else dataclasses.replace(self, rope_scaling=dataclasses.replace(rs, long=long))

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1: MHA, num_heads: MQA)."""
        return self.num_heads // self.num_kv_heads

    def mlp_params(self, i: int, active: bool = False) -> int:
        """Parameters of layer i's MLP projections: a dense MLP's, or a MoE layer's router, experts
        and shared expert (active: only the num_experts_per_tok experts one token goes through)."""
        d = self.hidden_size
        if not self.is_moe_layer(i):
            return (3 if self.gated_mlp else 2) * d * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        fs = self.shared_expert_intermediate_size
        return d * self.num_experts + experts * 3 * d * self.moe_intermediate_size + (3 * d * fs + d) * (fs > 0)

    def num_params(self) -> int:
        d, f, h, k, e = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = d * h * e + 2 * d * k * e + h * e * d
        attn += (h * e + 2 * k * e) * self.qkv_bias + d * self.o_bias
        attn += ((h + k) * e if self.qk_norm_full else 2 * e) * self.qk_norm
        input_norms = (1 if self.shared_input_norm else 2) * self.input_norms
        norms = (input_norms + 2 * self.sandwich_norms) * d * (2 if self.norm_style == "layernorm" else 1)
        per_layer = attn + ((2 if self.gated_mlp else 1) * f + d) * self.mlp_bias + norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.vocab_size * self.lm_head_bias
        final_norm = d * (2 if self.norm_style == "layernorm" else 1)
        return self.num_layers * per_layer + sum(map(self.mlp_params, range(self.num_layers))) + embed + final_norm

    def matmul_flops_per_token(self, lm_head: bool = True) -> float:
        """Forward FLOPs of one token's weight products: 2 x the projection parameters of every
        layer (a MoE layer's router, active experts and shared expert), plus the LM head's when the
        token's logits are computed (norms, RoPE, biases and the activation are left out: a few per
        mille here)."""
        d, h, k, e = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * (h + 2 * k) * e + h * e * d
        mlp = sum(self.mlp_params(i, active=True) for i in range(self.num_layers))
        return 2.0 * (self.num_layers * attn + mlp + lm_head * d * self.vocab_size)

    def attention_flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one token's attention over `context` keys (itself included; capped
        at the sliding window): q.k and p.v, 2 x 2 x head_dim per key and query head per layer."""
        keys = sum(context if w is None else min(context, w) for w in map(self.layer_window, range(self.num_layers)))
        return 4.0 * self.num_heads * self.head_dim * keys

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers needs to load this model."""
        model_type = MODEL_TYPES[self.architecture]
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope.update({k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k in LLAMA3_KEYS})
        elif self.rope_scaling.rope_type == "yarn":
            rope.update({k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k in YARN_KEYS})
        elif self.rope_scaling.rope_type == "longrope":
            rs = self.rope_scaling
            rope.update(short_factor=list(rs.short_factor), long_factor=list(rs.long_factor), factor=rs.factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings,
                        attention_factor=rs.attention_factor)
        if self.partial_rotary_factor != 1.0:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
        }
        if self.rope_scaling.rope_type != "default":
            out["rope_scaling"] = dict(rope)
        if model_type in ("llama", "granite", "qwen3", "qwen3_moe"):
            out["attention_bias"] = self.o_bias if model_type in ("llama", "granite") else self.qkv_bias
        if model_type in ("gemma", "gemma2", "gemma3_text", "olmo2", "olmoe"):
            out["attention_bias"] = self.qkv_bias
        if model_type in ("llama", "granite"):
            out["mlp_bias"] = self.mlp_bias
        if model_type == "starcoder2":
            out.update(norm_epsilon=self.rms_norm_eps, use_bias=self.mlp_bias, sliding_window=self.sliding_window)
        if model_type == "gpt_neox":
            out.update(layer_norm_eps=self.rms_norm_eps, attention_bias=self.qkv_bias,
                       partial_rotary_factor=self.partial_rotary_factor, rotary_pct=self.partial_rotary_factor,
                       rotary_emb_base=self.rope_theta, use_parallel_residual=self.parallel_residual)
        if model_type == "phi":
            out.update(layer_norm_eps=self.rms_norm_eps, partial_rotary_factor=self.partial_rotary_factor,
                       qk_layernorm=False)
        if model_type in ("phi3", "glm", "glm4", "smollm3", "cohere2"):
            out["pad_token_id"] = None  # their classes' defaults lie past a small vocab; inference never reads it
        if model_type in ("glm", "glm4"):
            out.update(partial_rotary_factor=self.partial_rotary_factor, attention_bias=self.qkv_bias)
        if model_type == "smollm3":
            out.update(no_rope_layers=[int(v) for v in (self.rope_layers or (True,) * self.num_layers)],
                       use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                       layer_types=self.layer_type_names(), attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        if model_type in ("cohere", "cohere2"):
            out.update(layer_norm_eps=self.rms_norm_eps, logit_scale=self.logit_scale, use_qk_norm=False,
                       attention_bias=self.qkv_bias)
        if model_type == "cohere2":  # its global layers do without RoPE: rope_layers follows the layer types
            out.update(sliding_window=self.sliding_window, layer_types=self.layer_type_names())
        if model_type == "granite":
            out.update(embedding_multiplier=self.embedding_multiplier, residual_multiplier=self.residual_multiplier,
                       attention_multiplier=self.attention_scale, logits_scaling=self.logits_scaling)
        if model_type in ("mistral", "mixtral"):
            out["sliding_window"] = self.sliding_window
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            out["use_sliding_window"] = False
        if model_type == "phi3":
            out.update(sliding_window=self.sliding_window, partial_rotary_factor=self.partial_rotary_factor,
                       original_max_position_embeddings=(self.rope_scaling.original_max_position_embeddings
                                                         if self.rope_scaling.rope_type == "longrope"
                                                         else self.max_position_embeddings))
        if model_type == "mixtral":  # its intermediate_size is the experts' width; renormalizes always
            out.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       intermediate_size=self.moe_intermediate_size)
        if model_type == "olmoe":  # likewise its intermediate_size
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob)
        if model_type in ("qwen2_moe", "qwen3_moe"):
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                       mlp_only_layers=list(self.dense_layers), decoder_sparse_step=1)
        if model_type == "qwen2_moe":
            out.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size, qkv_bias=self.qkv_bias)
        if model_type in ("gemma2", "gemma3_text"):  # spelled out: transformers' defaults differ from ours
            scalar = float(self.query_pre_attn_scalar or self.head_dim)  # its config class wants an int
            out.update(hidden_activation=self.hidden_act,
                       query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,
                       sliding_window=self.sliding_window, layer_types=self.layer_type_names(),
                       attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping)
        if model_type == "gemma3_text":  # RoPE per layer type (the flat keys are the older spelling)
            local = self.local_rope_theta if self.local_rope_theta is not None else self.rope_theta
            out["rope_parameters"] = {"full_attention": rope,
                                      "sliding_attention": {"rope_type": "default", "rope_theta": local}}
            out["rope_local_base_freq"] = local
            out["use_bidirectional_attention"] = False
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse an HF config dict; unsupported models raise ConfigError naming the value.
        Where a key is missing, transformers' default for the architecture applies."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if (archs[:1] or [model_type]) in (["Gemma3ForConditionalGeneration"], ["gemma3"]):
            return cls.from_hf_dict(gemma3_text_config(hf), source)
        by_type = {t: a for a, t in MODEL_TYPES.items()}
        arch = archs[0] if archs else by_type.get(model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture {arch or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        gemma = arch in GEMMA
        later_gemma = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
        olmo2 = arch == "Olmo2ForCausalLM"
        olmoe = arch == "OlmoeForCausalLM"  # OLMo's q / k norms over all heads, Llama's pre-norm layers
        starcoder2 = arch == "Starcoder2ForCausalLM"  # LayerNorms, a plain GELU MLP, biases everywhere (use_bias)
        neox = arch == "GPTNeoXForCausalLM"  # likewise, with q / k / v per head, a parallel residual, partial rotary
        phi = arch == "PhiForCausalLM"  # a parallel residual from one shared LayerNorm, partial rotary, LM head bias
        # likewise (a LayerNorm without shift), interleaved RoPE, logit scale; Cohere 2 (Command R7B,
        # Command A): sliding layers with RoPE, global ones without
        cohere = arch in ("CohereForCausalLM", "Cohere2ForCausalLM")
        glm = arch in ("GlmForCausalLM", "Glm4ForCausalLM")  # interleaved RoPE on half of each head, fused gate/up
        glm4 = arch == "Glm4ForCausalLM"  # and norms after attention and MLP (Gemma 2's sandwich)
        smollm3 = arch == "SmolLM3ForCausalLM"  # Llama's layers, every n-th without RoPE (NoPE)
        if cohere and hf.get("use_qk_norm"):
            raise ConfigError(f"{source}: use_qk_norm=True is not supported for {arch} (false only)")
        if phi and hf.get("qk_layernorm"):
            raise ConfigError(f"{source}: qk_layernorm=True is not supported for PhiForCausalLM (false only)")
        if olmoe and hf.get("clip_qkv") is not None:
            raise ConfigError(f"{source}: clip_qkv={hf['clip_qkv']!r} is not supported (null only)")
        if later_gemma:  # their MLPs read hidden_activation
            act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        else:
            act = hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma or starcoder2 else "gelu" if neox else
                                           "gelu_new" if phi else "silu")
            if act == "gelu_new":  # transformers' Python spelling of GELU's tanh approximation
                act = "gelu_pytorch_tanh"
            if gemma and act == "gelu":  # Gemma's legacy spelling, which transformers reads as the tanh form
                act = "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            layers = int(hf["num_hidden_layers"])
            inter = int(hf["intermediate_size"])
            vocab = int(hf["vocab_size"])
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None
        head_dim = hf.get("head_dim") or hidden // heads
        kv_heads = hf.get("num_key_value_heads") or heads

        rope_params = hf.get("rope_parameters") or {}
        default_theta = 1_000_000.0 if arch == "Gemma3ForCausalLM" else 10000.0
        local_theta = None
        if arch == "Gemma3ForCausalLM":  # RoPE per layer type: the full layers' may be scaled, the sliding ones' not
            local = rope_params.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: sliding_attention rope_type={local['rope_type']!r} is not supported; "
                                  f"supported: default")
            local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
            rope_params = rope_params.get("full_attention") or {}
        rope_scaling_d = hf.get("rope_scaling") or {}
        theta = rope_params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
        scaling_src = rope_scaling_d or rope_params
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) or "default"
        phi3 = arch == "Phi3ForCausalLM"
        if phi3 and rope_type in ("su", "yarn"):  # Phi-3's early spellings of longrope, as transformers reads them
            rope_type = "longrope"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling = RopeScaling()
        if rope_type == "linear":
            scaling = RopeScaling("linear", factor=float(scaling_src["factor"]))
        elif rope_type == "llama3":
            scaling = RopeScaling(
                "llama3",
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(scaling_src["original_max_position_embeddings"]),
            )
        elif rope_type == "yarn":  # missing keys as transformers fills them
            original = int(scaling_src.get("original_max_position_embeddings")
                           or hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))
            factor = scaling_src.get("factor")
            factor = float(factor) if factor is not None else hf.get("max_position_embeddings", 2048) / original
            scaling = RopeScaling(
                "yarn", factor=factor, original_max_position_embeddings=original,
                beta_fast=float(scaling_src.get("beta_fast") or 32), beta_slow=float(scaling_src.get("beta_slow") or 1),
                truncate=bool(scaling_src.get("truncate", True)),
                attention_factor=yarn_attention_factor(factor, scaling_src.get("attention_factor"),
                                                       scaling_src.get("mscale"), scaling_src.get("mscale_all_dim")))
        elif rope_type == "longrope":
            scaling = _longrope(hf, scaling_src, phi3)

        rope_layers = _smollm3_rope_layers(hf, layers) if smollm3 else None
        sliding_window, layer_types = None, None
        if arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "Starcoder2ForCausalLM"):
            sliding_window = hf.get("sliding_window")
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
                      "Qwen3MoeForCausalLM") and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=True is not supported for {arch}")
        elif arch == "Cohere2ForCausalLM":  # transformers' defaults: window 4096, every 4th layer global
            sliding_window = hf.get("sliding_window", 4096)
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 4)) else "full_attention"
                for i in range(layers)]
        elif smollm3 and hf.get("use_sliding_window") and hf.get("sliding_window"):
            sliding_window = hf["sliding_window"]  # on the NoPE layers, unless layer_types says otherwise
            layer_types = hf.get("layer_types") or [
                "full_attention" if use else "sliding_attention" for use in rope_layers]
        elif later_gemma:  # local (sliding) and global layers interleaved
            sliding_window = hf.get("sliding_window", 4096)
            layer_types = hf.get("layer_types")
            if layer_types is None:  # older configs give the period: every n-th layer is global
                n = 2 if arch == "Gemma2ForCausalLM" else int(hf.get("sliding_window_pattern", 6))
                layer_types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
            if hf.get("use_bidirectional_attention"):
                raise ConfigError(f"{source}: use_bidirectional_attention=True is not supported (causal only)")

        moe = _moe_fields(arch, hf, layers, inter) if arch in MOE else {}
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if starcoder2:
            attention_bias = bool(hf.get("use_bias", True))
        else:  # Phi's projections always have biases; GPT-NeoX's and GLM's q/k/v by default
            attention_bias = phi or bool(hf.get("attention_bias", neox or glm))
        qkv_bias = (arch == "Qwen2ForCausalLM" or attention_bias
                    or (arch == "Qwen2MoeForCausalLM" and bool(hf.get("qkv_bias", True))))
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("norm_epsilon", 1e-5) if starcoder2 else hf.get("layer_norm_eps", 1e-5)
                               if neox or phi or cohere else hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            # where transformers rotates part of each head: its config's default share (GPT-NeoX: rotary_pct)
            partial_rotary_factor=float(rope_params.get("partial_rotary_factor", hf.get(
                "rotary_pct" if neox else "partial_rotary_factor", 1.0 if phi3 else 0.25 if neox else 0.5))
                if phi3 or neox or phi or glm else 1.0),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma or cohere)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and (arch in ("LlamaForCausalLM", "GraniteForCausalLM") or gemma or olmo2 or olmoe
                                       or starcoder2 or neox or phi or cohere or smollm3),
            mlp_bias=attention_bias if starcoder2 else (neox or phi or bool(hf.get("mlp_bias", False))),
            gated_mlp=not (starcoder2 or neox or phi),
            qkv_per_head=neox,
            parallel_residual=phi or cohere or (neox and bool(hf.get("use_parallel_residual", True))),
            shared_input_norm=phi or cohere,
            rope_interleaved=cohere or glm,
            rope_layers=(tuple(t == "sliding_attention" for t in layer_types) if arch == "Cohere2ForCausalLM"
                         else rope_layers),
            logit_scale=float(hf.get("logit_scale", 0.0625)) if cohere else 1.0,
            lm_head_bias=phi,
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM") or olmo2 or olmoe,
            qk_norm_full=olmo2 or olmoe,
            input_norms=not olmo2,
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=act,
            norm_style=("gemma" if gemma else "olmo2" if olmo2 else "layernorm" if starcoder2 or neox or phi
                        else "cohere" if cohere else "llama"),
            scale_embeddings=gemma,
            sandwich_norms=later_gemma or olmo2 or glm4,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if later_gemma else None,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            local_rope_theta=local_theta,
            # transformers applies Gemma 3's attention soft-capping nowhere; Gemma 2's defaults are 50 and 30
            attn_logit_softcapping=(_optional_float(hf.get("attn_logit_softcapping", 50.0))
                                    if arch == "Gemma2ForCausalLM" else None),
            final_logit_softcapping=(_optional_float(hf.get("final_logit_softcapping",
                                                            30.0 if arch == "Gemma2ForCausalLM" else None))
                                     if later_gemma else None),
            **moe,
            **(_granite_fields(hf) if arch == "GraniteForCausalLM" else {}),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf_dict(hf, source=str(path))


# Gemma3TextConfig's defaults in transformers: the Hub's vision-language Gemma 3 configs (4B-27B)
# leave most of these out of text_config
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


def gemma3_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model of a vision-language Gemma 3 config (Gemma3ForConditionalGeneration) as
    a Gemma3ForCausalLM config: its text_config over transformers' defaults, with the top level's
    token ids (the Hub's configs put eos_token_id [1, 106] there). jaxinfer serves the text
    model; the vision tower's weights are not read, and an export writes the text model alone."""
    text = {**GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    for key in ("eos_token_id", "bos_token_id"):
        if hf.get(key) is not None:
            text[key] = hf[key]
    return {**text, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}


def yarn_attention_factor(factor: float, attention_factor=None, mscale=None, mscale_all_dim=None) -> float:
    """YaRN's multiplier of cos and sin: given, or 0.1 ln(factor) + 1 (DeepSeek's configs give
    mscale and mscale_all_dim, whose ratio of such terms it then is)."""
    if attention_factor is not None:
        return float(attention_factor)

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


# transformers' defaults where a MoE config leaves a key out: (experts, experts per token, expert width)
MOE_DEFAULTS = {"MixtralForCausalLM": (8, 2, None), "Qwen2MoeForCausalLM": (60, 4, 1408),
                "Qwen3MoeForCausalLM": (128, 8, 768), "OlmoeForCausalLM": (64, 8, None)}


def _moe_fields(arch: str, hf: dict[str, Any], num_layers: int, intermediate_size: int) -> dict[str, Any]:
    """ModelConfig's MoE fields from a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE config, as transformers
    reads it: Mixtral's and OLMoE's experts are intermediate_size wide, Mixtral's always renormalized; Qwen's layer i
    is dense when listed in mlp_only_layers or when (i + 1) is not a multiple of decoder_sparse_step."""
    experts, top_k, width = MOE_DEFAULTS[arch]
    experts = int(hf.get("num_experts", hf.get("num_local_experts", experts)) or 0)
    if not experts:
        return {}
    fields = {"num_experts": experts, "num_experts_per_tok": int(hf.get("num_experts_per_tok", top_k))}
    if arch == "MixtralForCausalLM":
        return {**fields, "moe_intermediate_size": intermediate_size}
    if arch == "OlmoeForCausalLM":
        return {**fields, "moe_intermediate_size": intermediate_size, "norm_topk_prob": bool(hf.get("norm_topk_prob"))}
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or ())
    fields.update(moe_intermediate_size=int(hf.get("moe_intermediate_size", width)),
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  dense_layers=tuple(i for i in range(num_layers) if i in only or (i + 1) % step))
    if arch == "Qwen2MoeForCausalLM":
        fields["shared_expert_intermediate_size"] = int(hf.get("shared_expert_intermediate_size", 5632))
    return fields


def _smollm3_rope_layers(hf: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """SmolLM3's no_rope_layers (1: the layer uses RoPE), or, left out, every no_rope_layer_interval-th
    layer without, as transformers fills it in."""
    given = hf.get("no_rope_layers")
    if given is None:
        interval = int(hf.get("no_rope_layer_interval", 4))
        given = [int((i + 1) % interval != 0) for i in range(num_layers)]
    return tuple(bool(v) for v in given)


def _granite_fields(hf: dict[str, Any]) -> dict[str, float]:
    """Granite's four scalars, transformers' defaults (1.0) where left out."""
    return {name: float(hf.get(name, 1.0)) for name in
            ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}


def _longrope(hf: dict[str, Any], src: dict[str, Any], phi3: bool) -> RopeScaling:
    """longrope's RopeScaling as transformers reads it: original_max_position_embeddings from the top
    level first (Phi-3 keeps it there; Phi3Config's default 4096), the factor from the two lengths
    unless given, attention_factor sqrt(1 + ln(factor) / ln(original)) unless given; the long
    set rotates when max_position_embeddings exceeds the original context (`with_context`)."""
    max_pos = int(hf.get("max_position_embeddings", 2048))
    original = int(hf.get("original_max_position_embeddings") or src.get("original_max_position_embeddings")
                   or (4096 if phi3 else max_pos))
    short, long_ = src.get("short_factor"), src.get("long_factor")
    if not (isinstance(short, list) and isinstance(long_, list)):
        raise ConfigError(f"rope_type='longrope' needs short_factor and long_factor lists (got {short!r}, {long_!r})")
    factor = float(src.get("factor") or max_pos / original)
    attention = src.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", factor=factor, original_max_position_embeddings=original,
                       attention_factor=float(attention), short_factor=tuple(map(float, short)),
                       long_factor=tuple(map(float, long_)), long=max_pos > original)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> list[float]:
    """Inverse RoPE frequencies [rotary_dim // 2], with the configured scaling.

    llama3 scaling (Llama 3.1 report): wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than
    original_max / high_freq_factor are kept, and the band between is interpolated.
    local: the sliding layers' frequencies where they have a base of their own (Gemma 3's
    `local_rope_theta`, never scaled); elsewhere the same as the others'.
    """
    dim = cfg.rotary_dim
    half = dim // 2
    if local and cfg.local_rope_theta is not None:
        return [1.0 / (cfg.local_rope_theta ** (2 * i / dim)) for i in range(half)]
    inv = [1.0 / (cfg.rope_theta ** (2 * i / dim)) for i in range(half)]
    s = cfg.rope_scaling
    if s.rope_type == "linear":
        return [f / s.factor for f in inv]
    if s.rope_type == "longrope":
        return [f / e for f, e in zip(inv, s.long_factor if s.long else s.short_factor)]
    if s.rope_type == "yarn":  # YaRN: interpolate the slow dims by factor, keep the fast ones, ramp between
        def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
            return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(cfg.rope_theta))
        low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(inv):
            keep = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: extrapolate (as trained), 0: interpolate
            out.append(f / s.factor * (1.0 - keep) + f * keep)
        return out
    if s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / s.factor)
            else:
                smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor)
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out
    return inv
