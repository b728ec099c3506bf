"""`jestcurate local`: the array tasks of score, import or select as processes on this machine,
one device each, for a node with several GPUs and no scheduler.

Each process is the command a Slurm array task runs (`--task-index I --num-tasks N` appended),
so claims, markers, the select rounds and the merge are the very ones the Slurm path uses, and
a rerun of the same command does only what is unfinished. A task that fails does not stop the
others; a select round with a failed task stops the rounds after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jestcurate import ui
from jestcurate.errors import JCError, some

COMMANDS = ("score", "import", "select")
LOCAL_DIR = "local"  # OUT/local/logs: one log per task and phase, appended to on reruns
TASK_FLAGS = ("--task-index", "--num-tasks", "--merge")
# Set in each task's environment: claims tell tasks apart inside one Slurm job (scale/claims.py).
TASK_VARIABLE = "JESTCURATE_LOCAL_TASK"


@dataclass(frozen=True)
class LocalPlan:
    """What to run: `jestcurate COMMAND ARGS` as `num_tasks` tasks writing into `out` (the local
    folder; for a URL, its mirror). Select's --export is kept apart: only the export round
    passes it."""

    command: str
    args: list[str]
    out: Path
    num_tasks: int
    inputs: list[str] = field(default_factory=list)  # score's INPUTS
    upload_to: str | None = None  # score's --out when a URL
    export: bool = False
    import_config: Any = None  # import's ImportConfig, for which tasks have files left


@dataclass(frozen=True)
class Phase:
    """One round of processes: `tasks` of the plan (None: a single process without task flags,
    the merge) running `jestcurate ARGV`."""

    name: str
    argv: list[str]
    tasks: list[int] | None


@dataclass(frozen=True)
class Outcome:
    phase: str
    task: int | None
    code: int  # the process's exit status; negative: killed by that signal
    log: Path

    @property
    def label(self) -> str:
        return self.phase if self.task is None else f"{self.phase} task {self.task}"

    def reason(self) -> str:
        """Why it failed: the log's last line, or the signal that ended it."""
        if self.code < 0:
            return f"killed by signal {-self.code}"
        lines = (
            self.log.read_text(errors="replace").strip().splitlines() if self.log.is_file() else []
        )
        return f"exit {self.code}: {lines[-1].strip()}" if lines else f"exit {self.code}"


@dataclass
class LocalReport:
    plan: LocalPlan
    devices: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    stopped_after: str | None = None  # a round that failed, so the rounds after it did not run

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != 0]


def plan(
    command: str,
    args: Sequence[str],
    num_tasks: int,
    parse: Callable[[str, list[str]], Mapping[str, Any]],
) -> LocalPlan:
    """Check the command's options now, not in N processes: `parse` reads them as the command
    itself does and raises JCError on bad ones."""
    args = [a for a in args if a != "--"]
    if command not in COMMANDS:
        raise JCError(f"jestcurate local runs {', '.join(COMMANDS)}, not {command!r}")
    if num_tasks < 1:
        raise JCError("--num-tasks must be at least 1")
    if any(a.split("=")[0] in TASK_FLAGS for a in args):
        raise JCError(
            "--task-index, --num-tasks and --merge are local's to set: give --num-tasks to "
            f"jestcurate local, not among the {command} options"
        )
    if command == "select":
        from jestcurate.scale import slurm_select

        chain = slurm_select.plan(args, num_tasks, lambda a: parse("select", a))
        return LocalPlan("select", chain.args, chain.out, num_tasks, export=chain.export)
    params = parse(command, args)
    if command == "score":
        from jestcurate.io.remote import score_out
        from jestcurate.io.shards import expand_inputs

        local, url = score_out(str(params["out"]))
        shards = len(expand_inputs(params["inputs"]))  # a task with no shard would idle
        inputs = list(params["inputs"])
        return LocalPlan("score", args, local, min(num_tasks, shards), inputs, url)
    from jestcurate.pipelines import importer

    names = {f.name for f in dataclasses.fields(importer.ImportConfig)} - {"shards"}
    shards = tuple(params.get("shards") or ())
    cfg = importer.ImportConfig(**{k: v for k, v in params.items() if k in names}, shards=shards)
    count = min(num_tasks, len(importer.targets(cfg)))  # a task with no file would idle
    return LocalPlan("import", args, cfg.out, max(count, 1), import_config=cfg)


