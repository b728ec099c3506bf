"""The eligible rows of a score set (or of a reference and learner pair), copied into a flat
on-disk cache: fixed-width .npy columns read back by row id with positioned reads, so memory
does not grow with the corpus (docs/architecture.md says why not Arrow or memory maps).

Two passes over the parts: `scan` reads the small columns (join check, eligibility counts,
text column widths), `fill_cache` copies the eligible rows. select and the online selector
share both, so they see the same rows under the same ids. The cache's columns are declared
here once (`layout`), for the cache and for select's scatter buckets (io/scatter.py) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.rowcache import RowCache, column_writers, embedding_rows, fixed_bytes
from jestcurate.io.store import ScoreSet

# The row cache's columns: where each row is (part id, index and key in its shard), its uid, its
# scores, its dedup cluster (with --balance-clusters) and each model's embeddings.
PART, INDEX, KEY, UID = "part", "index", "key", "uid"
CLIP_SCORE, REF_LOSS, LEARNER_LOSS, CLUSTER = "clip_score", "ref_loss", "learner_loss", "cluster"
REF_IMG, REF_TXT, LEARNER_IMG, LEARNER_TXT = "ref_img", "ref_txt", "learner_img", "learner_txt"
EMBEDDINGS = {"ref": (REF_IMG, REF_TXT), "learner": (LEARNER_IMG, LEARNER_TXT)}


def score_columns(learner: bool) -> list[str]:
    """The cache's score columns: clip_score, ref_loss and, with a learner, learner_loss."""
    return [CLIP_SCORE, REF_LOSS, *([LEARNER_LOSS] if learner else [])]


def layout(
    key_width: int,
    uid_width: int,
    ref: ScoreSet,
    learner: ScoreSet | None,
    cluster: bool,
    embeddings: bool,
) -> np.dtype:
    """The cache's columns as one record: the cache holds one .npy per field, a scatter bucket
    whole records."""
    columns: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [
        (PART, "<i4"),
        (INDEX, "<i4"),
        (KEY, f"S{key_width}"),
        (UID, f"S{uid_width}"),
        (CLIP_SCORE, "<f4"),
        (REF_LOSS, "<f4"),
    ]
    if learner is not None:
        columns.append((LEARNER_LOSS, "<f4"))
    if cluster:
        columns.append((CLUSTER, "<i4"))
    if embeddings:
        columns += [(name, "<f2", (ref.dim,)) for name in EMBEDDINGS["ref"]]
        if learner is not None:
            columns += [(name, "<f2", (learner.dim,)) for name in EMBEDDINGS["learner"]]
    return np.dtype(columns)


@dataclass
class Counts:
    rows: int = 0
    errors: int = 0
    below_min_clip_score: int = 0
    duplicates: int = 0
    excluded: int = 0  # ok rows an exclusion (select --exclude: decontaminate) made ineligible
    eligible: int = 0


COUNTS = tuple(f.name for f in fields(Counts))


