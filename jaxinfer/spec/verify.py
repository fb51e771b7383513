"""Speculative verification: which drafted tokens to keep, and the token that follows them.

Legend: B rows, k drafted tokens per row, V vocab.

Lossless speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language
Model Decoding with Speculative Sampling"). The drafter proposed d_1..d_k, drawing d_i
from q_i; one target forward over [last, d_1..d_k] gave p_1..p_{k+1}, where p_i is the
target's distribution of the token that d_i would become. Then:

- accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), left to right, while accepted;
- at the first rejection (position n + 1), emit a token drawn from norm(max(0, p - q)) at
  that position instead;
- if all k are accepted, emit a bonus token drawn from p_{k+1}.

Every emitted token is then distributed exactly as plain sampling from p would have
drawn it. Greedy rows accept while d_i == argmax p_i and emit argmax p_{n+1}. Drafts
without probabilities (n-gram lookup) have a one-hot q: accept d_i with probability
p_i(d_i); on rejection draw from p_i with d_i removed.

p and q are shaped the same way (stop tokens blocked before min_tokens, then penalties and
logit biases, then temperature / min-p / top-k / top-p via `sampling.filter_logits`): the
shaped p is exactly the distribution plain decoding samples from, which is what makes it
lossless. Penalties depend on the tokens generated so far, so p_i counts d_1..d_{i-1} as
generated: p_i only matters when they were all accepted, and then that is the output
plain decoding would have had. Drafters that sample penalize q_i the same way (counting
their own d_1..d_{i-1}), so q stays close to p.

Randomness: every draw is keyed by (request key, index of the output token it decides,
stream), so a seeded request is reproducible and independent of its batch-mates. Streams
keep the accept uniforms and the drafter's own draws apart; the residual / bonus draw uses
the key plain sampling draws that token with (`sampling.row_keys`), and where it is a draw
from p itself (no draft there, or the bonus) it draws from the same shaped logits as
`sampling.sample`. A round in which a row proposes nothing therefore emits the token a plain
step would: the engine's n-gram steps, which run plainly when no row has a match, then no
longer change a seeded row's output with its batch-mates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling import (
    Penalties,
    RowLimits,
    SamplingTensors,
    block_stop_tokens,
    filter_logits,
    greedy_argmax,
    row_keys,
)

# Stream ids folded into a row's key after the output-token index (the residual / bonus draw
# takes the plain sampler's key, `sampling.row_keys`: no stream folded in).
STREAM_ACCEPT, STREAM_DRAFT = 1, 3


def stream_keys(st: SamplingTensors, counter: jax.Array, stream: int) -> jax.Array:
    """Keys [..., 2] uint32 for output-token indices counter [B, ...] of each row in one stream."""
    def one(key, c):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), c), stream)
        return jax.random.key_data(k)

    flat = counter.reshape(counter.shape[0], int(np.prod(counter.shape[1:])))  # [B, n]
    out = jax.vmap(lambda key, cs: jax.vmap(lambda c: one(key, c))(cs))(st.keys, flat)  # [B, n, 2]
    return out.reshape(counter.shape + (2,))


def shape_logits(logits: jax.Array, st: SamplingTensors, limits: RowLimits, counter: jax.Array,
                 greedy_only: bool = False, pen: Penalties | None = None,
                 drafted: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw logits [B, n, V] of output-token indices counter [B, n] -> (blocked, penalized, shaped),
    each [B, n, V].

    blocked: stop tokens masked before min_tokens (the logits logprobs are reported from);
    penalized: blocked, then pen's penalties and biases, position i counting drafted[:, :i]
    [B, n-1] as generated (the logits greedy decoding takes its argmax from); shaped:
    penalized, then filtered (softmax = the distribution a sampled row draws from).
    All-greedy batches skip the filter (greedy_only: not even compiled).
    """
    blocked = jax.vmap(lambda l, c: block_stop_tokens(l, limits, c), in_axes=(1, 1), out_axes=1)(
        logits.astype(jnp.float32), counter)
    penalized = blocked
    if pen is not None:
        if drafted is None:
            drafted = jnp.full(counter.shape[:1] + (counter.shape[1] - 1,), -1, jnp.int32)
        penalized = pen.apply(blocked, drafted)
    if greedy_only:
        return blocked, penalized, penalized

    def filtered(x):
        return jax.vmap(lambda l: filter_logits(l, st), in_axes=1, out_axes=1)(x)

    shaped = jax.lax.cond(jnp.all(st.temperature == 0), lambda x: x, filtered, penalized)
    return blocked, penalized, shaped


def draft_sample(logits: jax.Array, st: SamplingTensors, limits: RowLimits, counter: jax.Array,
                 greedy_only: bool = False, pen: Penalties | None = None) -> tuple[jax.Array, jax.Array]:
    """A drafter's token for output index counter [B] from its logits [B, V].

    Greedy rows take the argmax of the penalized logits; sampled rows draw from
    q = softmax(shaped). pen: the rows' penalties, counting the output and the earlier drafts.
    Returns (token [B] int32, shaped logits [B, V]: log q up to a constant). greedy_only:
    every row is greedy (a static promise; the sampling code is not compiled).
    """
    _, penalized, shaped = shape_logits(logits[:, None], st, limits, counter[:, None], greedy_only, pen)
    shaped = shaped[:, 0]  # [B, V]
    greedy = greedy_argmax(penalized[:, 0])
    if greedy_only:
        return greedy, shaped

    def draw(_):
        keys = stream_keys(st, counter, STREAM_DRAFT)  # [B, 2]
        drawn = jax.vmap(lambda k, l: jax.random.categorical(jax.random.wrap_key_data(k), l))(
            keys, shaped).astype(jnp.int32)
        return jnp.where(st.temperature > 0, drawn, greedy)

    tok = jax.lax.cond(jnp.all(st.temperature == 0), lambda _: greedy, draw, None)
    return tok, shaped


