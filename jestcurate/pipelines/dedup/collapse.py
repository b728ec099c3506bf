"""Is the embedding space collapsed? The nearest-neighbour cosine of a seeded sample of rows,
an eps that would drop about 5 %, and the warning when most rows look like near duplicates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jestcurate.pipelines.dedup.config import EXACT

NN_SAMPLE = 10_000  # rows whose nearest-neighbour cosine the summary describes
COLLAPSED_DROP = 0.5  # warn when more than this fraction of the ok rows are near duplicates
SUGGEST_DROP = 0.05  # the warning suggests an eps that drops about this fraction
MIN_SUGGESTED_EPS = 1e-6  # below this, float16 embeddings' rounding decides, not the images


class NeighbourSample:
    """A seeded sample of rows and each one's cosine to its nearest neighbour among the rows it
    is compared with: how close together the embedding space is, for the summary."""

    def __init__(self, n: int, seed: int) -> None:
        self.picks = np.random.default_rng([seed, 1]).choice(n, min(n, NN_SAMPLE), replace=False)
        self.picks.sort()
        self.nearest = np.full(len(self.picks), np.nan, dtype=np.float32)

    def measure(self, x: np.ndarray, rows: np.ndarray, members: np.ndarray) -> None:
        """The sampled members among one cluster's candidates `rows`, whose vectors are `x`."""
        slot = np.minimum(np.searchsorted(self.picks, rows), len(self.picks) - 1)
        where = np.flatnonzero(members & (self.picks[slot] == rows))
        self.nearest[slot[where]] = _nearest(x, where)

    def cosine(self) -> dict[str, Any] | None:
        return _nn_cosine(self.nearest)


def _nearest(x: np.ndarray, where: np.ndarray) -> np.ndarray:
    """For the candidates at positions `where` of a cluster's `x`: the cosine to the most
    similar other candidate."""
    out = np.empty(len(where), dtype=np.float32)
    block = 1024
    for first in range(0, len(where), block):
        positions = where[first : first + block]
        sims = x @ x[positions].T
        sims[positions, np.arange(len(positions))] = -np.inf
        out[first : first + len(positions)] = sims.max(0)
    return out


def _nn_cosine(nearest: np.ndarray) -> dict[str, Any] | None:
    """Quantiles of the sampled rows' nearest-neighbour cosine (None with no sampled row in a
    cluster of two or more)."""
    values = nearest[np.isfinite(nearest)].astype(np.float64)
    if not len(values):
        return None
    qs = np.quantile(values, [0.01, 0.1, 0.5, 0.9])
    named = zip(("p1", "p10", "median", "p90"), qs.tolist(), strict=True)
    return {"sample": len(values), **{k: round(v, 6) for k, v in named}}


def _round_down(value: float) -> float:
    """To two significant digits, never up."""
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.floor(value / step) * step:.2g}")


def suggest_eps(
    better: np.ndarray, reason: np.ndarray, fraction: float = SUGGEST_DROP
) -> dict[str, Any] | None:
    """An eps that would drop about `fraction` of the rows as near duplicates (rounded down to
    two digits) and how many it drops: exact for the same clusters, because a row is a near
    duplicate when its cosine to its most similar better row (`better`) exceeds 1 - eps. None
    when no eps of at least MIN_SUGGESTED_EPS drops so few."""
    candidates = better[reason != EXACT]  # exact duplicates go whatever eps is
    target = int(fraction * len(reason))
    gaps = np.sort(1 - candidates.astype(np.float64))
    if target >= len(gaps) or not MIN_SUGGESTED_EPS <= gaps[target] < math.inf:
        return None
    eps = _round_down(float(gaps[target]))
    # The comparison _semantic makes (float32 against 1 - eps), so the count is the one a run
    # with this eps and the same clusters gets.
    drops = int(np.count_nonzero(candidates > 1 - eps))
    return {"eps": eps, "drops": drops, "of": len(reason)}


def collapse_warning(
    eps: float, ok_rows: int, semantic: int, nn: dict[str, Any] | None, suggested: Any
) -> str | None:
    """One line when the near duplicates look like a collapsed embedding space rather than
    duplicates: more than COLLAPSED_DROP of the rows dropped as near duplicates, or the median
    nearest-neighbour cosine above 1 - eps. None otherwise."""
    median = nn["median"] if nn else None
    close = median is not None and median > 1 - eps
    if semantic <= COLLAPSED_DROP * ok_rows and not close:
        return None
    seen = (
        f"median nearest-neighbour cosine {median:.6g}"
        if median is not None
        else "no neighbours sampled"
    )
    line = (
        f"dedup dropped {semantic:,} of {ok_rows:,} ok rows ({semantic / ok_rows:.0%}) as near "
        f"duplicates at --eps {eps:g}: the embedding space looks collapsed ({seen}"
        f"{', above 1 - eps' if close else ''}); an untrained or tiny model's embeddings do this"
    )
    if suggested and suggested["eps"] < eps:
        share = suggested["drops"] / suggested["of"]
        return (
            f"{line}. Try --eps {suggested['eps']:g}, which drops {suggested['drops']:,} "
            f"({share:.1%}) here, or score with a trained model"
        )
    return f"{line}. No --eps separates the rows much here: score with a trained model"
