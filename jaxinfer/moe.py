"""Sparse mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): routing, and three exact ways to
run the experts.

Legend: M tokens (batch and time flattened), D model dim, E experts, k experts per token,
A = M k assignments, F an expert's width.

Routing (Shazeer et al. 2017, as Mixtral and Qwen run it): p = softmax(x . router) in float32;
each token goes to the k experts of highest p, weighted by their p, renormalized to sum 1 when
`norm_topk_prob`. The layer's output is sum_j w_j expert_j(x), each expert a gated MLP.

The implementations give the same result and differ in what they read and compute:
- "dense": every expert on every token (a matmul batched over experts), combined by the routing
  weights (0 where an expert was not chosen): every weight read, E/k times the needed FLOPs, no
  data-dependent control flow.
- "skip": one expert at a time on every token, each under `lax.cond` on whether any token chose
  it, so an expert no token chose is never read. Decode on CPU is bound by reading weights, and a
  step of a few tokens uses a few experts: this reads only those.
- "grouped": assignments sorted by expert; each expert runs on its own run of rows, in chunks of
  GROUP_CHUNK rows (a loop of as many trips as the run needs, none for an unchosen expert): about
  k/E of dense's FLOPs, for prefill and large batches.

`ModelConfig.moe_impl` (`LLM(moe_impl=...)`) names one, or "auto": `choose_impl` picks per traced
shape, from `experiments/moe_cost.py`'s measurements on CPU.

Quantized experts (`wquant.quantize_weights`) are a stacked `QuantWeight` ([E, ...] arrays, each
expert with its own scales): "skip" and "grouped" multiply expert j's codes (`wquant.quantized_matmul`,
float32, like every quantized product), "dense" dequantizes them all first. While GPTQ / AWQ
calibrate, an `ExpertsObserver` stands in for the experts and the forward runs eagerly, each expert
on exactly its own rows (`_observed`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.layers import dense_dot, gated_activation
from jaxinfer.wquant import (
    TIED_ROWS,
    ExpertsObserver,
    InputObserver,
    QuantWeight,
    quantized_matmul,
    take_expert,
)

GROUP_CHUNK = 64  # rows of one product in "grouped"
# Quantized experts: products of up to this many rows tie the codes to x (`wquant.quantized_matmul`).
# An expert runs under lax.cond, so an untied product dequantizes the expert's matrix every step
# (a dense model's is hoisted out of the decode loop): int4 ties up to 4 rows here, not 1
# (moe_cost_quant.md, one MoE MLP under "skip", vs float32 experts: 2 rows tied 0.67x, untied 0.36x;
# 4 rows 0.59x vs 0.43x; 8 rows 0.49x vs 0.52x); the other formats' limits measured the same as dense
# models' (int8 tied 3.6x / 2.2x / 1.4x at 1 / 2 / 4 rows, even at 8, untied better at 16; fp8 and
# nvfp4 tied 0.12x and worse from 2 rows, untied 0.34-0.67x).
EXPERT_TIED_ROWS = {**TIED_ROWS, "int4": 4}


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [M, D], router [D, E] -> (weights [M, k] float32, experts [M, k] int32)."""
    logits = jnp.dot(x, router, preferred_element_type=jnp.float32)  # [M, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [M, k]
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def choose_impl(num_tokens: int, cfg: ModelConfig, backend: str | None = None) -> str:
    """On CPU, "skip" while the experts average fewer than 16 rows of the step (its assignments
    over the experts), else "grouped" (moe_cost.md: skip is faster at 4 and 8 rows per expert,
    grouped 1.3-1.4x at 16 and 32, 1.8-2.2x at 64 and 128); off CPU "dense", whose batched matmul has no
    data-dependent control flow (a `lax.cond` or a loop trip costs XLA:GPU a host round trip; not
    measured here)."""
    if (backend or jax.default_backend()) != "cpu":
        return "dense"
    return "skip" if num_tokens * cfg.num_experts_per_tok < 16 * cfg.num_experts else "grouped"


def _expert(x: jax.Array, w_gate_up, w_down, act: str) -> jax.Array:
    """One gated-MLP expert: x [M, D], w_gate_up [D, 2F], w_down [F, D] -> [M, D] float32. A bf16
    row alone runs as two (`dense_dot`'s `one_row_padded`: batch-1 "skip" 2.26 -> 1.08 ms, 8 experts of
    1024, hidden 512)."""
    h = gated_activation(_dot(x, w_gate_up).astype(x.dtype), act)
    return _dot(h, w_down)


def _dot(x: jax.Array, w) -> jax.Array:
    """x @ one expert's weight, float32: a dense array, a QuantWeight or (calibration) an InputObserver."""
    if isinstance(w, QuantWeight):  # float32 in and out, as the dense product's result
        return quantized_matmul(x.astype(jnp.float32), w, EXPERT_TIED_ROWS)
    if isinstance(w, InputObserver):
        w.observe(x)
        w = w.w
    return dense_dot(x, w)


