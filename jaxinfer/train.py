"""Training library: loss, optimizer, jitted step, data, resumable checkpoints, progress.

Generic over what is trained: `Trainer` takes a loss function of (params, batch) and a
params pytree, so the default models (full Llama weights) and later EAGLE / Medusa heads
(small head pytrees, a frozen target inside the loss closure) share the optimizer,
checkpointing and progress parts.

Legend: B batch, T tokens, V vocab.

Resumption is bit-exact: the batch of step s is a pure function of (seed, s) (see
`TokenBatcher`), and a checkpoint holds every leaf of the train state (params, optimizer
state, step) as saved by orbax, so a run stopped at step k and resumed computes the same
floats as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.model import Weights, forward


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization and bookkeeping settings of one run."""

    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 200  # held-out loss every n steps (0: never)
    eval_batches: int = 4
    ckpt_every: int = 200  # orbax checkpoint every n steps (and at the end)
    keep_checkpoints: int = 2
    distill_weight: float = 0.0  # loss = (1 - w) CE(labels) + w KL(teacher || student)
    distill_temperature: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight={self.distill_weight} must be in [0, 1]")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


# ----------------------------------------------------------------------------- loss

def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy. logits [B, T, V] f32, targets [B, T] int, mask [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Mean KL(teacher || student) per token at a temperature (Hinton et al. 2015), times T^2."""
    t = temperature
    p_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    q_log = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)  # [B, T]
    return jnp.mean(kl) * t * t


def lm_loss_fn(cfg: ModelConfig, teacher: tuple[ModelConfig, Weights] | None = None,
               distill_weight: float = 0.0, temperature: float = 1.0) -> Callable:
    """loss(params, batch) -> (loss, aux) for a language model on batch [B, T + 1] tokens, or on
    (tokens [B, T + 1], weights [B, T + 1]): each target token's cross-entropy weighted.

    With a teacher, its logits on the same inputs are computed inside the step (no
    gradient) and mixed in as (1 - w) CE + w KL. aux: {"ce": cross-entropy}.
    """
    def loss(params: Weights, batch, teacher_params=None):
        batch, weights = batch if isinstance(batch, tuple) else (batch, None)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
        b, t = inputs.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits, _, _ = forward(params, cfg, inputs, positions, None, None)  # [B, T, V]
        ce = cross_entropy(logits, targets, None if weights is None else weights[:, 1:])
        if teacher is None or distill_weight == 0.0:
            return ce, {"ce": ce}
        t_cfg, _ = teacher
        t_logits, _, _ = forward(jax.lax.stop_gradient(teacher_params), t_cfg, inputs, positions, None, None)
        kl = distill_kl(logits, t_logits, temperature)
        return (1.0 - distill_weight) * ce + distill_weight * kl, {"ce": ce, "kl": kl}
    return loss


# ----------------------------------------------------------------------------- optimizer

def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to tc.lr, then cosine decay to tc.lr * tc.min_lr_ratio at tc.steps."""
    warmup = min(tc.warmup_steps, max(1, tc.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay on matrices only, not norms/biases)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted step(state, batch, *extra) -> (state, metrics); the state is donated.

    `extra` (e.g. frozen teacher params) is passed to loss_fn after the batch.
    """
    def step(state: TrainState, batch, *extra):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, *extra)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(loss_fn: Callable) -> Callable:
    """Jitted eval(params, batch, *extra) -> aux metrics (e.g. {"ce": ...})."""
    return jax.jit(lambda params, batch, *extra: loss_fn(params, batch, *extra)[1])


# ----------------------------------------------------------------------------- data

class TokenBatcher:
    """Batches of [B, T + 1] windows from a token stream, a pure function of (seed, step).

    Each epoch cuts the stream into non-overlapping windows of T + 1 tokens starting at
    an epoch-dependent offset, and visits them in an epoch-dependent permutation; the
    batch of step s holds the windows s*B .. s*B + B - 1 of that global order. Nothing is
    stateful, so resuming needs only the step number.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = np.asarray(tokens)
        self.b, self.w, self.seed = batch_size, seq_len + 1, seed
        if self.tokens.size < 2 * self.w:
            raise ValueError(f"token stream of {self.tokens.size} tokens is too short for "
                             f"windows of seq_len + 1 = {self.w}")
        self.per_epoch = (self.tokens.size - self.w) // self.w  # windows per epoch
        self._epoch, self._order, self._offset = -1, None, 0

    def _epoch_plan(self, epoch: int):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.w))
            self._order = rng.permutation(self.per_epoch)
            self._epoch = epoch
        return self._offset, self._order

    def batch(self, step: int) -> np.ndarray:
        """int32 [B, T + 1] of step `step`."""
        out = np.empty((self.b, self.w), np.int32)
        for i in range(self.b):
            g = step * self.b + i
            offset, order = self._epoch_plan(g // self.per_epoch)
            start = offset + int(order[g % self.per_epoch]) * self.w
            out[i] = self.tokens[start:start + self.w]
        return out

    def epochs(self, steps: int) -> float:
        return steps * self.b / self.per_epoch


class PhasedBatcher:
    """Steps [0, until_1) from the first batcher, [until_1, until_2) from the second, ...

    E.g. most steps on short windows (cheap attention) and a final phase on long windows
    so that the model sees the relative distances it will meet at inference. Still a pure
    function of the step; each phase's batcher counts its own steps from 0.
    """

    def __init__(self, phases: list[tuple[int, TokenBatcher]]):
        if not phases or any(a >= b for (a, _), (b, _) in zip(phases, phases[1:])):
            raise ValueError(f"phases must be a non-empty list with increasing end steps, got "
                             f"{[u for u, _ in phases]}")
        self.phases = phases

    def batch(self, step: int) -> np.ndarray:
        begin = 0
        for until, batcher in self.phases:
            if step < until or until == self.phases[-1][0]:
                return batcher.batch(step - begin)
            begin = until
        raise AssertionError("unreachable")


def eval_batches(tokens: np.ndarray, num: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
    """`num` fixed batches of [B, T + 1] windows spread evenly over a held-out stream."""
    w = seq_len + 1
    n = min(num * batch_size, (tokens.size - 1) // w)
    starts = np.linspace(0, tokens.size - w, num=n).astype(np.int64)
    windows = np.stack([tokens[s:s + w] for s in starts]).astype(np.int32)
    return [windows[i:i + batch_size] for i in range(0, n, batch_size) if i + batch_size <= n]


# ----------------------------------------------------------------------------- checkpoints

class Checkpointer:
    """orbax CheckpointManager over a train state, stored as a flat dict of its leaves.

    Saving leaves (not the structured pytree) keeps optimizer states with empty nodes
    (optax.MaskedNode) and None fields restorable: the structure comes from a freshly
    initialized state, the numbers from the checkpoint. `meta` is free JSON (e.g. the run
    config) saved next to each step.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.dir = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, meta: dict | None = None):
        ocp = self._ocp
        leaves = {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                     meta=ocp.args.JsonSave(meta or {})), force=True)
        self.mngr.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """(state with like's structure and the saved leaves, meta) of `step` (default: latest)."""
        ocp = self._ocp
        step = self.mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        leaves, treedef = jax.tree_util.tree_flatten(like)
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not
                                                     hasattr(x, "dtype") else x.dtype)
                    for i, x in enumerate(leaves)}
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
        restored = [jnp.asarray(out["state"][f"{i:05d}"]) for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(treedef, restored), dict(out["meta"] or {})

    def close(self):
        self.mngr.close()


# ----------------------------------------------------------------------------- loop

def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.05)


def train(loss_fn: Callable, params, tc: TrainConfig, batcher: TokenBatcher | PhasedBatcher, *,
          workdir: str | Path, heldout: list[np.ndarray] | None = None, extra: tuple = (),
          max_seconds: float | None = None, stop_at: int | None = None, desc: str = "train",
          meta: dict | None = None, log: Callable[[dict], None] | None = None,
          progress: bool = True) -> tuple[TrainState, dict]:
    """Train from scratch or resume from workdir/checkpoints; returns (state, summary).

    params: initial params (ignored when a checkpoint exists, but they give its structure).
    extra: frozen arrays passed to loss_fn after the batch (a teacher's params).
    max_seconds / stop_at: stop early (after a checkpoint) at that wall-clock budget or step;
    running the same call again resumes. log: called with a dict per eval / checkpoint.
    Metrics are appended to workdir/metrics.jsonl.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(tc)
    state = init_state(params, optimizer)
    ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        state, _ = ckpt.restore(state)
    start = int(state.step)
    step_fn = make_train_step(loss_fn, optimizer)
    eval_fn = make_eval_step(loss_fn)
    metrics_file = open(workdir / "metrics.jsonl", "a")
    run_meta = {"train_config": dataclasses.asdict(tc), **(meta or {})}

    def emit(rec):
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        if log is not None:
            log(rec)

    def heldout_ce(p):
        if not heldout:
            return None
        return float(np.mean([float(eval_fn(p, jnp.asarray(b), *extra)["ce"]) for b in heldout]))

    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    bar = _progress(tc.steps, start, desc) if progress else None
    t0 = time.perf_counter()
    t_mark, tok_mark, steps_done = t0, 0, 0
    loss_ema, last = None, {}
    next_batch = batcher.batch(start) if start < end else None
    try:
        for s in range(start, end):
            batch = jnp.asarray(next_batch)
            state, m = step_fn(state, batch, *extra)
            # Prepare the next batch on the host while the device runs this step.
            next_batch = batcher.batch(s + 1) if s + 1 < end else None
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {s + 1}; lower lr={tc.lr}")
            steps_done += 1
            if steps_done == 1:  # exclude compilation from the throughput
                t_mark, tok_mark = time.perf_counter(), 0
            else:
                tok_mark += batch.shape[0] * (batch.shape[1] - 1)
            loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
            elapsed = time.perf_counter() - t_mark
            tok_s = tok_mark / elapsed if elapsed > 0 and tok_mark else 0.0
            last = {"step": s + 1, "loss": loss, "loss_ema": loss_ema, "tok_s": tok_s,
                    "grad_norm": float(m["grad_norm"]),
                    **{k: float(v) for k, v in m.items() if k not in ("loss", "grad_norm")}}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            done = s + 1 == end
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if tc.eval_every and ((s + 1) % tc.eval_every == 0 or s + 1 == tc.steps):
                last["heldout_ce"] = heldout_ce(state.params)
                emit({**last, "time": time.time()})
                if bar is not None:
                    bar.write(f"{desc} step {s + 1}: loss {loss_ema:.4f}  held-out {last['heldout_ce']:.4f}"
                              f"  {tok_s:,.0f} tok/s")
            if (s + 1) % tc.ckpt_every == 0 or done or out_of_time:
                ckpt.save(s + 1, state, run_meta)
            if out_of_time:
                break
    finally:
        if bar is not None:
            bar.close()
        metrics_file.close()
        ckpt.close()
    summary = {"resumed_from": resumed_from, "start_step": start, "end_step": int(state.step),
               "seconds": time.perf_counter() - t0, **last}
    return state, summary
