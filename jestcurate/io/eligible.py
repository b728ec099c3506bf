"""The eligible rows of a score set (or of a reference and learner pair), copied into a flat
on-disk cache: fixed-width .npy columns read back by row id with positioned reads, so memory
does not grow with the corpus (docs/architecture.md says why not Arrow or memory maps).

Two passes over the parts: `scan` reads the small columns (join check, eligibility counts,
text column widths), `fill_cache` copies the eligible rows. select and the online selector
share both, so they see the same rows under the same ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.rowcache import ColumnWriter, RowCache, embedding_rows, fixed_bytes
from jestcurate.io.store import ScoreSet


@dataclass
class Counts:
    rows: int = 0
    errors: int = 0
    below_min_clip_score: int = 0
    duplicates: int = 0
    eligible: int = 0


@dataclass(frozen=True)
class Filters:
    """What makes an ok row ineligible: a low clip_score, or being a duplicate (dedup)."""

    min_clip: float | None = None
    dropped: dict[str, np.ndarray] | None = None  # shard -> indexes dedup dropped
    clusters: dict[str, np.ndarray] | None = None  # shard -> dedup cluster by index


def identities(part: str, table: pa.Table) -> np.ndarray:
    """Each row's identity for partitioning array tasks: its uid, else "PART/KEY" (bytes)."""
    keys = table.column("key").to_pylist()
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else [None] * len(keys)
    values = [u.encode() if u else f"{part}/{k}".encode() for u, k in zip(uids, keys, strict=True)]
    return np.array(values, dtype=bytes) if values else np.zeros(0, dtype="S1")


def _join_learner(name: str, ref: pa.Table, learner: pa.Table) -> None:
    if ref.num_rows != learner.num_rows or not ref.column("key").equals(learner.column("key")):
        raise JCError(
            f"learner and reference differ in part {name} (other samples or order): "
            "score both from the same shards"
        )


def eligible_masks(
    ref: pa.Table, learner: pa.Table | None, filters: Filters | None, shard: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: ok (status ok in both sets), low (ok but below --min-clip-score) and duplicate
    (ok, not low, but dropped by dedup). Eligible is ok & ~low & ~duplicate."""
    filters = filters or Filters()
    ok = np.asarray(ref.column("status").to_numpy(zero_copy_only=False)) == "ok"
    if learner is not None:
        ok &= np.asarray(learner.column("status").to_numpy(zero_copy_only=False)) == "ok"
    low = np.zeros(len(ok), dtype=bool)
    if filters.min_clip is not None:
        clip = ref.column("clip_score").fill_null(-np.inf).to_numpy()
        low = ok & (clip < filters.min_clip)
    duplicate = np.zeros(len(ok), dtype=bool)
    if filters.dropped is not None and shard in filters.dropped:
        idx = filters.dropped[shard]
        duplicate[idx[idx < len(ok)]] = True
        duplicate &= ok & ~low
    return ok, low, duplicate


def _eligible(
    ref: pa.Table,
    learner: pa.Table | None,
    filters: Filters | None,
    counts: Counts,
    shard: str,
) -> np.ndarray:
    ok, low, duplicate = eligible_masks(ref, learner, filters, shard)
    keep = ok & ~low & ~duplicate
    counts.rows += len(ok)
    counts.errors += int((~ok).sum())
    counts.below_min_clip_score += int(low.sum())
    counts.duplicates += int(duplicate.sum())
    counts.eligible += int(keep.sum())
    return keep


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
    names = ref.part_names()
    if learner is not None:
        ours, theirs = set(names), set(learner.part_names())
        if ours != theirs:
            raise JCError(
                f"learner and reference cover different shards ({len(ours - theirs)} only in "
                f"the reference, {len(theirs - ours)} only in the learner): score both from "
                "the same inputs"
            )
    result = Scan(Counts(), [], 1, 1)
    for name in names:
        table = ref.read_part(name, ["key", "shard", "status", "clip_score", "uid"])
        other = learner.read_part(name, ["key", "status"]) if learner else None
        if other is not None:
            _join_learner(name, table, other)
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


def row_values(
    table: pa.Table,
    other: pa.Table | None,
    keep: pa.Array,
    part_id: int,
    shard: str,
    clusters: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """The cache's numeric columns of one part's kept rows (embeddings when the tables hold
    them; the dedup cluster when `clusters` is given); key and uid are left to the caller."""
    rows = table.filter(keep)
    values = {
        "part": np.full(rows.num_rows, part_id, dtype=np.int32),
        "index": rows.column("index").to_numpy(),
        "clip_score": rows.column("clip_score").to_numpy(),
        "ref_loss": rows.column("ref_loss").to_numpy(),
    }
    if clusters is not None:
        known = clusters.get(shard)
        index = values["index"]
        cluster = np.full(len(index), -1, dtype=np.int32)
        if known is not None:
            inside = index < len(known)
            cluster[inside] = known[index[inside]]
        values["cluster"] = cluster
    if "img_emb" in table.column_names:
        values["ref_img"] = embedding_rows(rows.column("img_emb"))
        values["ref_txt"] = embedding_rows(rows.column("txt_emb"))
    if other is not None:
        theirs = other.filter(keep)
        values["learner_loss"] = theirs.column("ref_loss").to_numpy()
        if "img_emb" in other.column_names:
            values["learner_img"] = embedding_rows(theirs.column("img_emb"))
            values["learner_txt"] = embedding_rows(theirs.column("txt_emb"))
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
    columns: dict[str, tuple[str, tuple[int, ...]]] = {
        "part": ("<i4", ()),
        "index": ("<i4", ()),
        "key": (f"S{found.key_width}", ()),
        "uid": (f"S{found.uid_width}", ()),
        "clip_score": ("<f4", ()),
        "ref_loss": ("<f4", ()),
    }
    if learner is not None:
        columns["learner_loss"] = ("<f4", ())
    if filters is not None and filters.clusters is not None:
        columns["cluster"] = ("<i4", ())
    if embeddings:
        columns["ref_img"] = columns["ref_txt"] = ("<f2", (ref.dim,))
        if learner is not None:
            columns["learner_img"] = columns["learner_txt"] = ("<f2", (learner.dim,))
    directory.mkdir(parents=True, exist_ok=True)
    writers = {
        name: ColumnWriter(directory / f"{name}.npy", dtype, (n, *shape))
        for name, (dtype, shape) in columns.items()
    }
    emb_cols = ["img_emb", "txt_emb"] if embeddings else []
    try:
        for part_id, name in enumerate(ref.part_names()):
            table = ref.read_part(
                name, ["status", "clip_score", "key", "index", "uid", "ref_loss", *emb_cols]
            )
            other = learner.read_part(name, ["status", "ref_loss", *emb_cols]) if learner else None
            ok = pa.array(_eligible(table, other, filters, Counts(), found.shards[part_id]))
            clusters = filters.clusters if filters and "cluster" in writers else None
            values = row_values(table, other, ok, part_id, found.shards[part_id], clusters)
            values["key"] = fixed_bytes(table.column("key").filter(ok), found.key_width)
            values["uid"] = fixed_bytes(table.column("uid").filter(ok), found.uid_width)
            for column, data in values.items():
                writers[column].append(data)
            if on_part:
                on_part()
    finally:
        for writer in writers.values():
            writer.close()
        pa.default_memory_pool().release_unused()  # parts are read; give their buffers back
    return RowCache(directory, found.shards, n)