def device_list(spec: str) -> list[str]:
    """The devices tasks run on: CUDA device ids ("auto": every visible GPU, or the CPU where
    there is none; "0,1,3": those), or ["cpu"]."""
    if spec == "cpu":
        return ["cpu"]
    if spec != "auto":
        ids = [d.strip() for d in spec.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids):
            raise JCError(f"--devices takes auto, cpu or GPU ids like 0,1,3, not {spec!r}")
        return ids
    import torch

    count = torch.cuda.device_count()
    if not count:
        return ["cpu"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = [v.strip() for v in visible.split(",")] if visible else []
    return shown[:count] if len(shown) >= count else [str(i) for i in range(count)]


def _phases(plan: LocalPlan) -> Iterator[Phase]:
    """The rounds, each decided from the files just before it runs, so that a rerun does only
    what is unfinished (select's rounds as `slurm select --retry` finds them)."""
    everything = list(range(plan.num_tasks))
    if plan.command == "score":
        yield Phase("score", ["score", *plan.args], _score_tasks_left(plan))
        return
    if plan.command == "import":
        from jestcurate.pipelines.importer import unfinished_tasks

        yield Phase(
            "import", ["import", *plan.args], unfinished_tasks(plan.import_config, plan.num_tasks)
        )
        return
    from jestcurate.pipelines.select import unfinished_rounds

    argv = ["select", *plan.args]
    yield Phase("round 1", argv, unfinished_rounds(plan.out, plan.num_tasks, plan.export).scatter)
    yield Phase("round 2", argv, unfinished_rounds(plan.out, plan.num_tasks, plan.export).select)
    left = unfinished_rounds(plan.out, plan.num_tasks, plan.export)
    if not left.merged:  # the last task of round 2 merges when it can; else this does
        yield Phase("merge", [*argv, "--merge", "--num-tasks", str(plan.num_tasks)], None)
    if plan.export and not unfinished_rounds(plan.out, plan.num_tasks, True).exported:
        yield Phase("export", [*argv, "--export"], everything)


def _score_tasks_left(plan: LocalPlan) -> list[int]:
    from jestcurate.io.shards import expand_inputs
    from jestcurate.scale.tasks import score_tasks_left

    urls = expand_inputs(plan.inputs)
    return score_tasks_left(plan.out, plan.upload_to, urls, plan.num_tasks)[0]


def _core_shares(slots: int) -> list[set[int]]:
    """This process's cores split into `slots` disjoint shares, as Slurm's --cpus-per-task
    would give the tasks: decoding workers and torch's threads size themselves from it."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < slots:
        return [set(cores)] * slots
    size = len(cores) // slots
    return [set(cores[i * size : (i + 1) * size]) for i in range(slots)]


@dataclass
class _Running:
    process: subprocess.Popen[bytes]
    phase: str
    task: int | None
    slot: int
    log: Path


def _start(
    plan: LocalPlan, phase: Phase, task: int | None, slot: int, device: str, cores: set[int]
) -> _Running:
    argv = [*phase.argv]
    if task is not None:
        argv += ["--task-index", str(task), "--num-tasks", str(plan.num_tasks)]
    env = {**os.environ, TASK_VARIABLE: str(task if task is not None else "merge")}
    env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
    name = phase.name.replace(" ", "") + ("" if task is None else f"-{task:05d}")
    log = plan.out / LOCAL_DIR / "logs" / f"{name}.log"  # score-00003.log, round1-00003.log
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jestcurate", *argv]
    with open(log, "ab") as f:
        began = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"== {began} device {device}: {' '.join(command)}\n".encode())
        f.flush()
        setaffinity = getattr(os, "sched_setaffinity", None)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=(lambda: setaffinity(0, cores)) if setaffinity and cores else None,
        )
    return _Running(process, phase.name, task, slot, log)


def run(
    plan: LocalPlan, devices: list[str], on_done: Callable[[Outcome], None] | None = None
) -> LocalReport:
    """Run each round's tasks, as many at once as there are devices (on the CPU, one per
    task), each on its own device and share of the cores; the next round starts once every
    task of this one has ended. `on_done` hears of each task as it ends."""
    report = LocalReport(plan, devices)
    for phase in _phases(plan):
        jobs: list[int | None] = [None] if phase.tasks is None else list(phase.tasks)
        if not jobs:
            continue
        if phase.tasks is None:
            slots = 1
        elif devices != ["cpu"]:
            slots = min(len(devices), len(jobs))
        else:
            slots = min(
                len(jobs),
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1,
            )
        shares = _core_shares(slots)
        outcomes = _run_phase(plan, phase, jobs, slots, devices, shares, on_done)
        report.outcomes += outcomes
        if any(o.code != 0 for o in outcomes):
            report.stopped_after = phase.name
            break
    return report


def _run_phase(
    plan: LocalPlan,
    phase: Phase,
    jobs: list[int | None],
    slots: int,
    devices: list[str],
    shares: list[set[int]],
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    waiting = list(jobs)
    free = list(range(slots))
    running: list[_Running] = []
    outcomes: list[Outcome] = []
    unit = "tasks" if phase.tasks is not None else "job"
    with _ended_with_us(running), ui.step_progress(f"local {phase.name}", len(jobs), unit) as tick:
        while waiting or running:
            while waiting and free:
                slot = free.pop(0)
                device = devices[slot % len(devices)] if phase.tasks is not None else devices[0]
                running.append(_start(plan, phase, waiting.pop(0), slot, device, shares[slot]))
            time.sleep(0.2)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                outcome = Outcome(job.phase, job.task, int(job.process.returncode), job.log)
                outcomes.append(outcome)
                tick()
                if on_done is not None:
                    on_done(outcome)
    return sorted(outcomes, key=lambda o: -1 if o.task is None else o.task)


@contextlib.contextmanager
def _ended_with_us(running: list[_Running]) -> Iterator[None]:
    """On Ctrl-C, SIGTERM or an error here, end the tasks too (SIGTERM: each leaves its
    files as a killed task would, for the rerun) rather than leave them running unwatched."""
    try:
        yield
    except BaseException:
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                job.process.terminate()
        for job in running:
            try:
                job.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.process.kill()
        raise


def print_outcome(outcome: Outcome) -> None:
    """One line per ended task."""
    if outcome.code == 0:
        ui.say(f"{outcome.label}: done")
    else:
        ui.note(f"{outcome.label} failed ({outcome.reason()}); log: {outcome.log}")


def print_report(report: LocalReport) -> None:
    plan = report.plan
    on = "the CPU" if report.devices == ["cpu"] else f"GPUs {', '.join(report.devices)}"
    if not report.outcomes:
        ui.say(f"nothing to do: every task of {plan.command} in {plan.out} is finished")
        return
    failed = report.failed
    ran = len(report.outcomes)
    if not failed:
        logs = plan.out / LOCAL_DIR / "logs"
        ui.say(f"{plan.command}: {ran} task runs finished on {on}; logs in {logs}")
        return
    shown = some([o.label for o in failed], shown=5, sep=", ")
    after = (
        f"; the rounds after {report.stopped_after} did not run" if plan.command == "select" else ""
    )
    ui.note(f"{len(failed)} of {ran} task runs failed ({shown}){after}; rerun the same command")
