"""`jestcurate slurm select`: check the select options once, write the scripts (slurm.py's
write_select_scripts) and submit them in order: the array twice (round 1 buckets each task's
rows, round 2 selects), the merge after round 2 and, after the merge, with --ledger the ledger
array (the tasks again, each writing its ledger parts: select's --spread-ledger) and with
--export the export array, each with afterok dependencies."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.store import read_json, write_json_atomic
from jestcurate.scale import slurm

CHAINS = "select-jobs.json"  # the jobs of each submission, for status
# Flags that are the scripts' to set, not the user's.
TASK_FLAGS = ("--task-index", "--num-tasks", "--merge")


@dataclass(frozen=True)
class SelectPlan:
    """What the scripts run: select's options (without --export, which only the export
    script passes; with --ledger, --spread-ledger added) for `num_tasks` array tasks writing
    into `out`."""

    out: Path
    args: list[str]
    export: bool
    num_tasks: int

    @property
    def ledger(self) -> bool:
        """The tasks write the ledger's parts after the merge (the ledger array)."""
        return "--spread-ledger" in self.args


def plan(
    args: Sequence[str], num_tasks: int, parse: Callable[[list[str]], Mapping[str, Any]]
) -> SelectPlan:
    """Check select's options (given after `--`) now, not in every task: `parse` reads them
    as `select` does (the command line's own parser) and raises JCError on bad ones."""
    args = list(args)
    if "--" in args:
        args.remove("--")
    if num_tasks < 2:
        raise JCError("--num-tasks must be at least 2 (with one task, run select itself)")
    if any(a.split("=")[0] in TASK_FLAGS for a in args):
        raise JCError(
            "--task-index, --num-tasks and --merge are the scripts' to set: give --num-tasks "
            "to slurm select, not among the select options"
        )
    if "--overwrite" in args:
        raise JCError("--overwrite is for one run, not array tasks: remove OUT first instead")
    parsed = parse(args)
    base = [a for a in args if a != "--export"]
    if "--ledger" in base and "--spread-ledger" not in base:
        base.append("--spread-ledger")  # the merge leaves the ledger's parts to the tasks
    return SelectPlan(Path(parsed["out"]), base, "--export" in args, num_tasks)


@dataclass(frozen=True)
class SlurmSelectReport:
    plan: SelectPlan
    scripts: slurm.SelectScripts
    jobs: list[str] | None  # the submitted job ids; None: written, not submitted
    retry: Any = None  # --retry: what was unfinished


def run(
    plan: SelectPlan,
    opts: slurm.SlurmOptions,
    submit: bool,
    written: Callable[[slurm.SelectScripts], None] | None = None,
    retry: Any = None,
) -> SlurmSelectReport:
    """Write the scripts and, with `submit`, submit them in order. `written` hears of the
    scripts before anything is submitted, so a failed sbatch leaves their paths known. With
    `retry` (select's Unfinished: which rounds of which tasks, the merge, the ledger and the
    export are not done), submit only those, in the same order."""
    export_args = [] if plan.export else None
    folder = plan.out / slurm.SLURM_DIR
    kept = {path: path.read_text() for path in folder.glob("*.sbatch")}
    written_before = slurm.written_command(folder / slurm.SELECT_SCRIPT)
    if retry is not None and not written_before:
        raise JCError(f"nothing to retry in {plan.out}: run slurm select --submit first")
    scripts = slurm.write_select_scripts(plan.out, plan.args, plan.num_tasks, opts, export_args)
    if retry is not None and slurm.written_command(scripts.select) != written_before:
        for path, text in kept.items():  # the chain's own scripts stay as they were
            path.write_text(text)
        raise JCError(
            "--retry needs the same select options and --num-tasks as the chain it finishes "
            f"(its scripts are in {folder}); for other options, use another --out"
        )
    if written is not None:
        written(scripts)
    if not submit:
        return SlurmSelectReport(plan, scripts, None)
    everything = list(range(plan.num_tasks))
    scatter_tasks = everything if retry is None else retry.scatter
    select_tasks = everything if retry is None else retry.select
    arrays: dict[str, list[tuple[str, int]]] = {}
    if scatter_tasks:  # round 1: bucket the rows
        arrays["round 1"] = slurm.submit_arrays(scripts.select, scatter_tasks, opts)
    if select_tasks:  # round 2
        after = _ids(arrays, "round 1")
        arrays["round 2"] = slurm.submit_arrays(scripts.select, select_tasks, opts, after)
    if not (retry is not None and retry.merged):
        arrays["merge"] = [(slurm.submit_one(scripts.merge, after=_ids(arrays, "round 2")), 0)]
    ledger_tasks = everything if retry is None else retry.ledger
    if scripts.ledger is not None and ledger_tasks:  # beside the export: both need the merge
        after = _ids(arrays, "merge")
        arrays["ledger"] = slurm.submit_arrays(scripts.ledger, ledger_tasks, opts, after)
    if scripts.export is not None and not (retry is not None and retry.exported):
        after = _ids(arrays, "merge")
        arrays["export"] = slurm.submit_arrays(scripts.export, everything, opts, after)
    jobs = [job for submitted in arrays.values() for job, _ in submitted]
    if arrays:
        _record_chain(plan.out, arrays)
    return SlurmSelectReport(plan, scripts, jobs, retry)


