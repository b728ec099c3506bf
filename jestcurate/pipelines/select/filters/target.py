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
from jestcurate.io.identity import MODEL_FIELDS, identity_mismatches
from jestcurate.io.schema import embedding_matrix
from jestcurate.io.store import ScoreSet, fingerprint, open_score_set

NORMSIM_SAMPLE = 1_000_000  # scores kept for the --target-keep quantile (exact below this)
CLUSTER_SAMPLE = 100_000  # k-means training rows, at least 40 per centroid
KMEANS_ITERATIONS = 20


def open_target(path: Path, pool: ScoreSet) -> ScoreSet:
    """The target score set, refused in one line unless scored with the pool's model."""
    target = open_score_set(path)
    differs = identity_mismatches(pool.meta, target.meta, MODEL_FIELDS)
    if differs or target.dim != pool.dim:
        shown = "; ".join(differs) or f"embed_dim: {pool.dim} there, {target.dim} here"
        raise JCError(
            f"--target {path} was scored with another model than {pool.path} ({shown}); "
            "score the target images with the pool's model and checkpoint"
        )
    return target


def target_identity(path: Path, pool: ScoreSet) -> dict[str, Any]:
    return {"scores": fingerprint(open_target(path, pool))}


def target_images(path: Path, pool: ScoreSet) -> np.ndarray:
    """The target's ok rows' unit image embeddings, (M, D) float32."""
    from jestcurate.pipelines.decontam.evalsets import SCORE_SET, Located, read_score_set

    found = read_score_set(Located(path.name, str(path), SCORE_SET))
    return found.images


def unit_images(table: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unit image embeddings of `rows` of a part, and which of them are usable (finite)."""
    from jestcurate.pipelines.decontam.evalsets import unit

    x = embedding_matrix(table.column("img_emb").take(pa.array(rows)))
    finite = np.isfinite(x).all(axis=1)
    x[~finite] = 0.0
    return unit(x), finite


class NormSim:
    """Removes rows whose NormSim_p score is below `threshold` (p = 2 or ∞)."""

    name = "target"
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
        value = np.full(len(candidate), np.nan)
        removed = np.ones(len(candidate), dtype=bool)
        x, finite = unit_images(table, rows)
        value[rows[finite]] = self.scores(x[finite])
        removed[rows[finite]] = value[rows[finite]] < self.threshold
        return Verdict(removed, value)


@dataclass(frozen=True)
class Clusters:
    """Removes rows whose nearest pool centroid is none of the target images' nearest."""

    centroids: np.ndarray  # (K, D)
    kept: np.ndarray  # the clusters target images picked, sorted
    name: str = "target"
    columns: tuple[str, ...] = ("img_emb",)

    def nearest(self, x: np.ndarray) -> np.ndarray:
        import faiss

        index = faiss.IndexFlatIP(self.centroids.shape[1])
        index.add(self.centroids)
        return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        rows = np.flatnonzero(candidate)
        value = np.full(len(candidate), np.nan)
        removed = np.ones(len(candidate), dtype=bool)
        x, finite = unit_images(table, rows)
        cluster = self.nearest(x[finite])
        value[rows[finite]] = cluster
        removed[rows[finite]] = ~np.isin(cluster, self.kept)
        return Verdict(removed, value)


class BottomK:
    """A uniform sample of at most `size` items from a stream: the smallest random keys."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.keys = np.zeros(0)
        self.values: np.ndarray | None = None

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys = np.concatenate([self.keys, keys])
        self.values = values if self.values is None else np.concatenate([self.values, values])
        if len(self.keys) > self.size:
            keep = np.argpartition(self.keys, self.size)[: self.size]
            self.keys, self.values = self.keys[keep], self.values[keep]


def sample_pool(
    pool: ScoreSet, size: int, seed: int, what: str, score: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`score` of the unit image embeddings of a uniform sample of at most `size` ok rows of
    the pool (one pass, part by part; the sample is the same for the same seed)."""
    sample = BottomK(size)
    names = pool.part_names()
    with ui.step_progress(what, len(names), "parts") as tick:
        for part_id, name in enumerate(names):
            table = pool.read_part(name, ["status", "img_emb"])
            status = np.asarray(table.column("status").to_numpy(zero_copy_only=False))
            x, finite = unit_images(table, np.flatnonzero(status == "ok"))
            keys = np.random.default_rng([seed, part_id, 31]).random(int(finite.sum()))
            sample.add(keys, score(x[finite]))
            tick()
    if sample.values is None or not len(sample.values):
        raise JCError(f"{pool.path} has no ok rows with an image embedding for --target")
    return sample.values


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

    size = max(CLUSTER_SAMPLE, 40 * (k or 0))
    x = sample_pool(pool, size, seed, "target: k-means sample", lambda v: v).astype(np.float32)
    k = k or max(1, round(math.sqrt(len(x))))
    if k > len(x):
        raise JCError(f"--target-clusters {k} is more than the pool's {len(x):,} ok rows")
    centroids = kmeans(np.ascontiguousarray(x), k, seed, KMEANS_ITERATIONS, gpu)
    found = Clusters(centroids, np.zeros(0, dtype=np.int64))
    return Clusters(centroids, np.unique(found.nearest(target)))
