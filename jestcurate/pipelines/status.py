"""`jestcurate status`: where a score set, a selection or an export stands, from its files
alone, and for a `slurm select` chain what squeue still lists of it.

A selection made by array tasks is unfinished until the merge wrote summary.json; until then
its status names each task whose round 1 or round 2 has not finished, with its log (Slurm's
or `jestcurate local`'s) and the log's last line, which is where a failed task says why.
With --ledger, the tasks write the ledger's parts after the merge (select --spread-ledger):
until the last is written, status shows how many are and which tasks have parts left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.remote import is_url, local_dir, remote_score_set
from jestcurate.pipelines.local import LOCAL_DIR, last_line, read_plan
from jestcurate.pipelines.select import (
    MANIFEST,
    SUMMARY,
    TASKS_DIR,
    ledger_round,
    task_count,
    unfinished_rounds,
)
from jestcurate.scale import slurm, slurm_select
from jestcurate.scale.status import score_status
from jestcurate.trainer.loader import export_meta


def export_status(selection: Path) -> dict[str, Any]:
    """Written and missing output shards of `select --export`."""
    meta_path = selection / "shards" / "export.json"
    if not meta_path.is_file():
        raise JCError(f"{selection} has no export (no shards/export.json); run select --export")
    from jestcurate.io.files import read_json

    meta = read_json(meta_path)
    total = math.ceil(meta["samples"] / meta["samples_per_shard"])
    missing = [
        f"{k:05d}.tar" for k in range(total) if not (selection / "shards" / f"{k:05d}.tar").exists()
    ]
    return {
        "kind": "export",
        "out": str(selection),
        "shards": total,
        "written": total - len(missing),
        "missing": missing,
        "finished": export_meta(selection) is not None and not missing,
    }


def _task_log(out: Path, step: str, task: int) -> Path | None:
    """The newer of `task`'s logs in `step`: `jestcurate local`'s and Slurm's."""
    local = out / LOCAL_DIR / "logs" / f"{step.replace(' ', '')}-{task:05d}.log"
    found = [p for p in (local, slurm_select.task_log(out, step, task)) if p and p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _waiting_forever(line: str) -> bool:
    """A job that can never start: Slurm without --kill-on-invalid-dep keeps it listed."""
    return "DependencyNeverSatisfied" in line


def _left(out: Path, step: str, tasks: list[int]) -> list[dict[str, Any]]:
    """Each task with `step` left, with its newest log and the log's last line."""
    found = []
    for task in tasks:
        log = _task_log(out, step, task)
        last = last_line(log)[:300] if log else None
        found.append({"step": step, "task": task, "log": log and str(log), "last": last})
    return found


def ledger_status(out: Path, count: int | None, merged: bool) -> dict[str, Any] | None:
    """The ledger the tasks write after the merge (--ledger --spread-ledger): "planned" before
    the merge, "pending" with parts left (`written` of `parts`; `unfinished`: the tasks that
    have some, with their logs), "written"; None without a ledger round."""
    summary = ledger_round.read_summary(out) if merged else {}
    local = read_plan(out) or {}
    script = out / slurm.SLURM_DIR / slurm.LEDGER_SCRIPT
    planned = script.is_file() or bool(local.get("command") == "select" and local.get("ledger"))
    if not merged:
        return {"status": "planned", "parts": None, "written": 0, "unfinished": []} if (
            planned and count) else None  # fmt: skip
    if "ledger" not in summary or not (planned or ledger_round.is_pending(summary)):
        return None  # none, or written by the merge (or one run) itself
    parts = int(summary["ledger"]["parts"])
    if not ledger_round.is_pending(summary):
        return {"status": "written", "parts": parts, "written": parts, "unfinished": []}
    written = len(ledger_round.written_ids(out) & set(range(parts)))
    left = ledger_round.tasks_left(out, parts, count) if count else []
    return {"status": "pending", "parts": parts, "written": written,
            "unfinished": _left(out, "ledger", left)}  # fmt: skip


def selection_status(out: Path) -> dict[str, Any]:
    """A selection's progress: merged or not, the tasks that have a round left (with their
    logs), its export, and which jobs of its newest Slurm submission are still queued."""
    merged = (out / SUMMARY).is_file()
    count = task_count(out)
    left: list[dict[str, Any]] = []
    if not merged and count:
        rounds = unfinished_rounds(out, count, export=False)
        for step, tasks in (("round 1", rounds.scatter), ("round 2", rounds.select)):
            left += _left(out, step, tasks)
    ledger = ledger_status(out, count, merged)
    local = read_plan(out)
    planned = (out / slurm.SLURM_DIR / "select-export.sbatch").is_file() or bool(
        local and local.get("command") == "select" and local.get("export")
    )
    export = export_status(out) if (out / "shards" / "export.json").is_file() else None
    chains = slurm_select.read_chains(out)
    chain = None
    if chains:
        jobs = [str(j) for arrays in chains[-1]["arrays"].values() for j, _ in arrays]
        chain = {"submitted": chains[-1].get("submitted"), "jobs": jobs,
                 "queued": slurm.queued(jobs)}  # fmt: skip
    exported = export["finished"] if export else not planned
    return {
        "kind": "selection",
        "out": str(out),
        "num_tasks": count,
        "merged": merged,
        "unfinished": left,
        "export": export,
        "export_planned": planned or export is not None,
        "slurm": chain,
        "ledger": ledger,
        "finished": merged and exported and (ledger is None or ledger["status"] == "written"),
    }


def read_status(
    location: str, inputs: Sequence[str] = (), full: bool = False
) -> tuple[dict[str, Any], bool]:
    """Where the score set (a path or URL), the selection or the export at `location` stands,
    as `status` shows it, and whether everything is done. `full`: check each part's sha256,
    not its size."""
    files = None
    if is_url(location):  # the mirror gets the markers; the parts are checked where they are
        folder, files = remote_score_set(location)
    else:
        folder = local_dir(location)
    if (folder / "shards" / "export.json").is_file():  # the merge is done; the export is left
        return _export_and_ledger(folder)
    if (folder / TASKS_DIR).is_dir() or (folder / MANIFEST).is_file():
        found = selection_status(folder)
        return found, found["finished"]
    state = score_status(folder, inputs, full=full, files=files)
    found = state.as_dict()
    if is_url(location):
        found["out"] = location  # as given, not its local mirror
    return found, state.complete


def _export_and_ledger(folder: Path) -> tuple[dict[str, Any], bool]:
    """The export's status, with the ledger the tasks may still be writing beside it
    (--spread-ledger): not finished while the ledger is pending."""
    found = export_status(folder)
    ledger = (
        ledger_status(folder, task_count(folder), True) if (folder / SUMMARY).is_file() else None
    )
    if ledger is not None:
        found["ledger"] = ledger
        found["finished"] = found["finished"] and ledger["status"] == "written"
    return found, found["finished"]


def print_status(found: dict[str, Any], console: Console = ui.stdout, listed: int = 20) -> None:
    """`jestcurate status`, for a person: counts, then up to `listed` items of each kind, one
    per line and unwrapped so paths can be copied (--json gives the whole lists)."""
    table = ui.facts()
    lines: list[str] = []

    def some(items: list[str], label: str) -> None:
        lines.extend(f"{label} {item}" for item in items[:listed])
        if len(items) > listed:
            lines.append(f"{label} ... and {len(items) - listed:,} more")

    if found["kind"] == "export":
        _export_rows(found, table)
        if found.get("ledger"):
            _ledger_row(found["ledger"], table, listed)
            some([f"task {u['task']}" for u in found["ledger"]["unfinished"]],
                 "[yellow]ledger unfinished[/yellow]")  # fmt: skip
        some(found["missing"], "[yellow]missing[/yellow]")
    elif found["kind"] == "selection":
        lines += _selection_rows(found, table, listed)
    else:
        pending = found["pending"]
        table.add_row("done", f"{found['done']:,}")
        table.add_row("failed", f"{len(found['failed']):,}")
        if found.get("damaged"):
            table.add_row("damaged (rescored by a rerun)", f"{len(found['damaged']):,}")
        table.add_row("running", f"{len(found['running']):,}")
        table.add_row("pending", "(give INPUTS)" if pending is None else f"{len(pending):,}")
        if found["outside_inputs"]:
            table.add_row("not among INPUTS", f"{found['outside_inputs']:,}")
        some([f"{f['shard']}: {f['error']}" for f in found["failed"]], "[red]failed[/red]")
        some([f"{d['shard']}: {d['problem']}" for d in found.get("damaged", [])],
             "[red]damaged[/red]")  # fmt: skip
        some([f"{r['shard']} ({r['owner']})" for r in found["running"]], "[cyan]running[/cyan]")
        some(pending or [], "[yellow]pending[/yellow]")
    console.print(f"{found['out']} ({found['kind']})", highlight=False, soft_wrap=True)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def _export_rows(found: dict[str, Any], table: Any) -> None:
    table.add_row("shards written", f"{found['written']:,} of {found['shards']:,}")


def _selection_rows(found: dict[str, Any], table: Any, listed: int) -> list[str]:
    """The selection's rows in `table`; returns the lines naming its unfinished tasks."""
    table.add_row("array tasks", str(found["num_tasks"] or 1))
    table.add_row("merged", "yes" if found["merged"] else "no")
    left = found["unfinished"]
    for step in ("round 1", "round 2"):
        tasks = [u["task"] for u in left if u["step"] == step]
        if tasks:
            shown = ", ".join(map(str, tasks[:listed])) + (" ..." if len(tasks) > listed else "")
            table.add_row(f"{step} unfinished", f"{len(tasks)} (task {shown})")
    ledger = found.get("ledger")
    if ledger:
        _ledger_row(ledger, table, listed)
    export = found["export"]
    if export is not None:
        _export_rows(export, table)
    elif found["export_planned"]:
        table.add_row("export", "not started")
    chain, lines = found["slurm"], []
    if chain is not None:
        queued = chain["queued"]
        state = "unknown (no squeue)" if queued is None else f"{len(queued)} queued or running"
        table.add_row("Slurm jobs (newest submission)", state)
        lines += [f"[cyan]queued[/cyan] {q}" for q in (queued or [])[:listed]]
    # the earliest round a task has left is where the selection stopped; its log says why
    left = left or (ledger or {}).get("unfinished", [])
    first = [u for u in left if u["step"] == left[0]["step"]] if left else []
    for u in first[:listed]:
        where = f" (log {u['log']}: {u['last']})" if u["log"] else " (no log found)"
        lines.append(f"[yellow]{u['step']} unfinished[/yellow] task {u['task']}{where}")
    queued = chain and chain["queued"]
    ended = queued == [] or (queued and all(_waiting_forever(q) for q in queued))
    if not found["finished"] and chain is not None and ended:
        lines.append(
            "the Slurm chain has ended unfinished: `jestcurate slurm select --retry` with the "
            "same options submits what is left"
        )
    return lines


def _ledger_row(ledger: dict[str, Any], table: Any, listed: int) -> None:
    """The ledger's row in `table` (planned, parts written, which tasks have parts left)."""
    if ledger["status"] == "planned":
        table.add_row("ledger", "planned (the tasks write its parts after the merge)")
        return
    shown = f"{ledger['written']:,} of {ledger['parts']:,} parts written"
    tasks = [u["task"] for u in ledger["unfinished"]]
    if tasks:
        named = ", ".join(map(str, tasks[:listed])) + (" ..." if len(tasks) > listed else "")
        shown += f" ({len(tasks)} tasks with parts left: task {named})"
    table.add_row("ledger", shown)
