"""The passes over a score set's status-ok rows, copied once to an on-disk row cache: exact
duplicates by image hash, spherical k-means (faiss), then near duplicates within each cluster."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.rowcache import ColumnWriter, RowCache, embedding_rows
from jestcurate.io.store import ScoreSet
from jestcurate.pipelines.dedup.collapse import NeighbourSample
from jestcurate.pipelines.dedup.config import EXACT, SEMANTIC, DedupConfig


def _columns(by: str) -> list[str]:
    return {"image": ["img_emb"], "text": ["txt_emb"], "both": ["img_emb", "txt_emb"]}[by]


def build_cache(
    scores: ScoreSet, by: str, directory: Path, on_part: Callable[[], None] | None = None
) -> tuple[RowCache, np.ndarray]:
    """Copy the status-ok rows' embeddings, clip scores, positions and image-hash prefixes.
    Returns the cache and the number of rows of each part (to map results back)."""
    names = scores.part_names()
    emb_cols = _columns(by)
    sizes = []
    counts = []
    for name in names:
        table = scores.read_part(name, ["status"])
        counts.append(table.num_rows)
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False)) == "ok"
        sizes.append(int(ok.sum()))
    n = sum(sizes)
    directory.mkdir(parents=True, exist_ok=True)
    writers = {
        "part": ColumnWriter(directory / "part.npy", "<i4", (n,)),
        "index": ColumnWriter(directory / "index.npy", "<i4", (n,)),
        "clip": ColumnWriter(directory / "clip.npy", "<f4", (n,)),
        "sha": ColumnWriter(directory / "sha.npy", "<u8", (n,)),
        **{c: ColumnWriter(directory / f"{c}.npy", "<f2", (n, scores.dim)) for c in emb_cols},
    }
    try:
        for part_id, name in enumerate(names):
            table = scores.read_part(name, ["status", "index", "clip_score", "sha256", *emb_cols])
            rows = table.filter(pc.equal(table.column("status"), "ok"))
            writers["part"].append(np.full(rows.num_rows, part_id))
            writers["index"].append(rows.column("index").to_numpy())
            writers["clip"].append(rows.column("clip_score").fill_null(-np.inf).to_numpy())
            writers["sha"].append(_sha_prefixes(rows.column("sha256").to_pylist()))
            for c in emb_cols:
                writers[c].append(embedding_rows(rows.column(c)))
            if on_part is not None:
                on_part()
    finally:
        for w in writers.values():
            w.close()
    return RowCache(directory, [], n), np.array(counts)


def _sha_prefixes(hashes: list[str | None]) -> np.ndarray:
    """The first 64 bits of each sha256 (0 when missing). Two different images share a prefix
    with odds of about n² / 2⁶⁵: one in a million at 10 M rows."""
    return np.array([int(h[:16], 16) if h else 0 for h in hashes], dtype=np.uint64)


def use_gpu(device: str) -> bool:
    """faiss decides, not torch: dedup never needs torch (whose import alone costs ~0.7 GB)."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "auto":
        return gpus > 0
    if device in ("cuda", "gpu"):
        if gpus == 0:
            raise JCError(f"--device {device} asked for, but faiss sees no CUDA device")
        return True
    if device == "cpu":
        return False
    raise JCError(f"unknown device {device!r}; use auto, cpu or cuda")


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int, gpu: bool) -> np.ndarray:
    """Spherical k-means of the unit rows of `x` with faiss, seeded: the k centroids (also
    select's target-set cluster filter's)."""
    import faiss

    # min_points_per_centroid=1: small sets are fine to cluster, and faiss would print a warning.
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        spherical=True,
        seed=seed,
        gpu=gpu,
        verbose=False,
        min_points_per_centroid=1,
    )
    kmeans.train(x)
    return kmeans.centroids


def _assign(
    cache: RowCache, columns: list[str], centroids: np.ndarray, nearest: int = 1
) -> np.ndarray:
    """Each row's `nearest` closest centroids, closest first: (rows, nearest)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    nearest = min(nearest, len(centroids))
    out = np.empty((cache.size, nearest), dtype=np.int32)
    step = 1 << 16
    for start in range(0, cache.size, step):
        stop = min(start + step, cache.size)
        x = _vectors(cache, columns, None, start, stop)
        out[start:stop] = index.search(x, nearest)[1]
    return out


def _groups(assigned: np.ndarray, priority: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cluster: its candidate rows in priority order (its members, and with more than one
    column the rows for which it is a runner-up cluster) and which of them are members."""
    n, nearest = assigned.shape
    rows = np.tile(np.arange(n), nearest)
    group = assigned.T.reshape(-1)
    member = np.repeat(np.arange(nearest) == 0, n)
    order = np.lexsort((priority[rows], group))
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    return [(rows[o], member[o]) for o in np.split(order, bounds)]


