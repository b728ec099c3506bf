"""JEST's sampler options and their defaults."""

from __future__ import annotations

CRITERIA = ("learnability", "easy-ref", "hard-learner")
SAMPLERS = ("refine", "paper")
# The refine sampler's default temperature, relative to the spread of the conditional scores
# (docs/select.md has the measurements that chose it); the paper's is 1 in loss units.
DEFAULT_TEMPERATURE = {"refine": 0.1, "paper": 1.0}
# refine re-draws from the best DEFAULT_POOL · b candidates by independent score (docs/select.md).
DEFAULT_POOL = 3.0
DEFAULT_CHUNKS = 16  # chunks a batch is drawn in (at most b: chunk_sizes clamps)