def experts_forward(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                    w_down: jax.Array, cfg: ModelConfig, impl: str) -> jax.Array:
    """sum_j weights[:, j] expert_{experts[:, j]}(x): x [M, D], weights / experts [M, k],
    w_gate_up [E, D, 2F], w_down [E, F, D] (arrays, stacked QuantWeights or ExpertsObservers) -> [M, D] float32."""
    m, d = x.shape
    e = cfg.num_experts
    act = cfg.hidden_act
    if isinstance(w_gate_up, ExpertsObserver) or isinstance(w_down, ExpertsObserver):
        return _observed(x, weights, experts, w_gate_up, w_down, act, e)
    if impl == "grouped":
        return _grouped(x, weights, experts, w_gate_up, w_down, act, e)
    combine = jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], experts].add(weights)  # [M, E]
    if impl == "dense":
        w_gate_up, w_down = (w.dense() if isinstance(w, QuantWeight) else w for w in (w_gate_up, w_down))
        xe = jnp.broadcast_to(x, (e, m, d))  # [E, M, D]: a batched matmul over experts, weights as stored
        gu = jnp.einsum("emd,edf->emf", xe, w_gate_up, preferred_element_type=jnp.float32).astype(x.dtype)
        y = jnp.einsum("emf,efd->emd", gated_activation(gu, act), w_down, preferred_element_type=jnp.float32)
        return jnp.einsum("emd,me->md", y, combine)
    if impl == "skip":
        used = jnp.zeros((e,), bool).at[experts.reshape(-1)].set(True)  # [E]
        out = jnp.zeros((m, d), jnp.float32)
        for i in range(e):
            def run(o, i=i):
                y = _expert(x, take_expert(w_gate_up, i), take_expert(w_down, i), act)  # sliced in the branch
                return o + combine[:, i:i + 1] * y
            out = jax.lax.cond(used[i], run, lambda o: o, out)
        return out
    raise ValueError(f"impl={impl!r} is not one of dense, skip, grouped")


def _grouped(x, weights, experts, w_gate_up, w_down, act: str, e: int, chunk: int = GROUP_CHUNK) -> jax.Array:
    """Experts on the tokens that chose them: assignments sorted by expert, each expert's run taken
    in chunks of `chunk` rows (its last one masked), in a loop of as many trips as its run needs."""
    m, d = x.shape
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [A], assignment a = token a // k
    a = flat.shape[0]
    chunk = min(chunk, a)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    token = order // k  # [A]
    sizes = jnp.bincount(flat, length=e)  # [E] rows per expert
    starts = jnp.cumsum(sizes) - sizes  # [E] first row of each expert's run
    xs = jnp.zeros((a + chunk, d), x.dtype).at[:a].set(x[token])  # [A + C, D]: every chunk lies in bounds
    ys = jnp.zeros((a + chunk, d), jnp.float32)
    rows = jnp.arange(chunk)
    for i in range(e):
        def trip(j, ys, i=i):
            lo = starts[i] + j * chunk
            rows_in = jax.lax.dynamic_slice_in_dim(xs, lo, chunk)
            y = _expert(rows_in, take_expert(w_gate_up, i), take_expert(w_down, i), act)  # [C, D]
            mine = (j * chunk + rows < sizes[i])[:, None]  # the chunk's rows past the run are the next expert's
            return jax.lax.dynamic_update_slice_in_dim(
                ys, jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(ys, lo, chunk)), lo, 0)
        ys = jax.lax.fori_loop(0, (sizes[i] + chunk - 1) // chunk, trip, ys)
    return jnp.zeros((m, d), jnp.float32).at[token].add(ys[:a] * weights.reshape(-1)[order][:, None])


def _observed(x, weights, experts, w_gate_up, w_down, act: str, e: int) -> jax.Array:
    """Eagerly (GPTQ / AWQ calibration), each expert on exactly the rows routed to it, so that an
    expert's observer records its own inputs; with `ExpertsObserver.all_tokens` the observed
    experts also see every other row, whose outputs are not used."""
    chosen = np.asarray(experts)  # [M, k]
    out = jnp.zeros(x.shape, jnp.float32)
    every = any(isinstance(w, ExpertsObserver) and w.all_tokens for w in (w_gate_up, w_down))
    for j in range(e):
        token, slot = np.nonzero(chosen == j)
        if not (every or len(token)):
            continue
        gate_up, down = take_expert(w_gate_up, j), take_expert(w_down, j)
        y = _expert(x, gate_up, down, act)[token] if every else _expert(x[token], gate_up, down, act)
        out = out.at[token].add(weights[token, slot][:, None] * y)
    return out


def sparse_mlp(x: jax.Array, router: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, cfg: ModelConfig,
               impl: str | None = None) -> jax.Array:
    """A MoE layer's routed experts on x [..., D] -> [..., D] in x's dtype (impl: dense, skip or
    grouped; None: cfg.moe_impl, whose "auto" is `choose_impl` for this many tokens)."""
    flat = x.reshape(-1, x.shape[-1])  # [M, D]
    weights, experts = route(flat, router, cfg)
    impl = impl or cfg.moe_impl
    if impl == "auto":
        impl = choose_impl(flat.shape[0], cfg)
    return experts_forward(flat, weights, experts, w_gate_up, w_down, cfg, impl).astype(x.dtype).reshape(x.shape)
