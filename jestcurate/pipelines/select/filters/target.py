"""Target-set filters: a score set (the guide split, scored with the pool's model) says what
the pool should look like, by its image embeddings.

* clusters (DataComp's image-based filter): spherical k-means (faiss, seeded) on a sample of
  the pool's image embeddings; each target image picks its nearest centroid; pool rows whose
  nearest centroid was picked stay.
* normsim2, normsiminf (NormSim, Wang et al. 2024): a row's score is the p-norm of its image's
  cosines to the target images, (Σ_j cos_j^p)^(1/p), for p = 2 (computed as sqrt(xᵀ G x) with
  G = TᵀT, D × D, whatever the target's size) or ∞ (the largest cosine, faiss inner
  products); rows scoring below a threshold go, given or set so that a top fraction of the
  ok rows stays.

Both stream the pool part by part. What needs the whole pool first (k-means' training rows,
the score quantile) comes from one pass that keeps a bounded uniform sample of the ok rows:
each row draws a seeded random key and the `size` smallest keys stay (a bottom-k sample)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.eligible import Verdict
from jestcurate.io.schema import embedding_matrix
from jestcurate.io.store import ScoreSet, fingerprint, model_difference, open_score_set

NORMSIM_SAMPLE = 1_000_000  # scores kept for the --target-keep quantile (exact below this)
CLUSTER_SAMPLE = 100_000  # k-means training rows, at least 40 per centroid
KMEANS_ITERATIONS = 20


def open_target(path: Path, pool: ScoreSet) -> ScoreSet:
    """The target score set, refused in one line unless scored with the pool's model."""
    target = open_score_set(path)
    shown = model_difference(pool, target)
    if shown:
        raise JCError(
            f"--target {path} was scored with another model than {pool.path} ({shown}); "
            "score the target images with the pool's model and checkpoint"
        )
    return target


def target_identity(path: Path, pool: ScoreSet) -> dict[str, Any]:
    return {"scores": fingerprint(open_target(path, pool))}


def read_target(path: Path, pool: ScoreSet) -> np.ndarray:
    """The target's unit image embeddings, (M, D) float32: its ok rows with a finite image
    embedding, in one array of 4·M·D bytes (filled part by part; only a part's rows beside
    it). Refused in one line unless scored with the pool's model."""
    target = open_target(path, pool)
    names = target.part_names()
    ok = [_ok(target.read_part(name, ["status"])) for name in names]
    images = np.empty((sum(len(rows) for rows in ok), target.dim), dtype=np.float32)
    filled = 0
    for name, rows in zip(names, ok, strict=True):
        if not len(rows):
            continue
        x, finite = unit_images(target.read_part(name, ["img_emb"]), rows)
        images[filled : filled + int(finite.sum())] = x[finite]
        filled += int(finite.sum())
    if not filled:
        raise JCError(f"--target {path} has no ok rows with an image embedding")
    return images[:filled]


def _ok(table: pa.Table) -> np.ndarray:
    """The ok rows of a part (their positions)."""
    return np.flatnonzero(np.asarray(table.column("status").to_numpy(zero_copy_only=False)) == "ok")


