"""What `jestcurate decontaminate` is asked to do, and the names of what it writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OUTPUT = "decontam.parquet"
SUMMARY = "summary.json"
IMAGE, PAIR = "image", "pair"  # what made a row a hit
# Cosine to an evaluation image (or, for a pair, the mean of the image's and the caption's) at
# or above which a pool row is a near copy. For a trained CLIP's space; a tiny or untrained
# model's collapsed space needs far higher (docs/select.md has the measurements).
DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class DecontamConfig:
    scores: Path  # the pool's score set
    against: tuple[str, ...]  # evaluation sets: score sets, or WebDataset tars to embed
    out: Path
    threshold: float = DEFAULT_THRESHOLD
    device: str = "auto"  # faiss's search, and the model that embeds tars
    batch_size: int | None = None  # images per model batch when embedding tars
