"""What `jestcurate import` reads: the formats it knows and its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORMATS = ("datacomp", "clip-retrieval")
DATACOMP_EMBEDDINGS = ("l14", "b32")


@dataclass(frozen=True)
class ImportConfig:
    source: Path
    out: Path
    format: str
    model: str
    pretrained: str | None = None
    embeddings: str = "l14"  # datacomp: which of its embedding pairs
    role: str = "reference"
    logit_scale: float | None = None  # given: no model is loaded
    logit_bias: float | None = None
    loss: str | None = None  # default: sigmoid with a logit bias, else softmax
    task_index: int | None = None
    num_tasks: int | None = None
    shards: tuple[str, ...] = ()  # the downloaded WebDataset shards: one part per shard