def unit_images(table: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unit image embeddings of `rows` of a part, and which of them are usable (finite)."""
    from jestcurate.pipelines.decontam.evalsets import unit

    x = embedding_matrix(table.column("img_emb").take(pa.array(rows)))
    finite = np.isfinite(x).all(axis=1)
    x[~finite] = 0.0
    return unit(x), finite


class NormSim:
    """Removes rows whose NormSim_p score is below `threshold` (p = 2 or ∞); why: detail
    normsim2 or normsiminf, the score (value; NaN without a finite image embedding) and the
    threshold."""

    name, fate = "target", "filtered"
    columns = ("img_emb",)

    def __init__(self, target: np.ndarray, p: float, threshold: float = -math.inf) -> None:
        self.p, self.threshold = p, threshold
        if p == 2:  # Σ_j (x·t_j)² = xᵀ (TᵀT) x, in float64: it sums M squares
            self.gram = target.T.astype(np.float64) @ target.astype(np.float64)
        else:
            import faiss

            self.index = faiss.IndexFlatIP(target.shape[1])
            self.index.add(np.ascontiguousarray(target, dtype=np.float32))

    def scores(self, x: np.ndarray) -> np.ndarray:
        """NormSim_p of unit rows `x`."""
        if self.p == 2:
            return np.sqrt(np.maximum(((x @ self.gram) * x).sum(axis=1), 0.0))
        out = np.empty(len(x), dtype=np.float64)
        step = 1 << 15
        for start in range(0, len(x), step):
            out[start : start + step] = self.index.search(x[start : start + step], 1)[0][:, 0]
        return out

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        rows = np.flatnonzero(candidate)
        removed = np.ones(len(candidate), dtype=bool)
        value = np.full(len(candidate), np.nan, dtype=np.float32)
        x, finite = unit_images(table, rows)
        scores = self.scores(x[finite])
        removed[rows[finite]] = scores < self.threshold
        value[rows[finite]] = scores
        detail = "normsim2" if self.p == 2 else "normsiminf"
        return Verdict(removed, None, detail, value, self.threshold)


@dataclass(frozen=True)
class Clusters:
    """Removes rows whose nearest pool centroid is none of the target images' nearest; why:
    detail clusters, the row's nearest cluster (value; NaN without a finite image embedding),
    no threshold."""

    centroids: np.ndarray  # (K, D)
    kept: np.ndarray  # the clusters target images picked, sorted
    name: str = "target"
    fate: str = "filtered"
    columns: tuple[str, ...] = ("img_emb",)

    def nearest(self, x: np.ndarray) -> np.ndarray:
        import faiss

        index = faiss.IndexFlatIP(self.centroids.shape[1])
        index.add(self.centroids)
        return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        rows = np.flatnonzero(candidate)
        removed = np.ones(len(candidate), dtype=bool)
        value = np.full(len(candidate), np.nan, dtype=np.float32)
        x, finite = unit_images(table, rows)
        nearest = self.nearest(x[finite])
        removed[rows[finite]] = ~np.isin(nearest, self.kept)
        value[rows[finite]] = nearest
        return Verdict(removed, None, "clusters", value)


class BottomK:
    """A uniform sample of at most `size` items from a stream: the smallest random keys.

    Keys at or above `bound` (the size-th smallest key at the last compaction) can no longer
    enter, so their items need not even be computed. Entering items are held beside the sample
    and compacted into it when they first fill it and then each time they number `size` more:
    per add, the work is proportional to the items added (amortised), and at most 2·size are
    held."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bound = math.inf
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._held = 0

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        entering = keys < self.bound
        if not entering.any():
            return
        self._keys.append(keys[entering])
        self._values.append(values[entering])
        self._held += int(entering.sum())
        if self._held > self.size and (self.bound == math.inf or self._held >= 2 * self.size):
            self._compact()

    def _compact(self) -> None:
        keys, values = np.concatenate(self._keys), np.concatenate(self._values)
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, values = keys[keep], values[keep]
        if len(keys) >= self.size:
            self.bound = float(keys.max())
        self._keys, self._values, self._held = [keys], [values], len(keys)

    @property
    def values(self) -> np.ndarray | None:
        """The sample's items (None if nothing was added)."""
        if not self._keys:
            return None
        self._compact()
        return self._values[0]


def sample_pool(
    pool: ScoreSet, size: int, seed: int, what: str, score: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`score` of the unit image embeddings of a uniform sample of at most `size` ok rows of
    the pool (one pass, part by part; the sample is the same for the same seed). Each ok row
    draws its key first, and only rows whose key can still enter the sample are scored."""
    sample = BottomK(size)
    names = pool.part_names()
    with ui.step_progress(what, len(names), "parts") as tick:
        for part_id, name in enumerate(names):
            table = pool.read_part(name, ["status", "img_emb"])
            ok = _ok(table)
            keys = np.random.default_rng([seed, part_id, 31]).random(len(ok))
            entering = keys < sample.bound
            x, finite = unit_images(table, ok[entering])
            sample.add(keys[entering][finite], score(x[finite]))
            tick()
    values = sample.values
    if values is None or not len(values):
        raise JCError(f"{pool.path} has no ok rows with an image embedding for --target")
    return values


def top_fraction_threshold(scores: np.ndarray, keep: float) -> float:
    """The score of the k-th best row, k = round(keep · n) (at least 1): rows at or above it
    are the top fraction `keep` (more where scores tie)."""
    ordered = np.sort(scores)[::-1]
    k = min(len(ordered), max(1, round(keep * len(ordered))))
    return float(ordered[k - 1])


def build_normsim(
    pool: ScoreSet, target: np.ndarray, p: float, keep: float | None, threshold: float | None,
    seed: int,
) -> NormSim:  # fmt: skip
    """NormSim_p with a given threshold, or one that keeps the top `keep` of the ok rows."""
    scorer = NormSim(target, p, -math.inf if threshold is None else threshold)
    if threshold is None:
        assert keep is not None
        scores = sample_pool(pool, NORMSIM_SAMPLE, seed, "target: NormSim quantile", scorer.scores)
        scorer.threshold = top_fraction_threshold(scores, keep)
    return scorer


def build_clusters(
    pool: ScoreSet, target: np.ndarray, k: int | None, seed: int, gpu: bool
) -> Clusters:
    """k-means on a sample of the pool's images; the clusters the target's images fall in."""
    from jestcurate.pipelines.dedup.passes import kmeans

    rows = fingerprint(pool)["rows"]  # from the parts' metadata: before the sampling pass
    if k is not None and k > rows:
        raise JCError(f"--target-clusters {k} is more than the pool's {rows:,} rows")
    size = max(CLUSTER_SAMPLE, 40 * (k or 0))
    x = sample_pool(pool, size, seed, "target: k-means sample", lambda v: v).astype(np.float32)
    k = k or max(1, round(math.sqrt(len(x))))
    if k > len(x):
        raise JCError(f"--target-clusters {k} is more than the pool's {len(x):,} ok rows")
    centroids = kmeans(np.ascontiguousarray(x), k, seed, KMEANS_ITERATIONS, gpu)
    found = Clusters(centroids, np.zeros(0, dtype=np.int64))
    return Clusters(centroids, np.unique(found.nearest(target)))
