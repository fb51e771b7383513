"""Shared tail of the experiment scripts: print a markdown table and write it, with the rows as
JSON, next to each other under experiments/results/."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path, table: str, rows: list[dict]):
    """Print table; write it to out.md and rows to out.json (parents created)."""
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