def _ids(arrays: dict[str, list[tuple[str, int]]], step: str) -> list[str]:
    return [job for job, _ in arrays.get(step, [])]


def _record_chain(out: Path, arrays: dict[str, list[tuple[str, int]]]) -> None:
    """Append this submission's jobs to OUT/slurm/select-jobs.json, for `status`."""
    path = out / slurm.SLURM_DIR / CHAINS
    chains = read_chains(out)
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    chains.append(
        {"submitted": submitted, "arrays": {k: [list(a) for a in v] for k, v in arrays.items()}}
    )
    write_json_atomic(path, {"chains": chains})


def read_chains(out: Path) -> list[dict[str, Any]]:
    """Each `slurm select --submit` and `--retry` submission, oldest first: its array jobs per
    step ("round 1", "round 2", "merge", "ledger", "export") as [job id, first task] pairs."""
    path = out / slurm.SLURM_DIR / CHAINS
    try:
        return list(read_json(path)["chains"]) if path.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        return []  # status only reads it; a damaged record loses the log hints, nothing more


def task_log(out: Path, step: str, task: int) -> Path | None:
    """The Slurm log of `task` in `step` ("round 1", ...) from the newest submission that ran
    it, if that log exists."""
    pattern = {"round 1": "select", "round 2": "select", "ledger": "ledger",
               "export": "export"}.get(step)  # fmt: skip
    for chain in reversed(read_chains(out)):
        arrays = [(str(j), int(o)) for j, o in chain["arrays"].get(step, [])]
        for job, offset in sorted(arrays, key=lambda a: -a[1]):
            if pattern and task >= offset:
                log = out / slurm.SLURM_DIR / "logs" / f"{pattern}-{job}_{task - offset}.out"
                if log.is_file():
                    return log
                break
    return None


def print_scripts(scripts: slurm.SelectScripts) -> None:
    """The scripts written, one path a line."""
    for path in (scripts.select, scripts.merge, scripts.ledger, scripts.export):
        if path is not None:
            ui.say(str(path))


def print_report(report: SlurmSelectReport) -> None:
    """After print_scripts: how to submit them, or what was submitted."""
    scripts, n = report.scripts, report.plan.num_tasks
    if report.jobs is None:
        ui.note(
            f"{n} tasks; submit with --submit, or by hand: sbatch --array=0-{n - 1} "
            f"{scripts.select} 0 twice (the second with --dependency=afterok:FIRST), then "
            f"{scripts.merge.name} after the second"
            + (f", then {scripts.ledger.name} over every task after the merge"
               if scripts.ledger else "")
        )  # fmt: skip
        return
    if report.retry is not None:
        r = report.retry
        if not report.jobs:
            ui.say("nothing to retry: every task and the merge are done, and any ledger and export")
            return
        ledger = f", the ledger of {len(r.ledger)} tasks" if r.ledger else ""
        ui.say(
            f"resubmitted round 1 of {len(r.scatter)} and round 2 of {len(r.select)} of {n} "
            f"tasks{'' if r.merged else ', the merge'}{ledger}"
            f"{'' if r.exported else ', the export'}: {', '.join(report.jobs)}"
        )
        return
    then = "the merge" + (", the ledger" if scripts.ledger else "")
    then += " and the export" if report.plan.export else ""
    ui.say(f"submitted {n} select tasks (two rounds), then {then}: {', '.join(report.jobs)}")
