"""The ledger of array tasks, part by part (docs/select.md, "Ledger: array tasks").

The merge fixes what every task kept, then records the ledger in summary.json as pending
({"folder", "parts", "status": "pending"}): the manifest is readable from then on. The ledger's
parts are then written by whoever runs this round: task t of N writes the parts whose index is
t (mod N) (`select --task-index t --num-tasks N --ledger` again, after the merge), a merge
that keeps the ledger to itself writes them all. Each part is OUT/ledger/NAME.parquet, the
same bytes a merge writing every part gives, written to a temporary name and renamed, beside
OUT/ledger/.counts/NAME.json (its rows by fate and reason, its eligible rows and bytes),
written first. A finished part is skipped by a rerun. Whoever finds every part written last
rewrites summary.json with `fates` and the ledger's facts, as a merge that wrote the ledger
itself would have them (no `status`): the ledger is complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jestcurate.errors import JCError
from jestcurate.io import scatter as scatter_mod
from jestcurate.io.files import atomic_write
from jestcurate.io.store import read_json, write_json_atomic
from jestcurate.pipelines.select.config import LEDGER_DIR, SCATTER_DIR, SUMMARY, TASKS_DIR
from jestcurate.pipelines.select.ledger import LedgerSource, _count, ledger_record

PENDING = "pending"
COUNTS_DIR = ".counts"  # OUT/ledger/.counts/NAME.json: one written part's counts


def pending(parts: int) -> dict[str, Any]:
    """summary.json's `ledger` while its parts are still to be written."""
    return {"folder": LEDGER_DIR, "parts": parts, "status": PENDING}


def is_pending(summary: dict[str, Any]) -> bool:
    return (summary.get("ledger") or {}).get("status") == PENDING


def share(parts: int, index: int, count: int) -> list[int]:
    """The parts task `index` of `count` writes: those whose index is `index` (mod `count`)."""
    return list(range(index, parts, count))


def first_ids(out: Path, count: int, parts: int) -> np.ndarray:
    """(parts x tasks): the cache id of part p's first eligible row of each task, from the
    scatters' index.npy (how many rows of each part went to each task)."""
    root = out / TASKS_DIR / SCATTER_DIR
    sizes = np.zeros((parts, count), dtype=np.int64)
    for s in range(count):
        index = np.load(scatter_mod.scatter_directory(root, s, count) / scatter_mod.INDEX)
        sizes[s::count] = index.T[: len(range(s, parts, count))]
    return np.cumsum(sizes, axis=0) - sizes


def written(out: Path, name: str) -> bool:
    """Whether the part `name` is finished (its counts are written before it)."""
    folder = out / LEDGER_DIR
    return all(
        p.is_file() for p in (folder / f"{name}.parquet", folder / COUNTS_DIR / f"{name}.json")
    )


def write_parts(
    out: Path,
    source: LedgerSource,
    parts: list[int],
    on_part: Callable[[], None] | None = None,
) -> int:
    """Write the ledger parts `parts` (ids) that are not written yet; returns how many it
    wrote. `source.resolve`: ledger.merged with `first_ids`, so that any part can go first."""
    folder = out / LEDGER_DIR
    (folder / COUNTS_DIR).mkdir(parents=True, exist_ok=True)
    names = source.ref.part_names()
    done = 0
    for part_id in parts:
        name = names[part_id]
        if not written(out, name):
            _write_part(folder, source, (part_id, name))
            done += 1
        if on_part:
            on_part()
    return done


def _write_part(folder: Path, source: LedgerSource, part: tuple[int, str]) -> None:
    name = part[1]
    ledger, eligible = source.part(part)
    counts: Counter[tuple[str, str]] = Counter()
    _count(ledger, counts)
    counts_path = folder / COUNTS_DIR / f"{name}.json"

    def write(tmp: Path) -> None:  # the counts first, then (atomic_write) the part's rename
        pq.write_table(ledger, tmp, compression="zstd", write_page_checksum=True)
        facts = {"part": part[0], "rows": ledger.num_rows, "eligible": eligible,
                 "bytes": tmp.stat().st_size,
                 "fates": [[f, r, n] for (f, r), n in sorted(counts.items())]}  # fmt: skip
        write_json_atomic(counts_path, facts)

    atomic_write(folder / f"{name}.parquet", write)  # temp named by host and pid, fsynced


def progress(out: Path, names: list[str] | None = None) -> int:
    """How many of the parts (`names`; None: whichever are there) are written."""
    if names is None:
        names = [p.stem for p in (out / LEDGER_DIR).glob("*.parquet")]
    return sum(written(out, name) for name in names)


def written_ids(out: Path) -> set[int]:
    """The part ids written, from the files alone (each part's counts name its id): for
    `slurm select --retry`, `local` and status, which do not open the score set."""
    folder = out / LEDGER_DIR
    found: set[int] = set()
    for path in (folder / COUNTS_DIR).glob("*.json"):
        try:
            part = int(read_json(path)["part"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or half there: the part is written again
        if (folder / f"{path.stem}.parquet").is_file():
            found.add(part)
    return found


def tasks_left(out: Path, parts: int, count: int) -> list[int]:
    """The tasks of `count` with a part of the `parts` still to write (task I: the parts I
    mod `count`); for a pending ledger with every part written, task 0: only finish() is
    left (the last writer was killed before it, or it failed), which any task's rerun runs."""
    done = written_ids(out)
    left = [i for i in range(count) if any(p not in done for p in share(parts, i, count))]
    return left or ([0] if count else [])


def read_summary(out: Path) -> dict[str, Any]:
    """OUT/summary.json, or a one-line refusal where it cannot be read; {} where it is not."""
    path = out / SUMMARY
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable ({exc}): rerun the merge (select --merge) "
                      "or remove the selection") from None  # fmt: skip


def still_written(selection: Path, summary: dict[str, Any]) -> str | None:
    """For `info --why` and status: "the ledger is still being written (k of K parts)" while
    it is pending, else None."""
    if not is_pending(summary):
        return None
    parts = summary["ledger"]["parts"]
    return (
        f"the ledger of {selection} is still being written ({progress(selection):,} of "
        f"{parts:,} parts): run every array task again with --ledger after the merge (each "
        "writes its share), or select --merge --ledger to write the rest in one run"
    )


def finish(out: Path, names: list[str]) -> dict[str, Any] | None:
    """Once every part is written: summary.json with `fates` and the ledger's facts (rewritten
    atomically; the same for whoever does it); else None."""
    summary = read_json(out / SUMMARY)
    if not is_pending(summary):
        return summary
    if progress(out, names) < len(names):
        return None
    folder = out / LEDGER_DIR
    counts: Counter[tuple[str, str]] = Counter()
    rows = size = eligible = 0
    for name in names:
        facts = read_json(folder / COUNTS_DIR / f"{name}.json")
        rows, size = rows + facts["rows"], size + facts["bytes"]
        eligible += facts["eligible"]
        for fate, reason, n in facts["fates"]:
            counts[(fate, reason)] += n
    chosen_from = int(summary["counts"]["eligible"])
    record = ledger_record(counts, len(names), rows, size, eligible, chosen_from)
    done: dict[str, Any] = {}
    for key, value in summary.items():  # the keys in the order a merge writing it gives
        if key == "ledger":
            done["fates"] = record["fates"]
            value = record["ledger"]
        done[key] = value
    write_json_atomic(out / SUMMARY, done)
    return done
