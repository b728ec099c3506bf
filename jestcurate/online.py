"""Stable import path for trainers: `from jestcurate.online import SuperBatches, ...`.

The code lives in jestcurate.trainer.online; this name stays so user scripts keep working."""

from jestcurate.math.sampling import SamplerOptions
from jestcurate.trainer.online import (
    ComputeLedger,
    OnlineSelector,
    SuperBatch,
    SuperBatches,
    downsample,
    gather,
    lower_resolution,
)

__all__ = [
    "ComputeLedger",
    "OnlineSelector",
    "SamplerOptions",
    "SuperBatch",
    "SuperBatches",
    "downsample",
    "gather",
    "lower_resolution",
]
