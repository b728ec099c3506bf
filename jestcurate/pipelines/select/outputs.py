"""What a selection writes into OUT: manifest.parquet in step order, uids.npy (DataComp's
subset format) and, last, summary.json (built here once, for a run, a task and a merge)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate import __version__
from jestcurate.io.eligible import (
    CLIP_SCORE,
    INDEX,
    KEY,
    LEARNER_LOSS,
    PART,
    REF_LOSS,
    UID,
    score_columns,
)
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import atomic_write, file_digests, write_json_atomic
from jestcurate.pipelines.select.config import (
    LEDGER_DIR,
    MANIFEST,
    SELECTION_SCHEMA_VERSION,
    SUMMARY,
    TASKS_DIR,
    UIDS,
)


def manifest_schema(learner: bool) -> pa.Schema:
    fields = [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("ref_loss", pa.float32()),
    ]
    if learner:
        fields.append(pa.field("learner_loss", pa.float32()))
    fields.append(pa.field("score", pa.float32()))
    version = str(SELECTION_SCHEMA_VERSION)
    return pa.schema(fields, metadata={"jestcurate.selection_schema_version": version})


class Means:
    """Running sums of the stored scores, to report means of kept vs dropped rows."""

    COLUMNS = (*score_columns(learner=True), "learnability")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.COLUMNS, 0.0)
        self.count = 0

    def add(self, columns: dict[str, np.ndarray]) -> None:
        if LEARNER_LOSS in columns:
            columns = {**columns, "learnability": columns[LEARNER_LOSS] - columns[REF_LOSS]}
        for name, values in columns.items():
            if name in self.sums:
                self.sums[name] += float(np.asarray(values, dtype=np.float64).sum())
        self.count += len(columns[CLIP_SCORE])

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sums": dict(self.sums)}

    def merge(self, state: dict[str, Any]) -> None:
        self.count += int(state["count"])
        for name, value in state["sums"].items():
            self.sums[name] += float(value)

    def means(self, learner: bool, minus: Means | None = None) -> dict[str, float | None]:
        count = self.count - (minus.count if minus else 0)
        out: dict[str, float | None] = {}
        for name in self.COLUMNS:
            if not learner and name in (LEARNER_LOSS, "learnability"):
                continue
            total = self.sums[name] - (minus.sums[name] if minus else 0.0)
            out[name] = round(total / count, 6) if count else None
        return out


def _score_columns(cache: RowCache, ids: np.ndarray, learner: bool) -> dict[str, np.ndarray]:
    return {name: cache.read(name, ids) for name in score_columns(learner)}


def _uid_halves(uids: np.ndarray) -> np.ndarray | None:
    """128-bit hex uids (bytes) as an (n, 2) array of their high and low 64-bit halves, or None
    if any uid is not 32 hex digits."""
    if uids.dtype.itemsize < 32 or any(len(u) != 32 for u in uids.tolist()):
        return None
    try:
        raw = bytes.fromhex(b"".join(uids.tolist()).decode("ascii"))
    except ValueError:
        return None
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def write_manifest(
    path: Path,
    cache: RowCache,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    learner: bool,
) -> tuple[Means, np.ndarray | None]:
    """Write the manifest in step order, one row group per step; returns the kept rows' score
    sums and, when every kept row has a 128-bit hex uid, their uid halves."""
    schema = manifest_schema(learner)
    kept = Means()
    halves: list[np.ndarray] | None = []
    shard_names = pa.array(cache.shards, type=pa.string())

    def write(tmp: Path) -> None:
        nonlocal halves
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer:
            for step, (ids, scores) in enumerate(batches):
                n = len(ids)
                columns = _score_columns(cache, ids, learner)
                kept.add(columns)
                uid = cache.read(UID, ids)
                if halves is not None:
                    pairs = _uid_halves(uid)
                    halves = None if pairs is None else [*halves, pairs]
                arrays = {
                    "step": pa.array(np.full(n, step, dtype=np.int64)),
                    "position": pa.array(np.arange(n, dtype=np.int32)),
                    "shard": shard_names.take(pa.array(cache.read(PART, ids))),
                    "key": pa.array(np.char.decode(cache.read(KEY, ids), "utf-8")),
                    "index": pa.array(cache.read(INDEX, ids)),
                    "uid": pa.array(
                        [u.decode("utf-8") if u else None for u in uid.tolist()], pa.string()
                    ),
                    **{k: pa.array(v, pa.float32()) for k, v in columns.items()},
                    "score": pa.array(scores, pa.float32(), from_pandas=True),
                }
                writer.write_table(pa.table(arrays, schema=schema), row_group_size=max(n, 1))

    atomic_write(path, write)
    return kept, (np.concatenate(halves) if halves else None)


def datacomp_uids(halves: np.ndarray) -> np.ndarray:
    """DataComp's subset format: a sorted structured array of the uids' two 64-bit halves."""
    array = np.empty(len(halves), dtype=np.dtype("u8,u8"))
    array["f0"], array["f1"] = halves[:, 0], halves[:, 1]
    array.sort()
    return array


def write_summary(
    out: Path,
    identity: dict[str, Any],
    counts: dict[str, Any],
    kept: Means,
    eligible: Means,
    subset: np.ndarray | None,
    images: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Write uids.npy (`subset`, or none) and, last, summary.json: its presence means the
    selection is whole. `eligible` holds every eligible row's sums: dropped = eligible - kept.
    `images` is false for a set imported from embeddings: nothing to export or load (recorded
    here, so the check holds after the score set moves)."""
    if subset is not None:
        atomic_write(out / UIDS, lambda tmp: _save_npy(tmp, subset))
    else:
        with contextlib.suppress(FileNotFoundError):
            (out / UIDS).unlink()
    learner = identity["inputs"]["learner"] is not None
    summary = {
        **identity,
        "schema_version": SELECTION_SCHEMA_VERSION,
        "tool_version": __version__,
        "counts": counts,
        "means": {"kept": kept.means(learner), "dropped": eligible.means(learner, minus=kept)},
        "outputs": {
            "manifest": MANIFEST,
            "uids": UIDS if subset is not None else None,
            "images": images,
        },
        **extra,
        "files": file_digests(out, [MANIFEST, UIDS]),  # what `jestcurate verify` checks
    }
    write_json_atomic(out / SUMMARY, summary)
    return summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def remove_selection(out: Path) -> None:
    """What select (and its export) wrote into OUT, summary first: an interrupted removal
    leaves an unfinished selection, which the next run redoes. Other files are left alone."""
    from jestcurate.pipelines.export import SHARD_LIST, SHARDS_DIR

    if not out.is_dir():
        return
    for name in (SUMMARY, MANIFEST, UIDS, SHARD_LIST):
        (out / name).unlink(missing_ok=True)
    for name in (TASKS_DIR, SHARDS_DIR, LEDGER_DIR, f".{LEDGER_DIR}.partial", ".cache"):
        shutil.rmtree(out / name, ignore_errors=True)