def count_masks(
    ok: np.ndarray, low: np.ndarray, duplicate: np.ndarray, excluded: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The rows each Counts field counts, in COUNTS order; the last is the eligible rows."""
    return (np.ones_like(ok), ~ok, low, duplicate, excluded, ok & ~low & ~duplicate & ~excluded)


@dataclass(frozen=True)
class Filters:
    """What makes an ok row ineligible: a low clip_score, being a duplicate (dedup), or being
    excluded (decontaminate: a near copy of an evaluation image)."""

    min_clip: float | None = None
    dropped: dict[str, np.ndarray] | None = None  # shard -> indexes dedup dropped
    clusters: dict[str, np.ndarray] | None = None  # shard -> dedup cluster by index
    excluded: dict[str, np.ndarray] | None = None  # shard -> indexes an exclusion names


def identities(part: str, table: pa.Table) -> np.ndarray:
    """Each row's identity for partitioning array tasks: its uid, else "PART/KEY" (bytes)."""
    keys = table.column("key").to_pylist()
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else [None] * len(keys)
    values = [u.encode() if u else f"{part}/{k}".encode() for u, k in zip(uids, keys, strict=True)]
    return np.array(values, dtype=bytes) if values else np.zeros(0, dtype="S1")


def check_same_parts(ref: ScoreSet, learner: ScoreSet | None) -> None:
    """The learner joins the reference part by part: both must cover the same shards."""
    if learner is None:
        return
    ours, theirs = set(ref.part_names()), set(learner.part_names())
    if ours != theirs:
        raise JCError(
            f"learner and reference cover different shards ({len(ours - theirs)} only in "
            f"the reference, {len(theirs - ours)} only in the learner): score both from "
            "the same inputs"
        )


def join_learner(name: str, ref: pa.Table, learner: pa.Table | None) -> None:
    """...and row by row: the same samples in the same order in each part."""
    if learner is None:
        return
    if ref.num_rows != learner.num_rows or not ref.column("key").equals(learner.column("key")):
        raise JCError(
            f"learner and reference differ in part {name} (other samples or order): "
            "score both from the same shards"
        )


def eligible_masks(
    ref: pa.Table, learner: pa.Table | None, filters: Filters | None, shard: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: ok (status ok in both sets), low (ok but below --min-clip-score), duplicate
    (ok, not low, but dropped by dedup) and excluded (ok, not low, not a duplicate, but named
    by an exclusion). Eligible is ok & ~low & ~duplicate & ~excluded."""
    filters = filters or Filters()
    ok = np.asarray(ref.column("status").to_numpy(zero_copy_only=False)) == "ok"
    if learner is not None:
        ok &= np.asarray(learner.column("status").to_numpy(zero_copy_only=False)) == "ok"
    low = np.zeros(len(ok), dtype=bool)
    if filters.min_clip is not None:
        clip = ref.column("clip_score").fill_null(-np.inf).to_numpy()
        low = ok & (clip < filters.min_clip)
    duplicate = _named(filters.dropped, shard, len(ok)) & ok & ~low
    excluded = _named(filters.excluded, shard, len(ok)) & ok & ~low & ~duplicate
    return ok, low, duplicate, excluded


def _named(rows: dict[str, np.ndarray] | None, shard: str, n: int) -> np.ndarray:
    """The rows of a shard's n that `rows` (shard -> indexes) names."""
    mask = np.zeros(n, dtype=bool)
    if rows is not None and shard in rows:
        idx = rows[shard]
        mask[idx[idx < n]] = True
    return mask


def _eligible(
    ref: pa.Table,
    learner: pa.Table | None,
    filters: Filters | None,
    counts: Counts,
    shard: str,
) -> np.ndarray:
    masks = count_masks(*eligible_masks(ref, learner, filters, shard))
    for name, mask in zip(COUNTS, masks, strict=True):
        setattr(counts, name, getattr(counts, name) + int(mask.sum()))
    return masks[-1]


@dataclass
class Scan:
    """What the first pass learns: counts, each part's shard, the widths of the text columns."""

    counts: Counts
    shards: list[str]
    key_width: int
    uid_width: int


def scan(
    ref: ScoreSet,
    learner: ScoreSet | None,
    filters: Filters | None,
    on_part: Callable[[], None] | None = None,
) -> Scan:
    """First pass, small columns only: join check, eligibility counts, column widths."""
    check_same_parts(ref, learner)
    result = Scan(Counts(), [], 1, 1)
    for name in ref.part_names():
        table = ref.read_part(name, ["key", "shard", "status", "clip_score", "uid"])
        other = learner.read_part(name, ["key", "status"]) if learner else None
        join_learner(name, table, other)
        shard = table.column("shard")
        result.shards.append(shard[0].as_py() if len(shard) else name)
        ok = pa.array(_eligible(table, other, filters, result.counts, result.shards[-1]))
        widths = [
            pc.max(pc.binary_length(table.column(c).cast(pa.binary())).filter(ok)).as_py() or 0
            for c in ("key", "uid")
        ]
        result.key_width = max(result.key_width, widths[0])
        result.uid_width = max(result.uid_width, widths[1])
        if on_part:
            on_part()
    return result


def read_rows(
    ref: ScoreSet, learner: ScoreSet | None, name: str, embeddings: bool
) -> tuple[pa.Table, pa.Table | None]:
    """One part's columns that the cache is filled from, of the reference and the learner
    (joined: the same rows in the same order)."""
    emb = ["img_emb", "txt_emb"] if embeddings else []
    table = ref.read_part(
        name, ["key", "shard", "status", "clip_score", "index", "uid", "ref_loss", *emb]
    )
    other = learner.read_part(name, ["key", "status", "ref_loss", *emb]) if learner else None
    join_learner(name, table, other)
    return table, other


def row_values(
    table: pa.Table,
    other: pa.Table | None,
    keep: pa.Array,
    part_id: int,
    shard: str,
    clusters: dict[str, np.ndarray] | None,
    widths: tuple[int, int],
) -> dict[str, np.ndarray]:
    """The cache's columns of one part's kept rows (key and uid `widths` bytes wide;
    embeddings when the tables hold them; the dedup cluster when `clusters` is given)."""
    rows = table.filter(keep)
    values = {
        PART: np.full(rows.num_rows, part_id, dtype=np.int32),
        INDEX: rows.column("index").to_numpy(),
        KEY: fixed_bytes(rows.column("key"), widths[0]),
        UID: fixed_bytes(rows.column("uid"), widths[1]),
        CLIP_SCORE: rows.column("clip_score").to_numpy(),
        REF_LOSS: rows.column("ref_loss").to_numpy(),
    }
    if clusters is not None:
        known = clusters.get(shard)
        index = values[INDEX]
        cluster = np.full(len(index), -1, dtype=np.int32)
        if known is not None:
            inside = index < len(known)
            cluster[inside] = known[index[inside]]
        values[CLUSTER] = cluster
    if "img_emb" in table.column_names:
        values[REF_IMG] = embedding_rows(rows.column("img_emb"))
        values[REF_TXT] = embedding_rows(rows.column("txt_emb"))
    if other is not None:
        theirs = other.filter(keep)
        values[LEARNER_LOSS] = theirs.column("ref_loss").to_numpy()
        if "img_emb" in other.column_names:
            values[LEARNER_IMG] = embedding_rows(theirs.column("img_emb"))
            values[LEARNER_TXT] = embedding_rows(theirs.column("txt_emb"))
    return values


def fill_cache(
    ref: ScoreSet,
    learner: ScoreSet | None,
    found: Scan,
    directory: Path,
    filters: Filters | None,
    embeddings: bool,
    on_part: Callable[[], None] | None = None,
) -> RowCache:
    """Second pass: copy the eligible rows' columns into the flat cache."""
    n = found.counts.eligible
    clusters = filters.clusters if filters is not None else None
    widths = (found.key_width, found.uid_width)
    record = layout(*widths, ref, learner, clusters is not None, embeddings)
    directory.mkdir(parents=True, exist_ok=True)
    writers = column_writers(directory, record, n)
    try:
        for part_id, name in enumerate(ref.part_names()):
            table, other = read_rows(ref, learner, name, embeddings)
            shard = found.shards[part_id]
            ok = pa.array(_eligible(table, other, filters, Counts(), shard))
            values = row_values(table, other, ok, part_id, shard, clusters, widths)
            for column, data in values.items():
                writers[column].append(data)
            if on_part:
                on_part()
    finally:
        for writer in writers.values():
            writer.close()
        pa.default_memory_pool().release_unused()  # parts are read; give their buffers back
    return RowCache(directory, found.shards, n)
