"""`jestcurate verify DIR`: check every file of a score set, a selection (with its export) or a
dedup output against what its markers or summary recorded.

Score sets: each part against its marker (size and sha256; parts from before markers recorded
them are read in full instead, which checks Parquet's page checksums), parts without a marker
(orphaned), markers whose part is gone (missing), meta.json. Selections and dedup outputs: each
file listed in summary.json's `files` (export shards in shards/export.json's), by size and
sha256; outputs from before `files` existed are read instead. Nothing is changed: a score set's
damaged parts are redone by rerunning the command that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from jestcurate import ui
from jestcurate.errors import JCError, first_line
from jestcurate.io.derived import digest_problem
from jestcurate.io.files import read_json
from jestcurate.io.integrity import (
    PartFiles,
    part_problem,
    read_markers,
    repair_hint,
    unhashed_problem,
)
from jestcurate.io.remote import RemoteParts, is_url, remote_score_set
from jestcurate.io.schema import DONE_DIR, META_NAME, PARTS_DIR


def _readable(path: Path) -> str | None:
    """Read a Parquet file in full, page checksums verified: None, or what failed."""
    try:
        pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({first_line(exc)})"
    return None


def _json(path: Path, problems: list[dict[str, str]]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append({"file": str(path), "problem": "missing"})
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        problems.append({"file": str(path), "problem": f"unreadable ({exc})"})
        return None


def _score_set(path: Path, problems: list[dict[str, str]], files: PartFiles) -> int:
    _json(path / META_NAME, problems)
    markers = read_markers(path)
    unreadable = [p.stem for p in (path / DONE_DIR).glob("*.json") if p.stem not in markers]
    for name in unreadable:
        problems.append({"file": str(path / DONE_DIR / f"{name}.json"), "problem": "unreadable"})
    names = sorted(files.names() | set(markers))
    where = files.mirror.url if isinstance(files, RemoteParts) else str(path)
    with ui.step_progress("verifying parts", len(names), "parts") as tick:
        for name in names:
            marker = markers.get(name)
            problem = part_problem(files, name, marker, full=True)
            unhashed = problem is None and marker is not None and not marker.get("part_sha256")
            if unhashed and files.local and files.size(name) is not None:
                problem = unhashed_problem(files.path(name), marker)  # page checksums speak
            if problem:
                problems.append({"file": f"{where}/{PARTS_DIR}/{name}.parquet", "problem": problem})
            tick()
    return len(names)


def _recorded(directory: Path, files: dict[str, Any], problems: list[dict[str, str]]) -> int:
    for name, recorded in sorted(files.items()):
        problem = digest_problem(directory / name, recorded)
        if problem:
            problems.append({"file": str(directory / name), "problem": problem})
    return len(files)


# The derived outputs other than selections, by the file that makes one.
_PRODUCTS = {"dedup.parquet": "dedup", "decontam.parquet": "decontamination"}


def _derived(path: Path, product: str, problems: list[dict[str, str]]) -> int:
    """A selection, dedup or decontamination output: its summary's recorded files, else its
    product read."""
    summary = _json(path / "summary.json", problems)
    if summary is None:
        return 1
    if "files" in summary:
        checked = _recorded(path, summary["files"], problems)
    else:
        problem = _readable(path / product) if (path / product).is_file() else "missing"
        if problem:
            problems.append({"file": str(path / product), "problem": problem})
        checked = 1
    export = path / "shards" / "export.json"
    if export.is_file():
        meta = _json(export, problems) or {}
        if "files" in meta:
            checked += _recorded(path / "shards", meta["files"], problems)
        elif "pattern" in meta:
            missing = [f"{k:05d}.tar" for k in range(int(meta["shards"]))
                       if not (path / "shards" / f"{k:05d}.tar").is_file()]  # fmt: skip
            problems += [{"file": str(path / "shards" / m), "problem": "missing"} for m in missing]
            checked += int(meta["shards"])
    return checked


def verify(location: str | Path) -> dict[str, Any]:
    """Every problem found under `location` (a path, or a score set's URL), with what kind of
    output it is."""
    problems: list[dict[str, str]] = []
    if is_url(str(location)):
        return _score_set_report(str(location), *remote_score_set(str(location)))
    path = Path(str(location).removeprefix("file://"))
    if (path / "summary.json").is_file() or any((path / p).is_file() for p in _PRODUCTS):
        product, kind = next(
            ((p, k) for p, k in _PRODUCTS.items() if (path / p).is_file()),
            ("manifest.parquet", "selection"),
        )
        checked = _derived(path, product, problems)
    elif any((path / d).is_dir() for d in (PARTS_DIR, DONE_DIR)) or (path / META_NAME).exists():
        return _score_set_report(str(path), path, PartFiles(path))
    else:
        raise JCError(f"{path} is not a score set, a selection or a dedup output")
    return {"path": str(path), "kind": kind, "checked": checked, "problems": problems}


def _score_set_report(shown: str, path: Path, files: PartFiles) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    checked = _score_set(path, problems, files)
    meta_ok = (path / META_NAME).is_file() and not any(
        p["file"].endswith(META_NAME) for p in problems
    )
    repair = repair_hint(shown, read_json(path / META_NAME) if meta_ok else {})
    return {"path": shown, "kind": "score set", "checked": checked, "problems": problems,
            "repair": f"To repair: {repair} (parts that do not match are redone)."}  # fmt: skip


def print_report(found: dict[str, Any], console: Console = ui.stdout) -> None:
    problems = found["problems"]
    verdict = "[green]intact[/green]" if not problems else f"[red]{len(problems)} problems[/red]"
    head = f"{found['path']} ({found['kind']}): {found['checked']:,} files checked, {verdict}"
    console.print(head, highlight=False, soft_wrap=True)
    for p in problems:
        console.print(f"[red]{p['problem'].split(' ')[0]}[/red] {p['file']}: {p['problem']}",
                      highlight=False, soft_wrap=True)  # fmt: skip
    if problems and found.get("repair"):
        console.print(found["repair"], highlight=False, soft_wrap=True)
