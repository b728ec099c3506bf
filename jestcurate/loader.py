"""Stable import path for trainers: `from jestcurate.loader import SelectionBatches`.

The code lives in jestcurate.trainer.loader; this name stays so user scripts keep working."""

from jestcurate.trainer.loader import Sample, SelectionBatches, TarIndex, this_worker

__all__ = ["Sample", "SelectionBatches", "TarIndex", "this_worker"]
