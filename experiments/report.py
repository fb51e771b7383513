"""Shared tail of the experiment scripts: print a markdown table and write it, with the rows as
JSON, next to each other under experiments/results/."""

from __future__ import annotations

import json
import time
from pathlib import Path


def write_report(out: str | Path, table: str, rows: list[dict]):
    """Print table; write it to out.md and rows to out.json (parents created)."""
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def timed(fn):
    """(seconds, result) of one call of fn."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def paired(base, other, repeats: int, warmup: bool = True):
    """Time base() and other() back to back, repeats times, alternating which runs first (a slow
    moment of the shared machine then slows both sides of a pair, not one side of the ratio), after
    one warm-up call of each: (ratios base seconds / other seconds, other's seconds, other's last
    result)."""
    if warmup:
        other(), base()  # compile
    ratios, secs, out = [], [], None
    for i in range(repeats):
        if i % 2:
            s, out = timed(other)
            s_base, _ = timed(base)
        else:
            s_base, _ = timed(base)
            s, out = timed(other)
        ratios.append(s_base / s)
        secs.append(s)
    return ratios, secs, out


def best_interleaved(timers: dict, rounds: int) -> dict:
    """{key: the least of `rounds` calls of timers[key]()}, every timer called once per round in
    turn, so a slow moment of the shared machine hits one round of each rather than all of one."""
    best = {key: float("inf") for key in timers}
    for _ in range(rounds):
        for key, timed in timers.items():
            best[key] = min(best[key], timed())
    return best


def torch_device() -> str:
    """Where the transformers baselines run: on the GPU when jax runs on one and torch sees it (the
    comparison then stays accelerator against accelerator), else on the CPU."""
    import jax
    import torch
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
