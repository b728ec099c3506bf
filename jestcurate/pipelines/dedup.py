"""`jestcurate dedup`: exact and semantic deduplication (SemDeDup) of a score set, with faiss.

1. Exact duplicates: the same image bytes (sha256). Of each group the best row is kept.
2. Semantic duplicates: spherical k-means (faiss; on the GPU when there is one) over the stored
   embeddings, then inside each cluster every row whose cosine similarity to a better row
   exceeds 1 - eps is dropped. Rows are ranked by clip_score (higher is better), ties, such as
   exact duplicates, going to the first in (shard, index) order.
Embeddings are copied once to an on-disk row cache and clusters are read back one at a time, so
memory holds one cluster, not the corpus. Deterministic for a seed.

Output: DEDUP_DIR/dedup.parquet, one row per status-ok row of the score set: shard, key, index,
cluster, kept, duplicate_of (the key of the kept row it duplicates) and duplicate_of_shard,
similarity (cosine to the better row that made it a duplicate; 1 for exact duplicates), reason
("exact" | "semantic" | null); and DEDUP_DIR/summary.json. Rerunning with the same inputs and
options reuses a finished output.

A collapsed embedding space (an untrained or tiny model's: every row near every other) makes
most rows "near duplicates". The summary records the nearest-neighbour cosine of a seeded sample
of rows (within the rows each is compared with), and when more than half the rows are dropped as
near duplicates or the median neighbour is closer than 1 - eps, a warning is logged with an eps
that would drop about 5 % (exact for these clusters: it is read off each row's cosine to its most
similar better row, which the dedup computes anyway).
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.rowcache import ColumnWriter, RowCache, embedding_rows
from jestcurate.io.store import (
    ScoreSet,
    atomic_write,
    file_digests,
    fingerprint,
    finished_output,
    open_score_set,
    read_output,
    write_json_atomic,
)

log = logging.getLogger(__name__)

BY = ("image", "text", "both")
OUTPUT = "dedup.parquet"
SUMMARY = "summary.json"
EXACT, SEMANTIC = 1, 2
REASONS = {EXACT: "exact", SEMANTIC: "semantic"}
NN_SAMPLE = 10_000  # rows whose nearest-neighbour cosine the summary describes
COLLAPSED_DROP = 0.5  # warn when more than this fraction of the ok rows are near duplicates
SUGGEST_DROP = 0.05  # the warning suggests an eps that drops about this fraction
MIN_SUGGESTED_EPS = 1e-6  # below this, float16 embeddings' rounding decides, not the images


@dataclass(frozen=True)
class DedupConfig:
    scores: Path
    out: Path
    eps: float = 0.05
    clusters: int | None = None  # default: round(sqrt(rows))
    by: str = "image"
    seed: int = 0
    iterations: int = 20
    device: str = "auto"
    neighbors: int = 1  # compare each row within its nearest this-many clusters' rows


def _validate(cfg: DedupConfig) -> None:
    if not 0 <= cfg.eps < 2:
        raise JCError(f"--eps must be in [0, 2), got {cfg.eps}")
    if cfg.by not in BY:
        raise JCError(f"--by must be one of {', '.join(BY)}, not {cfg.by!r}")
    if cfg.clusters is not None and cfg.clusters < 1:
        raise JCError("--clusters must be at least 1")
    if not 1 <= cfg.neighbors <= 8:
        raise JCError("--neighbors must be between 1 and 8")


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


def _use_gpu(device: str) -> bool:
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


def _kmeans(x: np.ndarray, k: int, seed: int, iterations: int, gpu: bool) -> np.ndarray:
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


def _roots(dup_of: np.ndarray) -> np.ndarray:
    """For each dropped row the kept row its duplicate chain ends at (-1 for kept rows)."""
    up = np.where(dup_of >= 0, dup_of, np.arange(len(dup_of)))
    while True:  # pointer jumping: chains halve each round
        nxt = up[up]
        if np.array_equal(nxt, up):
            return np.where(dup_of >= 0, up, -1)
        up = nxt


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, where there is /proc, because ru_maxrss
    also counts what a forking parent held before the exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _identity(cfg: DedupConfig, scores: ScoreSet) -> dict[str, Any]:
    return {
        "scores": fingerprint(scores),
        "params": {
            "by": cfg.by,
            "eps": cfg.eps,
            "clusters": cfg.clusters,
            "seed": cfg.seed,
            "iterations": cfg.iterations,
            "neighbors": cfg.neighbors,
        },
    }


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


class _Laps:
    """Seconds taken by each phase; with -v logged with the peak memory so far."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.mark = time.time()

    def __call__(self, name: str) -> None:
        self.phases[name] = round(time.time() - self.mark, 3)
        self.mark = time.time()
        log.debug("%s: %.1f s, peak RSS so far %.0f MiB", name, self.phases[name], _peak_rss_mib())


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
        centroids = _kmeans(_vectors(cache, columns, training), k, cfg.seed, cfg.iterations, gpu)
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


def _summary(cfg: DedupConfig, found: Duplicates, sample: NeighbourSample) -> dict[str, Any]:
    """The counts, cluster sizes, neighbour cosines and any collapsed-space warning."""
    reason = found.reason
    sizes = np.bincount(found.cluster, minlength=found.clusters)
    semantic = int((reason == SEMANTIC).sum())
    nn = sample.cosine()
    suggested = suggest_eps(found.better, reason)
    warning = collapse_warning(cfg.eps, len(reason), semantic, nn, suggested)
    if warning:
        log.warning("%s", warning)
    return {
        "rows": int(found.part_rows.sum()),
        "ok_rows": len(reason),
        "clusters_used": int(found.clusters),
        "kept": int((reason == 0).sum()),
        "dropped_exact": int((reason == EXACT).sum()),
        "dropped_semantic": semantic,
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
        "nn_cosine": nn,
        "suggested_eps": suggested if warning else None,
        "warning": warning,
    }


