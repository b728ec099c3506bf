"""A score set's parts against their completion markers: what is damaged, missing or orphaned,
and what a rerun must redo or set aside."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import first_line
from jestcurate.io.files import file_digest, read_json, write_json_atomic
from jestcurate.io.schema import DONE_DIR, ORPHANED_DIR, PARTS_DIR


class PartFiles:
    """A score set's part files as the checks see them: names present, sizes, sha256. This is
    a local folder; remote.RemoteParts answers the same from one listing of a URL."""

    local = True

    def __init__(self, out: Path) -> None:
        self.out = out

    def path(self, name: str) -> Path:
        return self.out / PARTS_DIR / f"{name}.parquet"

    def names(self) -> set[str]:
        return {p.stem for p in (self.out / PARTS_DIR).glob("*.parquet")}

    def size(self, name: str) -> int | None:
        """The part's byte size, None if it is not there."""
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def sha256(self, name: str) -> str:
        return str(file_digest(self.path(name))["sha256"])

    def claimed(self, name: str) -> bool:
        """A claim file names it (scale/claims.py): a run may be writing it now."""
        return (self.out / "claims" / f"{name}.json").is_file()


def part_problem(
    files: PartFiles, name: str, marker: Mapping[str, Any] | None, full: bool = False
) -> str | None:
    """What is wrong with part `name` against its marker, or None: the size always, the sha256
    with `full`. Markers from before sizes were recorded are taken on trust."""
    size = files.size(name)
    if marker is None:
        if size is None:
            return None
        if files.claimed(name):
            return "orphaned, or still being written (no marker yet, and a score run claims it)"
        return "orphaned (a part with no marker in done/)"
    if size is None:
        wrote = marker.get("status") == "ok" or marker.get("part_bytes") is not None
        return "missing (its marker says it was written)" if wrote else None
    wanted = marker.get("part_bytes")
    if wanted is not None and size != wanted:
        return f"damaged ({size:,} bytes; its marker says {wanted:,})"
    sha = marker.get("part_sha256")
    if full and sha and files.sha256(name) != sha:
        return "damaged (its sha256 differs from its marker's)"
    return None


def read_markers(out: Path) -> dict[str, dict[str, Any]]:
    """Completion markers by shard name. An unreadable marker counts as absent (shard redone)."""
    markers = {}
    done = out / DONE_DIR
    if not done.is_dir():
        return markers
    for path in done.glob("*.json"):
        try:
            markers[path.stem] = read_json(path)
        except (OSError, ValueError):
            continue
    return markers


def unhashed_problem(path: Path, marker: Mapping[str, Any]) -> str | None:
    """A part whose marker predates recorded hashes, read in full: what fails (unreadable, or
    not the marker's row count), or None."""
    try:  # every column's pages, one row group at a time: a page checksum fails where damaged
        part = pq.ParquetFile(path, page_checksum_verification=True)
        rows = sum(part.read_row_group(i).num_rows for i in range(part.num_row_groups))
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({first_line(exc)})"
    wanted = marker.get("counts", {}).get("samples")
    if wanted is not None and rows != wanted:
        return f"damaged ({rows:,} rows; its marker says {wanted:,})"
    return None


def forget_unmatched(
    out: Path,
    markers: dict[str, dict[str, Any]],
    names: list[str],
    full: bool = False,
    files: PartFiles | None = None,
) -> list[tuple[str, str]]:
    """Of `names`, the ok shards whose part no longer matches its marker (the size; with
    `full`, the sha256): their markers are removed, on disk and from `markers`, so a rerun
    redoes them. A marker another run rewrote meanwhile is left alone. Returns (name, problem).

    With `full`, a local part whose marker predates recorded hashes is read in full; if it
    reads whole, its size and sha256 are added to the marker, so later checks have them."""
    files = files or PartFiles(out)
    forgotten = []
    for name in names:
        marker = markers.get(name)
        if marker is None or marker.get("status") != "ok":
            continue
        problem = part_problem(files, name, marker, full)
        unhashed = full and problem is None and not marker.get("part_sha256")
        if unhashed and files.local and files.size(name) is not None:
            problem = unhashed_problem(files.path(name), marker)
            if problem is None and read_markers(out).get(name) == marker:
                marker.update({"part_bytes": files.size(name), "part_sha256": files.sha256(name)})
                write_json_atomic(out / DONE_DIR / f"{name}.json", marker)
                continue
        if problem is None or read_markers(out).get(name) != marker:
            continue
        (out / DONE_DIR / f"{name}.json").unlink(missing_ok=True)
        markers.pop(name)
        forgotten.append((name, problem))
    return forgotten


def set_aside_strays(
    out: Path, markers: Mapping[str, Any], names: set[str], live: Callable[[str], bool]
) -> list[str]:
    """Move parts with no marker whose shard is none of `names` (so no rerun of these inputs
    would redo them) from parts/ to orphaned/, where readers do not look, unless `live(name)`
    says a run holds a claim on it. Returns the names moved."""
    moved = []
    for name in sorted(PartFiles(out).names() - set(markers) - names):
        # The claim is checked before the marker: a writer renames its part, then writes the
        # marker, then releases the claim, so a part seen unclaimed here has its marker by now.
        if live(name) or (out / DONE_DIR / f"{name}.json").exists():
            continue
        target = out / ORPHANED_DIR / f"{name}.parquet"
        target.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(out / PARTS_DIR / f"{name}.parquet", target)
            moved.append(name)
    return moved


def marker_settles(out: Path, name: str, since: float) -> bool:
    """Whether shard `name` needs no more work in a run that began at `since`: it is done, or
    it failed in an attempt that started during this run (a broken shard is retried by the
    next run, not again and again by this one)."""
    path = out / DONE_DIR / f"{name}.json"
    try:
        marker = read_json(path)
        mtime = path.stat().st_mtime
    except (OSError, ValueError):
        return False
    return marker.get("status") == "ok" or mtime >= since


def repair_hint(where: str, meta: Mapping[str, Any]) -> str:
    """The command that rewrites a damaged or missing part of the set at `where`, in words."""
    made = "import" if meta.get("imported") else "score"
    return f"rerun the `jestcurate {made}` that wrote {where} to redo it"
