"""Helpers for benchmark reports: percentiles and the sections of ``docs/BENCHMARKS.md``.

Each benchmark owns one section of BENCHMARKS.md, delimited by ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; re-running a benchmark replaces only its own section.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent.parent / "docs"
BENCHMARKS_MD = DOCS / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here was produced by the command named in its section, on the machine described there. "
    "Sections are rewritten by `make bench`; compare ratios, not absolute times (the machines are shared "
    "and noisy).\n"
)


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` with linear interpolation; NaN for no values."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {f"p{p:g}": float("nan") for p in points}
    return {f"p{p:g}": float(np.percentile(array, p)) for p in points}


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replaces (or appends) the ``name`` section of BENCHMARKS.md with ``body``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