def run(cfg: DedupConfig) -> dict[str, Any]:
    """Deduplicate and write the outputs; returns the summary (with "seconds" and "reused")."""
    _validate(cfg)
    began = time.time()
    scores = open_score_set(cfg.scores)
    gpu = _use_gpu(cfg.device)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    identity = _identity(cfg, scores)
    done = finished_output(cfg.out, SUMMARY, OUTPUT, identity, "dedup")
    if done is not None:
        if done.get("warning"):
            log.warning("%s", done["warning"])
        return {**done, "seconds": time.time() - began, "reused": True}
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache_dir = cfg.out / ".cache"
    lap = _Laps()
    try:
        found, sample = find_duplicates(cfg, scores, cache_dir, gpu, lap)
        with ui.stage("writing dedup.parquet"):
            _write(cfg, scores, found.part, found.index, found.cluster, _roots(found.dup_of),
                   found.reason, found.similarity)  # fmt: skip
        lap("write")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    summary = {
        **identity,
        **_summary(cfg, found, sample),
        "device": "cuda" if gpu else "cpu",
        "tool_version": __version__,
        "seconds": round(time.time() - began, 3),
        "seconds_by_phase": lap.phases,
        "peak_rss_mib": round(_peak_rss_mib()),
        "files": file_digests(cfg.out, [OUTPUT]),  # what `jestcurate verify` checks
    }
    write_json_atomic(cfg.out / SUMMARY, summary)
    return {**summary, "reused": False}


def _write(
    cfg: DedupConfig,
    scores: ScoreSet,
    part: np.ndarray,
    index: np.ndarray,
    cluster: np.ndarray,
    roots: np.ndarray,
    reason: np.ndarray,
    similarity: np.ndarray,
) -> None:
    """Two passes over the parts' key columns: first the keys of the kept rows that others
    duplicate, then one row group per part (rows are in part order in the cache)."""
    names = scores.part_names()
    targets = np.unique(roots[roots >= 0])
    target_keys: dict[int, str] = {}
    shards: list[str] = []
    for part_id, name in enumerate(names):
        table = scores.read_part(name, ["shard", "key"])
        shards.append(table.column("shard")[0].as_py() if table.num_rows else name)
        mine = targets[part[targets] == part_id]
        if len(mine):
            found = table.column("key").take(pa.array(index[mine])).to_pylist()
            target_keys.update(zip(mine.tolist(), found, strict=True))
    starts = np.searchsorted(part, np.arange(len(names) + 1))

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for part_id, name in enumerate(names):
                lo, hi = starts[part_id], starts[part_id + 1]
                if lo == hi:
                    continue
                keys = scores.read_part(name, ["key"]).column("key")
                root = roots[lo:hi].tolist()
                columns = {
                    "shard": pa.array([shards[part_id]] * (hi - lo), pa.string()),
                    "key": keys.take(pa.array(index[lo:hi])),
                    "index": pa.array(index[lo:hi], pa.int32()),
                    "cluster": pa.array(cluster[lo:hi], pa.int32()),
                    "kept": pa.array(reason[lo:hi] == 0),
                    "duplicate_of": pa.array(
                        [target_keys[r] if r >= 0 else None for r in root], pa.string()
                    ),
                    "duplicate_of_shard": pa.array(
                        [shards[part[r]] if r >= 0 else None for r in root], pa.string()
                    ),
                    "similarity": pa.array(similarity[lo:hi], pa.float32(), from_pandas=True),
                    "reason": pa.array([REASONS.get(r) for r in reason[lo:hi].tolist()]),
                }
                writer.write_table(pa.table(columns, schema=SCHEMA))

    atomic_write(cfg.out / OUTPUT, write)


SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("index", pa.int32()),
        ("cluster", pa.int32()),
        ("kept", pa.bool_()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_shard", pa.string()),
        ("similarity", pa.float32()),
        ("reason", pa.string()),
    ]
)


def _by_shard(dedup_dir: Path, column: str, where: str | None = None) -> dict[str, np.ndarray]:
    """shard -> (indexes, values of `column`) of the rows, optionally only those where the
    boolean column `where` is false."""
    path = dedup_dir / OUTPUT
    if not path.is_file():
        raise JCError(f"{dedup_dir} is not a dedup output (no {OUTPUT}); run jestcurate dedup")
    table = read_output(path, ["shard", "index", column])
    if where is not None:
        table = table.filter(pc.invert(table.column(where)))
    encoded = table.column("shard").combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy()
    index = table.column("index").to_numpy()
    values = table.column(column).to_numpy()
    order = np.lexsort((index, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    out = {}
    for code, shard in enumerate(encoded.dictionary.to_pylist()):
        rows = order[bounds[code] : bounds[code + 1]]
        out[shard] = (index[rows], values[rows])
    return out


def load_dropped(dedup_dir: Path) -> dict[str, np.ndarray]:
    """For select --dedup: shard -> sorted indexes of the rows dedup dropped."""
    dropped = _by_shard(dedup_dir, "kept", where="kept")
    return {shard: idx.astype(np.int64) for shard, (idx, _) in dropped.items()}


def load_clusters(dedup_dir: Path) -> dict[str, np.ndarray]:
    """For select --balance-clusters: shard -> cluster id by index (-1 where unknown)."""
    out = {}
    for shard, (idx, cluster) in _by_shard(dedup_dir, "cluster").items():
        arr = np.full(int(idx.max()) + 1 if len(idx) else 0, -1, dtype=np.int32)
        arr[idx] = cluster
        out[shard] = arr
    return out
