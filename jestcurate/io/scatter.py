"""The shuffle behind partitioned select: rows go to array tasks by a hash of the row, but each
task reads only 1/N of the score set.

A partition by row hash is a uniform sample of the corpus whatever the shards' order, but every
part holds rows of every task: if each task read the parts itself, each would read the whole
score set (N times the corpus in all). So select's array tasks work in two rounds:

1. scatter: task s reads parts s, s+N, s+2N, ... once, keeps the eligible rows, and appends each
   row, as one fixed-width record of the columns select needs, to the bucket file of the task
   its hash names: OUT/tasks/scatter/SSSSS-of-NNNNN/to-JJJJJ.rec. It also writes index.npy (how
   many rows of each of its parts went to each task), counts.npy (each task's eligibility
   counts) and, last, done.json. The folder is built under a temporary name and renamed, so it
   is whole or absent. It keeps N bucket files open, and N scatters make N² files in all.
2. gather: once every scatter folder is done, task j reads its N bucket files, in the score
   set's part order (part p is in scatter p % N, in row order), into the same flat cache a
   single run builds, so its rows get the ids a single run over its partition would give.

Reading is then about 1/N of the corpus per task per round, and the bucket files hold what the
single run's cache would: one record per eligible row (about 4 D bytes per row for a reference
alone). A finished task deletes its buckets; the merge deletes the rest (with --ledger, it
deletes every bucket but keeps each scatter's done.json, index, counts and the notes of what
the filters said of each row, io/notes.py, so that a merge can be made again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.eligible import (
    CLUSTER,
    COUNTS,
    REF_IMG,
    Counts,
    Filters,
    check_same_parts,
    count_masks,
    eligible_masks,
    identities,
    layout,
    read_rows,
    row_values,
)
from jestcurate.io.notes import Notes
from jestcurate.io.rowcache import RowCache, column_writers
from jestcurate.io.store import ScoreSet, dead_local_writer, finished_output, write_json_atomic
from jestcurate.math.density import ClusterSums
from jestcurate.math.partition import task_of

DONE = "done.json"
INDEX = "index.npy"  # (tasks x parts of this scatter): rows of each part bucketed per task
COUNTS_FILE = "counts.npy"  # (tasks x Counts fields): each task's Counts among these parts
SUMS_FILE = "cluster-sums.npz"  # --cluster-quotas: ClusterSums, and rows per (task, cluster)


def scatter_directory(root: Path, task: int, count: int) -> Path:
    return root / f"{task:05d}-of-{count:05d}"


def bucket(directory: Path, destination: int) -> Path:
    return directory / f"to-{destination:05d}.rec"


def _record(
    key_width: int, uid_width: int, ref: ScoreSet, learner: ScoreSet | None, columns: set[str]
) -> np.dtype:
    """A bucket record: the cache's columns (done.json records which optional ones)."""
    return layout(key_width, uid_width, ref, learner, "cluster" in columns, "embeddings" in columns)


def _width(table: pa.Table, column: str) -> int:
    lengths = pc.binary_length(table.column(column).cast(pa.binary()))
    return max(1, pc.max(lengths).as_py() or 0)


