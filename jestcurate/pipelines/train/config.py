"""What `jestcurate train` is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    inputs: tuple[str, ...]
    out: Path
    model: str
    pretrained: str | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    device: str = "auto"
    precision: str | None = None
    workers: int = 1
    seed: int = 0
    save_every: int = 100
    shuffle_buffer: int = 2000

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the resume file."""
        fields = asdict(self)
        for volatile in ("out", "device", "workers", "save_every"):
            fields.pop(volatile)
        fields["inputs"] = list(self.inputs)
        return fields


@dataclass
class TrainReport:
    out: Path
    steps: int
    epochs: int
    samples: int
    final_loss: float
    seconds: float
    resumed_from: int
    skipped: dict[str, int]
    already_done: bool = False
