"""JEST's sampler options: one frozen record, checked once when it is made, that select, the
online selector and the sampler (jest.select_batch) all take whole."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jestcurate.errors import JCError

CRITERIA = ("learnability", "easy-ref", "hard-learner")
SAMPLERS = ("refine", "paper")
# The refine sampler's default temperature, relative to the spread of the conditional scores
# (docs/select.md has the measurements that chose it); the paper's is 1 in loss units.
DEFAULT_TEMPERATURE = {"refine": 0.1, "paper": 1.0}
# refine re-draws from the best DEFAULT_POOL · b candidates by independent score (docs/select.md).
DEFAULT_POOL = 3.0
DEFAULT_CHUNKS = 16  # chunks a batch is drawn in (at most b: chunk_sizes clamps)


def super_batch_size(batch_size: int, ratio: float) -> int:
    """B, the candidates each batch of b is chosen from: b / ratio rounded, and at least b."""
    return max(batch_size, round(batch_size / ratio))


@dataclass(frozen=True)
class SamplerOptions:
    """How b examples are chosen from each super-batch of B = super_batch_size(b, ratio).
    Checked when made; the errors name select's options. Every field but b and ratio is jest's.

    criterion: the batch score (learnability, easy-ref or hard-learner); None: learnability
        with a learner, else easy-ref.
    sampler: refine (the default) or paper (the paper's Algorithm 1 as written).
    chunks: chunks each batch is drawn in; None: DEFAULT_CHUNKS (b when b is smaller).
    temperature: draws ∝ exp(score / T); None: the sampler's DEFAULT_TEMPERATURE.
    topk: each chunk's top scores instead of draws (deterministic).
    sweeps, pool: refine's passes over the batch's chunks, and the candidates it re-draws
        from (the best pool x b by independent score).
    """

    batch_size: int
    ratio: float = 0.2
    criterion: str | None = None
    sampler: str = "refine"
    chunks: int | None = None
    temperature: float | None = None
    topk: bool = False
    sweeps: int = 1
    pool: float = DEFAULT_POOL

    def __post_init__(self) -> None:
        b, chunks = self.batch_size, self.chunks
        if not 0 < self.ratio <= 1:
            raise JCError(f"--ratio is the kept fraction and must be in (0, 1], got {self.ratio}")
        if b < 1 or (chunks is not None and chunks < 1):
            raise JCError("--batch-size and --chunks must be at least 1")
        if self.temperature is not None and self.temperature <= 0:
            raise JCError("--temperature must be positive (use --topk for deterministic choice)")
        if self.sampler not in SAMPLERS:
            raise JCError(f"unknown --sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.sweeps < 0:
            raise JCError("--sweeps must be 0 or more")
        if self.pool < 1:
            raise JCError(f"--pool is a multiple of the batch size, at least 1; got {self.pool}")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise JCError(f"unknown --score {self.criterion!r}; use one of {', '.join(CRITERIA)}")
        if chunks is not None and chunks > b:
            raise JCError(
                f"--chunks {chunks} is more than the batch size {b}: each chunk draws at least "
                f"one example; use at most {b}"
            )

    @property
    def super_batch(self) -> int:
        return super_batch_size(self.batch_size, self.ratio)

    @property
    def n_chunks(self) -> int:
        """Chunks per batch, as asked or the default (the sampler draws at most b)."""
        return self.chunks if self.chunks is not None else DEFAULT_CHUNKS

    @property
    def resolved_temperature(self) -> float:
        return (
            self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.sampler]
        )

    def with_criterion(self, criterion: str) -> SamplerOptions:
        return replace(self, criterion=criterion)

    def criterion_for(self, learner: bool) -> str:
        """The batch score: as asked, else learnability with a learner and easy-ref without."""
        return self.criterion or ("learnability" if learner else "easy-ref")

    def applied(self) -> dict[str, Any]:
        """The options that take effect, as a selection records them: sweeps and pool with the
        refine sampler only, the temperature only when drawing (not with topk)."""
        refine = self.sampler == "refine"
        return {
            "chunks": self.n_chunks,
            "sampler": self.sampler,
            "sweeps": self.sweeps if refine else None,
            "pool": self.pool if refine else None,
            "temperature": None if self.topk else self.resolved_temperature,
            "topk": self.topk,
        }