def _remove_stale_partials(final: Path) -> None:
    """Partial folders of this scatter left by killed runs on this host."""
    for partial in final.parent.glob(f".{final.name}.*.partial"):
        host, _, pid = partial.name.removesuffix(".partial").rpartition(".")
        host = host.removeprefix(f".{final.name}.")
        if pid.isdigit() and dead_local_writer(host, int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _check_open_files(count: int) -> None:
    """A scatter keeps one bucket file per task open: raise the soft limit if it is too low."""
    import resource

    need = count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise JCError(
        f"{count} tasks need {need} open files per task but the limit is {hard} "
        "(ulimit -n); use fewer tasks or raise the limit"
    )


def scatter(
    ref: ScoreSet,
    learner: ScoreSet | None,
    filters: Filters,
    embeddings: bool,
    root: Path,
    task: int,
    count: int,
    identity: dict[str, Any],
    on_part: Callable[[], None] | None = None,
    notes: bool = False,
    sums: bool = False,
) -> dict[str, Any]:
    """Round 1 for task `task` of `count`: bucket the eligible rows of this task's parts (and,
    with `notes`, save what the filters said of each row: io/notes.py; with `sums`, each dedup
    cluster's ClusterSums and rows per destination task, for global --cluster-quotas).
    Returns done.json (reused when an identical scatter is already finished)."""
    final = scatter_directory(root, task, count)
    existing = read_done(final, identity, notes, sums)
    if existing is not None:
        return existing
    names = ref.part_names()
    mine = list(range(task, len(names), count))
    check_same_parts(ref, learner)
    columns = {"embeddings"} if embeddings else set()
    if filters.clusters is not None:
        columns.add("cluster")
    key_width = uid_width = 1
    for p in mine:  # widths first: records are fixed width
        small = ref.read_part(names[p], ["key", "uid"])
        key_width, uid_width = (
            max(key_width, _width(small, "key")),
            max(uid_width, _width(small, "uid")),
        )
    dtype = _record(key_width, uid_width, ref, learner, columns)
    _remove_stale_partials(final)
    _check_open_files(count)
    partial = final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts = np.zeros((count, len(filters.names)), dtype=np.int64)  # per destination task
    index = np.zeros((count, len(mine)), dtype=np.int64)  # rows of each part per task
    shards: list[str] = []
    noted = Notes() if notes else None
    found = _Sums() if sums else None
    files = [open(bucket(partial, j), "wb") for j in range(count)]  # noqa: SIM115 (closed below)
    try:
        for q, p in enumerate(mine):
            name = names[p]
            table, other = read_rows(ref, learner, name, embeddings, filters.columns)
            shard_col = table.column("shard")
            shard = shard_col[0].as_py() if len(shard_col) else name
            shards.append(shard)
            dest = task_of(identities(name, table), count)
            masks = count_masks(*eligible_masks(table, other, filters, shard, noted))
            for c, mask in enumerate(masks):
                counts[:, c] += np.bincount(dest[mask], minlength=count)
            keep = masks[-1]
            widths = (key_width, uid_width)
            values = row_values(
                table, other, pa.array(keep), p, shard, filters.clusters, widths, embeddings
            )
            records = np.zeros(int(keep.sum()), dtype=dtype)
            for column, data in values.items():
                records[column] = data
            where = dest[keep]
            if found is not None:
                found.add(where, records[CLUSTER], records[REF_IMG])
            order = np.argsort(where, kind="stable")  # row order kept within each task
            sizes = np.bincount(where, minlength=count)
            index[:, q] = sizes
            start = 0
            for j in np.flatnonzero(sizes).tolist():
                files[j].write(records[order[start : start + sizes[j]]].tobytes())
                start += int(sizes[j])
            if on_part:
                on_part()
    finally:
        for f in files:
            f.close()
        pa.default_memory_pool().release_unused()
    for name, array in ((INDEX, index), (COUNTS_FILE, counts)):
        with open(partial / name, "wb") as f:
            np.save(f, array)
    if found is not None:
        found.save(partial / SUMS_FILE)
    done = {
        **identity,
        "task": task,
        "parts": mine,
        "shards": shards,
        "key_width": key_width,
        "uid_width": uid_width,
        "columns": sorted(columns),
        **({"counts": list(filters.names)} if filters.rows else {}),  # counts.npy's columns
        **({"notes": noted.save(partial)} if noted is not None else {}),
        **({"cluster_sums": SUMS_FILE} if found is not None else {}),
    }
    write_json_atomic(partial / DONE, done)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return done


def read_done(
    directory: Path, identity: dict[str, Any], notes: bool = False, sums: bool = False
) -> dict[str, Any] | None:
    """A finished scatter's done.json, None if unfinished (or, wanting `notes` or `sums`, made
    without them); an error if made for other inputs."""
    done = finished_output(directory, DONE, DONE, identity, "scatter (of another selection)")
    if done is None or (notes and "notes" not in done) or (sums and "cluster_sums" not in done):
        return None
    return done


class _Sums:
    """A scatter's ClusterSums of its eligible rows, and rows per (destination task, cluster)."""

    def __init__(self) -> None:
        self.sums: ClusterSums | None = None
        self.pairs: list[np.ndarray] = []

    def add(self, task: np.ndarray, cluster: np.ndarray, emb: np.ndarray) -> None:
        part = ClusterSums.of(cluster, emb)
        self.sums = part if self.sums is None else self.sums.plus(part)
        pairs, rows = np.unique(np.stack([task, cluster]).astype(np.int64), axis=1,
                                return_counts=True)  # fmt: skip
        self.pairs.append(np.vstack([pairs, rows]))

    def save(self, path: Path) -> None:
        s = self.sums or ClusterSums.empty(1)
        both = np.concatenate(self.pairs, axis=1) if self.pairs else np.zeros((3, 0), np.int64)
        pairs, where = np.unique(both[:2], axis=1, return_inverse=True)
        rows = np.bincount(where.ravel(), weights=both[2], minlength=pairs.shape[1])
        np.savez(path, ids=s.ids, sums=s.sums, finite=s.finite, rows=s.rows,
                 pairs=np.vstack([pairs, rows.astype(np.int64)]))  # fmt: skip


def total_sums(root: Path, count: int) -> tuple[ClusterSums, np.ndarray]:
    """Every scatter's ClusterSums added up (the whole pool's), and the rows of each
    (task, cluster) pair: a (3 x pairs) array of task, cluster, rows."""
    total: ClusterSums | None = None
    pairs = []
    for s in range(count):
        with np.load(scatter_directory(root, s, count) / SUMS_FILE) as f:
            found = ClusterSums(f["ids"], f["sums"], f["finite"], f["rows"])
            pairs.append(f["pairs"])
        total = found if total is None else total.plus(found)
    assert total is not None
    both = np.concatenate(pairs, axis=1)
    keys, where = np.unique(both[:2], axis=1, return_inverse=True)
    rows = np.bincount(where.ravel(), weights=both[2], minlength=keys.shape[1])
    return total, np.vstack([keys, rows.astype(np.int64)])


def read_notes(root: Path, dones: list[dict[str, Any]]) -> Callable[[int], tuple[Notes, int]]:
    """For the merge's ledger: part p's notes are part p // N of scatter p % N's."""
    count = len(dones)
    if any("notes" not in d for d in dones):
        raise JCError(
            f"the scatters in {root} were made without --ledger, so the merge has no notes of "
            "the filters to write a ledger from: rerun the tasks with --ledger"
        )
    loaded = [Notes.load(scatter_directory(root, s, count), d["notes"])
              for s, d in enumerate(dones)]  # fmt: skip
    return lambda part_id: (loaded[part_id % count], part_id // count)


def _row(root: Path, s: int, count: int, name: str, task: int) -> np.ndarray:
    """Task `task`'s row of one scatter's (count x ...) array, without loading the rest."""
    return np.array(np.load(scatter_directory(root, s, count) / name, mmap_mode="r")[task])


def counts_for(root: Path, count: int, task: int, names: tuple[str, ...] = COUNTS) -> Counts:
    """The eligibility counts of task `task`'s partition, summed over every scatter (`names`:
    counts.npy's columns, done.json's "counts" where select's other filters added some)."""
    total = sum(_padded(_row(root, s, count, COUNTS_FILE, task)) for s in range(count))
    return Counts.of(names, list(map(int, total)))


def total_counts(root: Path, count: int, names: tuple[str, ...] = COUNTS) -> Counts:
    """The eligibility counts of the whole score set: every task's, summed over every scatter
    (each task learns them once round 1 is done)."""
    total = 0
    for s in range(count):
        rows = np.load(scatter_directory(root, s, count) / COUNTS_FILE)
        total = total + sum(_padded(row) for row in rows)
    return Counts.of(names, list(map(int, total)))


def _padded(row: np.ndarray) -> np.ndarray:
    """A scatter's counts from before the `excluded` count (none were excluded then), so that
    old and new scatters of one interrupted select sum alike."""
    if len(row) == len(COUNTS) - 1:
        return np.insert(row, COUNTS.index("excluded"), 0)
    return row


def gather(
    ref: ScoreSet,
    learner: ScoreSet | None,
    root: Path,
    dones: list[dict[str, Any]],
    task: int,
    cache_dir: Path,
    on_part: Callable[[], None] | None = None,
) -> RowCache:
    """Round 2 for `task`: its buckets from every scatter, in part order, as the flat cache."""
    count = len(dones)
    names = ref.part_names()
    shards = [""] * len(names)
    for done in dones:
        for p, shard in zip(done["parts"], done["shards"], strict=True):
            shards[p] = shard
    key_width = max(d["key_width"] for d in dones)
    uid_width = max(d["uid_width"] for d in dones)
    columns = set(dones[0]["columns"])
    out_dtype = _record(key_width, uid_width, ref, learner, columns)
    indexes = [_row(root, s, count, INDEX, task) for s in range(count)]  # parts/N values each
    dtypes = [_record(d["key_width"], d["uid_width"], ref, learner, columns) for d in dones]
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = sum(int(rows.sum()) for rows in indexes)  # this task's eligible rows
    writers = column_writers(cache_dir, out_dtype, n)
    files = []
    try:
        for s in range(count):
            path = bucket(scatter_directory(root, s, count), task)
            if not path.is_file():
                raise JCError(f"{path} is missing; remove {root.parent} and rerun every task")
            files.append(open(path, "rb"))  # noqa: SIM115 (closed below)
        for p in range(len(names)):
            s, q = p % count, p // count
            rows = int(indexes[s][q])
            if rows:
                data = files[s].read(rows * dtypes[s].itemsize)
                records = np.frombuffer(data, dtype=dtypes[s])
                if len(records) != rows:
                    raise JCError(f"a bucket of {scatter_directory(root, s, count)} is short")
                for name, writer in writers.items():
                    writer.append(records[name])
            if on_part:
                on_part()
    finally:
        for f in files:
            f.close()
        for writer in writers.values():
            writer.close()
    return RowCache(cache_dir, shards, n)


def drop_all_buckets(root: Path) -> None:
    """Every scatter's buckets (the merge's, once every task has selected)."""
    for path in root.glob("*-of-*/to-*.rec"):
        path.unlink(missing_ok=True)


def drop_buckets(root: Path, task: int, count: int) -> None:
    """A finished task's buckets are no longer needed: free their space."""
    for s in range(count):
        with contextlib.suppress(FileNotFoundError):
            bucket(scatter_directory(root, s, count), task).unlink()