def accept_greedy(p_logits: jax.Array, draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification. p_logits [B, k+1, V], draft [B, k] -> (n_acc [B], next [B]).

    Accept while d_i == argmax p_i; the next token is argmax p_{n_acc + 1} (the target's
    correction, or the bonus token when all k matched).
    """
    target = greedy_argmax(p_logits)  # [B, k+1]
    match = draft == target[:, :-1]  # [B, k]
    n_acc = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)  # leading run of matches
    nxt = jnp.take_along_axis(target, n_acc[:, None], axis=1)[:, 0]
    return n_acc.astype(jnp.int32), nxt


def accept_sampled(p: jax.Array, q: jax.Array | None, draft: jax.Array, u: jax.Array,
                   residual_keys: jax.Array, logits: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling on probabilities. Pure: every random number is an argument.

    p [B, k+1, V] target probabilities; q [B, k, V] draft probabilities, or None for a
    one-hot q (deterministic drafts); draft [B, k]; u [B, k] uniforms in [0, 1);
    residual_keys [B, k+1, 2]: the key of the residual / bonus draw at each position. A draft
    token -1 means no proposal: it is rejected and the residual there is p itself.
    logits [B, k+1, V] (optional, p = softmax(logits)): where the residual is p itself, the
    draw is categorical(logits), the very draw `sampling.sample` makes from them.
    Returns (n_acc [B] accepted drafts, next [B] the token emitted after them).
    """
    b, k = draft.shape
    hot = jax.nn.one_hot(draft, p.shape[-1], dtype=p.dtype)  # [B, k, V]; all zero for "no draft" (-1)
    p_d = jnp.sum(p[:, :k] * hot, axis=-1)  # [B, k] p_i(d_i)
    if q is None:
        q_d = jnp.ones_like(p_d)
        q_full = hot
    else:
        q_d = jnp.sum(q * hot, axis=-1)  # [B, k] q_i(d_i)
        q_full = q
    # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)):  u < p / q  <=>  u q < p.
    accept = u * q_d < p_d  # [B, k]
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)  # [B]
    # At the first rejection draw from norm(max(0, p - q)); after k acceptances q_{k+1} = 0,
    # so the same line draws the bonus token from p_{k+1}.
    q_pad = jnp.concatenate([q_full, jnp.zeros_like(q_full[:, :1])], axis=1)  # [B, k+1, V]
    p_n = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
    q_n = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p == q exactly leaves nothing; then rejection had probability 0 and p itself is the law.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    log_r = jnp.log(residual)
    if logits is not None:  # no draft mass here (no proposal, or the bonus): the residual is p
        logits_n = jnp.take_along_axis(logits, n_acc[:, None, None], axis=1)[:, 0]
        log_r = jnp.where(jnp.any(q_n > 0, axis=-1, keepdims=True), log_r, logits_n)
    key_n = jnp.take_along_axis(residual_keys, n_acc[:, None, None], axis=1)[:, 0]  # [B, 2]
    nxt = jax.vmap(lambda kd, lr: jax.random.categorical(jax.random.wrap_key_data(kd), lr))(key_n, log_r)
    return n_acc.astype(jnp.int32), nxt.astype(jnp.int32)


def verify(target_logits: jax.Array, draft: jax.Array, draft_logits: jax.Array | None,
           st: SamplingTensors, limits: RowLimits, num_generated: jax.Array, greedy_only: bool = False,
           pen: Penalties | None = None):
    """Verify drafts of every row against one target forward.

    target_logits [B, k+1, V] raw; draft [B, k]; draft_logits [B, k, V] shaped (as
    returned by `draft_sample`) or None (one-hot q); num_generated [B]: output tokens
    so far, so position i decides output token num_generated + i. greedy_only: every row
    is greedy (static; the sampling path is not compiled). pen: penalties and biases, with
    the counts of the output before this round (None: no row has any).
    Returns (n_acc [B], next [B], blocked target logits [B, k+1, V] for logprobs).
    """
    b, k = draft.shape
    counter = num_generated[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [B, k+1]
    blocked, penalized, shaped = shape_logits(target_logits, st, limits, counter, greedy_only, pen, draft)
    n_greedy, next_greedy = accept_greedy(penalized, draft)
    if greedy_only:
        return n_greedy, next_greedy, blocked

    def sampled(_):
        p = jax.nn.softmax(shaped, axis=-1)  # [B, k+1, V]
        q = None if draft_logits is None else jax.nn.softmax(draft_logits, axis=-1)  # [B, k, V]
        u_keys = stream_keys(st, counter[:, :k], STREAM_ACCEPT)  # [B, k, 2]
        u = jax.vmap(jax.vmap(lambda kd: jax.random.uniform(jax.random.wrap_key_data(kd))))(u_keys)
        plain_keys = jax.vmap(lambda c: row_keys(st, c), in_axes=1, out_axes=1)(counter)  # [B, k+1, 2]
        n_s, next_s = accept_sampled(p, q, draft, u, plain_keys, shaped)
        is_greedy = st.temperature == 0
        return jnp.where(is_greedy, n_greedy, n_s), jnp.where(is_greedy, next_greedy, next_s)

    n_acc, nxt = jax.lax.cond(jnp.all(st.temperature == 0), lambda _: (n_greedy, next_greedy),
                              sampled, None)
    return n_acc, nxt, blocked
