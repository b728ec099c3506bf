"""What `jestcurate dedup` is asked to do, and the reasons a row is dropped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BY = ("image", "text", "both")
EXACT, SEMANTIC = 1, 2
REASONS = {EXACT: "exact", SEMANTIC: "semantic"}


@dataclass(frozen=True)
class DedupConfig:
    scores: Path
    out: Path
    eps: float = 0.05
    clusters: int | None = None  # default: round(sqrt(rows))
    by: str = "image"
    seed: int = 0
    iterations: int = 20
    device: str = "auto"
    neighbors: int = 1  # compare each row within its nearest this-many clusters' rows