def _vectors(
    cache: RowCache, columns: list[str], ids: np.ndarray | None, start: int = 0, stop: int = 0
) -> np.ndarray:
    """Rows as float32, L2-normalised; with two columns (--by both) concatenated and scaled so
    a cosine of the pair is the mean of the two cosines."""
    parts = []
    for c in columns:
        v = cache.read(c, ids) if ids is not None else cache.read_range(c, start, stop)
        v = v.astype(np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        parts.append(v)
    x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return np.ascontiguousarray(x / math.sqrt(len(parts)), dtype=np.float32)


def _exact(
    cache: RowCache,
    priority: np.ndarray,
    dup_of: np.ndarray,
    reason: np.ndarray,
    similarity: np.ndarray,
) -> None:
    """Mark all but the best row of each group of equal image hashes."""
    sha = cache.read_range("sha", 0, cache.size)
    known = np.flatnonzero(sha != 0)
    order = known[np.lexsort((priority[known], sha[known]))]  # by hash, then by priority
    if not len(order):
        return
    first = np.r_[True, sha[order][1:] != sha[order][:-1]]  # the best row of each group
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    dups = order[~first]
    dup_of[dups] = order[group_start[~first]]
    reason[dups] = EXACT
    similarity[dups] = 1.0


def _semantic(
    x: np.ndarray,
    threshold: float,
    rows: np.ndarray,
    dup_of: np.ndarray,
    reason: np.ndarray,
    similarity: np.ndarray,
    members: np.ndarray | None = None,
    better: np.ndarray | None = None,
) -> None:
    """`x` holds one cluster's candidate rows in priority order (best first). A member row
    (default: every row) whose similarity to any better candidate exceeds `threshold` is a
    duplicate of the most similar such row. `better`, when given, receives each member's
    similarity to its most similar better candidate, duplicate or not."""
    where = np.arange(len(rows)) if members is None else np.flatnonzero(members)
    where = where[where > 0]  # the best candidate has nothing better to duplicate
    block = 1024
    for first in range(0, len(where), block):
        positions = where[first : first + block]
        stop = int(positions[-1])
        sims = x[:stop] @ x[positions].T  # (better candidates, these members)
        # Only candidates earlier in priority order count.
        sims[np.arange(stop)[:, None] >= positions[None, :]] = -np.inf
        best = sims.argmax(0)
        top = sims[best, np.arange(len(positions))]
        if better is not None:
            better[rows[positions]] = top
        hit = np.flatnonzero(top > threshold)
        mine = rows[positions[hit]]
        fresh = reason[mine] == 0  # exact duplicates keep their reason
        dup_of[mine[fresh]] = rows[best[hit[fresh]]]
        reason[mine[fresh]] = SEMANTIC
        similarity[mine[fresh]] = top[hit[fresh]]


@dataclass
class Duplicates:
    """What the passes found, one entry per status-ok row in the cache's (part) order."""

    part: np.ndarray  # the row's part id
    index: np.ndarray  # its row in the part
    dup_of: np.ndarray  # the better row it duplicates, -1 if kept
    reason: np.ndarray  # 0 (kept), EXACT or SEMANTIC
    similarity: np.ndarray  # cosine to the better row that made it a duplicate
    better: np.ndarray  # cosine to the most similar better row, duplicate or not
    part_rows: np.ndarray  # rows of each part, whatever their status
    clusters: int
    cluster: np.ndarray | None = None  # the row's nearest centroid

    @classmethod
    def none_yet(
        cls, part: np.ndarray, index: np.ndarray, part_rows: np.ndarray, k: int
    ) -> Duplicates:
        n = len(part)
        return cls(
            part, index, np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int8),
            np.full(n, np.nan, dtype=np.float32), np.full(n, -np.inf, dtype=np.float32),
            part_rows, k,
        )  # fmt: skip


def find_duplicates(
    cfg: DedupConfig,
    scores: ScoreSet,
    cache_dir: Path,
    gpu: bool,
    lap: Callable[[str], None],
) -> tuple[Duplicates, NeighbourSample]:
    """The exact pass, k-means, then the near-duplicate pass cluster by cluster, over the
    status-ok rows copied to a row cache in `cache_dir`; and the neighbour sample."""
    with ui.step_progress("copying embeddings", len(scores.parts), "parts") as tick:
        cache, part_rows = build_cache(scores, cfg.by, cache_dir, on_part=tick)
    n = cache.size
    if n == 0:
        raise JCError(f"{cfg.scores} has no rows with status ok")
    k = min(n, cfg.clusters or max(1, round(math.sqrt(n))))
    part = cache.read_range("part", 0, n)
    index = cache.read_range("index", 0, n)
    clip = cache.read_range("clip", 0, n)
    # Priority: higher clip_score first, then (shard, index) order; rank 0 is the best.
    order = np.lexsort((index, part, -clip))
    priority = np.empty(n, dtype=np.int64)
    priority[order] = np.arange(n)
    found = Duplicates.none_yet(part, index, part_rows, k)
    sample = NeighbourSample(n, cfg.seed)
    _exact(cache, priority, found.dup_of, found.reason, found.similarity)
    lap("copy_and_exact")
    columns = _columns(cfg.by)
    # faiss trains on at most 256 points per centroid anyway; sampling first keeps the
    # training set, not the corpus, in memory.
    rng = np.random.default_rng(cfg.seed)
    training = np.sort(rng.choice(n, size=min(n, k * 256), replace=False))
    with ui.stage(f"k-means, {k:,} clusters"):
        centroids = kmeans(_vectors(cache, columns, training), k, cfg.seed, cfg.iterations, gpu)
        lap("kmeans")
        assigned = _assign(cache, columns, centroids, cfg.neighbors)
        found.cluster = assigned[:, 0]
        lap("assign")
    groups = _groups(assigned, priority)
    threshold = 1 - cfg.eps
    with ui.step_progress("deduplicating clusters", len(groups), "clusters") as tick:
        for rows, members in groups:
            if len(rows) > 1 and members.any():
                x = _vectors(cache, columns, rows)
                _semantic(x, threshold, rows, found.dup_of, found.reason, found.similarity,
                          members, found.better)  # fmt: skip
                sample.measure(x, rows, members)
            tick()
    lap("semantic")
    return found, sample
