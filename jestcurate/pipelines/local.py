"""`jestcurate local`: the array tasks of score, import or select as processes on this machine,
one device each, for a node with several GPUs and no scheduler.

Each process is the command a Slurm array task runs (`--task-index I --num-tasks N` appended),
so claims, markers, the select rounds and the merge are the very ones the Slurm path uses, and
a rerun of the same command does only what is unfinished. Which tasks are left is read from
the files; whether the files are this command's output is for the command itself to say, so
when nothing is left one process still runs to check (and refuses other options in one line).
A task that fails does not stop the others; a select round with a failed task stops the rounds
after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jestcurate import ui
from jestcurate.errors import JCError, Terminated, some
from jestcurate.io.store import read_json, write_json_atomic

COMMANDS = ("score", "import", "select")
LOCAL_DIR = "local"  # OUT/local: plan.json, and logs/ with one log per task and round
PLAN = "plan.json"  # the command and N, so a rerun without --num-tasks keeps N
TASK_FLAGS = ("--task-index", "--num-tasks", "--merge")
# Set in each task's environment: claims tell tasks apart inside one Slurm job (scale/claims.py).
TASK_VARIABLE = "JESTCURATE_LOCAL_TASK"
BAD_INPUT = 2  # the commands' exit status for bad input


@dataclass(frozen=True)
class LocalPlan:
    """What to run: `jestcurate COMMAND ARGS` as `num_tasks` tasks writing into `out` (the local
    folder; for a URL, its mirror) on `devices` (CUDA device ids, or ["cpu"]). Select's
    --export is kept apart: only the export round passes it; --ledger gets --spread-ledger, so
    that a round after the merge writes the ledger's parts."""

    command: str
    args: list[str]
    out: Path
    num_tasks: int
    devices: list[str]
    inputs: list[str] = field(default_factory=list)  # score's INPUTS
    upload_to: str | None = None  # score's --out when a URL
    export: bool = False
    import_config: Any = None  # import's ImportConfig, for which tasks have files left

    @property
    def ledger(self) -> bool:
        """select --ledger: after the merge, the tasks write the ledger's parts (a round)."""
        return self.command == "select" and "--spread-ledger" in self.args


@dataclass(frozen=True)
class Phase:
    """One round of processes: `tasks` of the plan (None: a single process without task flags,
    the merge) running `jestcurate ARGV`. A check runs only to let the command say whether
    the finished files are its own."""

    name: str
    argv: list[str]
    tasks: list[int] | None
    check: bool = False


@dataclass(frozen=True)
class Outcome:
    phase: str
    task: int | None
    code: int  # the process's exit status; negative: killed by that signal
    log: Path
    check: bool = False

    @property
    def label(self) -> str:
        return self.phase if self.task is None else f"{self.phase} task {self.task}"

    def reason(self) -> str:
        """Why it failed: the log's last line, or the signal that ended it."""
        if self.code < 0:
            return f"killed by signal {-self.code}"
        last = last_line(self.log)
        return f"exit {self.code}: {last}" if last else f"exit {self.code}"


def last_line(log: Path) -> str:
    """A log's last non-blank line, where a failed command says why ("" without one)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class LocalReport:
    plan: LocalPlan
    outcomes: list[Outcome] = field(default_factory=list)
    stopped_after: str | None = None  # a round that failed, so the rounds after it did not run

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != 0]


def plan(
    args: Sequence[str],
    num_tasks: int | None,
    devices: str,
    parse: Callable[[str, list[str]], Mapping[str, Any]],
) -> LocalPlan:
    """Check the command and its options now, not in N processes: `parse` reads them as the
    command itself does and raises JCError on bad ones. N defaults to the plan of an earlier
    run into the same OUT, else one task per device (two on the CPU, and for select)."""
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise JCError("give the command after --: jestcurate local -- score|import|select ...")
    command, args = args[0], args[1:]
    if command not in COMMANDS:
        raise JCError(f"jestcurate local runs {', '.join(COMMANDS)}, not {command!r}")
    if num_tasks is not None and num_tasks < 1:
        raise JCError("--num-tasks must be at least 1")
    if any(a.split("=")[0] in TASK_FLAGS for a in args):
        raise JCError(
            "--task-index, --num-tasks and --merge are local's to set: give --num-tasks to "
            f"jestcurate local, not among the {command} options"
        )
    export = "--export" in args if command == "select" else False
    params = parse(command, args)
    if command == "score":
        from jestcurate.io.remote import score_out

        out, upload_to = score_out(str(params["out"]))
    else:
        out, upload_to = Path(params["out"]), None
    found = device_list(devices)
    count = num_tasks or _earlier_count(out, command) or (2 if found == ["cpu"] else len(found))
    base = LocalPlan(command, args, out, count, found, upload_to=upload_to, export=export)
    if command == "select":
        from jestcurate.scale import slurm_select

        chain = slurm_select.plan(args, max(count, 2) if num_tasks is None else count,
                                  lambda a: params)  # fmt: skip
        return dataclasses.replace(base, args=chain.args, num_tasks=chain.num_tasks)
    if command == "score":
        from jestcurate.io.shards import expand_inputs

        shards = len(expand_inputs(params["inputs"]))  # a task with no shard would idle
        inputs = list(params["inputs"])
        return dataclasses.replace(base, num_tasks=min(count, shards), inputs=inputs)
    from jestcurate.pipelines import importer

    names = {f.name for f in dataclasses.fields(importer.ImportConfig)} - {"shards"}
    shards = tuple(params.get("shards") or ())
    cfg = importer.ImportConfig(**{k: v for k, v in params.items() if k in names}, shards=shards)
    count = max(min(count, len(importer.targets(cfg))), 1)  # a task with no file would idle
    return dataclasses.replace(base, num_tasks=count, import_config=cfg)


def _earlier_count(out: Path, command: str) -> int | None:
    earlier = read_plan(out) or {}
    return int(earlier["num_tasks"]) if earlier.get("command") == command else None


def read_plan(out: Path) -> dict[str, Any] | None:
    """The plan of the newest `jestcurate local` run into OUT (for status), or None."""
    path = out / LOCAL_DIR / PLAN
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def device_list(spec: str) -> list[str]:
    """The devices tasks run on, as CUDA_VISIBLE_DEVICES values: "auto" is every visible GPU
    (or the CPU where there is none), "0,1,3" those GPUs as CUDA numbers them here (so indexes
    into an outer CUDA_VISIBLE_DEVICES), "cpu" the CPU."""
    if spec == "cpu":
        return ["cpu"]
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if spec != "auto":
        ids = [d.strip() for d in spec.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids):
            raise JCError(f"--devices takes auto, cpu or GPU ids like 0,1,3, not {spec!r}")
        if "CUDA_VISIBLE_DEVICES" not in os.environ:
            return ids
        if any(int(d) >= len(visible) for d in ids):
            raise JCError(
                f"--devices {spec}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
                f"shows {len(visible)} GPU(s), numbered from 0"
            )
        return [visible[int(d)] for d in ids]
    import torch

    count = torch.cuda.device_count()
    if not count:
        return ["cpu"]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _phases(plan: LocalPlan) -> Iterator[Phase]:
    """The rounds, each decided from the files just before it runs, so that a rerun does only
    what is unfinished (select's rounds as `slurm select --retry` finds them)."""
    argv = [plan.command, *plan.args]
    if plan.command == "score":
        yield Phase("score", argv, _score_tasks_left(plan))
        return
    if plan.command == "import":
        from jestcurate.pipelines.importer import unfinished_tasks

        yield Phase("import", argv, unfinished_tasks(plan.import_config, plan.num_tasks))
        return
    from jestcurate.pipelines.select import unfinished_rounds

    n, ledger = plan.num_tasks, plan.ledger
    yield Phase("round 1", argv, unfinished_rounds(plan.out, n, plan.export).scatter)
    yield Phase("round 2", argv, unfinished_rounds(plan.out, n, plan.export).select)
    if not unfinished_rounds(plan.out, n, plan.export).merged:
        # the last task of round 2 merges when it can; else this does
        yield Phase("merge", [*argv, "--merge", "--num-tasks", str(n)], None)
    if ledger:  # --ledger: the merge left the ledger's parts to the tasks (--spread-ledger)
        yield Phase("ledger", argv, unfinished_rounds(plan.out, n, False, True).ledger)
    if plan.export and not unfinished_rounds(plan.out, n, True).exported:
        yield Phase("export", [*argv, "--export"], list(range(n)))


def _check(plan: LocalPlan) -> Phase:
    """When the files show nothing left: one process that lets the command itself say whether
    they are its own output (it refuses other options) or there is nothing to do."""
    argv = [plan.command, *plan.args]
    if plan.command == "select":
        return Phase("merge", [*argv, "--merge", "--num-tasks", str(plan.num_tasks)], None, True)
    return Phase(plan.command, argv, [0], check=True)


def _score_tasks_left(plan: LocalPlan) -> list[int]:
    """Tasks with a shard not done, including those whose shards another run scores now: the
    task waits for them as plain `score` does (and takes over its own requeued claims)."""
    from jestcurate.io.shards import expand_inputs
    from jestcurate.scale.tasks import score_tasks_left

    urls = expand_inputs(plan.inputs)
    return score_tasks_left(plan.out, plan.upload_to, urls, plan.num_tasks, skip_busy=False)[0]


def _cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _core_shares(slots: int) -> list[set[int]]:
    """This process's cores split into `slots` disjoint shares, as Slurm's --cpus-per-task
    would give the tasks: decoding workers and torch's threads size themselves from it."""
    cores = _cores()
    if len(cores) < slots:
        return [set(cores)] * slots
    size = len(cores) // slots
    return [set(cores[i * size : (i + 1) * size]) for i in range(slots)]


@dataclass
class _Running:
    process: subprocess.Popen[bytes]
    phase: Phase
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
    if plan.upload_to:  # a mirror of its own: one task's marker sync cannot race another's
        from jestcurate.io.remote import cache_root

        env["JESTCURATE_CACHE"] = str(cache_root() / "local-tasks" / f"{task or 0:05d}")
    name = phase.name.replace(" ", "") + ("" if task is None else f"-{task:05d}")
    log = plan.out / LOCAL_DIR / "logs" / f"{name}.log"  # score-00003.log, round1-00003.log
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jestcurate", *argv]
    with open(log, "ab") as f:
        began = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"== {began} device {device}: {' '.join(command)}\n".encode())
        f.flush()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if cores and hasattr(os, "sched_setaffinity"):
        # at once, before the task's threads start (they inherit it); not in a preexec_fn,
        # which is unsafe while this process runs threads (a progress bar's)
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(process.pid, cores)
    return _Running(process, phase, task, slot, log)


def run(plan: LocalPlan, on_done: Callable[[Outcome], None] | None = None) -> LocalReport:
    """Run each round's tasks, as many at once as there are devices (on the CPU, one per core
    at most), each on its own device and share of the cores; the next round starts once every
    task of this one has ended. `on_done` hears of each task as it ends."""
    (plan.out / LOCAL_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        plan.out / LOCAL_DIR / PLAN,
        {"command": plan.command, "num_tasks": plan.num_tasks, "export": plan.export,
         "ledger": plan.ledger},
    )  # fmt: skip
    report = LocalReport(plan)
    for phase in _phases(plan):
        if not _run_round(plan, phase, report, on_done):
            return report
    if not report.outcomes:
        _run_round(plan, _check(plan), report, on_done)
    return report


def _run_round(
    plan: LocalPlan,
    phase: Phase,
    report: LocalReport,
    on_done: Callable[[Outcome], None] | None,
) -> bool:
    """Run one round; False when a task of it failed (the rounds after it must not run)."""
    jobs: list[int | None] = [None] if phase.tasks is None else list(phase.tasks)
    if not jobs:
        return True
    if phase.tasks is None:
        slots = 1
    elif plan.devices != ["cpu"]:
        slots = min(len(plan.devices), len(jobs))
    else:
        slots = min(len(jobs), len(_cores()))
    outcomes = _run_phase(plan, phase, jobs, slots, _core_shares(slots), on_done)
    report.outcomes += outcomes
    if any(o.code != 0 for o in outcomes):
        report.stopped_after = phase.name
        return False
    return True


def _run_phase(
    plan: LocalPlan,
    phase: Phase,
    jobs: list[int | None],
    slots: int,
    shares: list[set[int]],
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    waiting = list(jobs)
    free = list(range(slots))
    running: list[_Running] = []
    outcomes: list[Outcome] = []
    unit = "tasks" if phase.tasks is not None else "job"
    label = f"local {phase.name}" + (" (checking the finished files)" if phase.check else "")
    with _ended_with_us(running), ui.step_progress(label, len(jobs), unit) as tick:
        while waiting or running:
            while waiting and free:
                slot = free.pop(0)
                device = plan.devices[slot % len(plan.devices)]
                # a SIGTERM between the start and the append would leave the task unwatched
                with _signals_held():
                    running.append(_start(plan, phase, waiting.pop(0), slot, device, shares[slot]))
            time.sleep(0.2)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                code = int(job.process.returncode)
                outcome = Outcome(phase.name, job.task, code, job.log, phase.check)
                outcomes.append(outcome)
                tick()
                if on_done is not None:
                    on_done(outcome)
    return sorted(outcomes, key=lambda o: -1 if o.task is None else o.task)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _ended_with_us(running: list[_Running], grace: float = 30.0) -> Iterator[None]:
    """On Ctrl-C, SIGTERM or an error here, end the tasks too rather than leave them running
    unwatched: after Ctrl-C (which a terminal sends the tasks as well) they get a few seconds
    to stop by themselves, then SIGTERM, which each takes as a killed task would, leaving its
    files for the rerun; SIGKILL `grace` seconds later, for all of them together."""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Terminated):
            _wait(running, time.monotonic() + 5)
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                job.process.terminate()
        _wait(running, time.monotonic() + grace)
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                job.process.kill()
            job.process.wait()
        raise


def _wait(running: list[_Running], deadline: float) -> None:
    while any(j.process.poll() is None for j in running) and time.monotonic() < deadline:
        time.sleep(0.1)


def print_outcome(outcome: Outcome) -> None:
    """One line per ended task (a check that found nothing to do says nothing)."""
    if outcome.code == 0:
        if not outcome.check:
            ui.say(f"{outcome.label}: done")
    else:
        ui.note(f"{outcome.label} failed ({outcome.reason()}); log: {outcome.log}")


def print_report(report: LocalReport) -> None:
    plan = report.plan
    on = "the CPU" if plan.devices == ["cpu"] else f"GPUs {', '.join(plan.devices)}"
    failed = report.failed
    if not failed and all(o.check for o in report.outcomes):
        ui.say(f"nothing to do: every task of {plan.command} in {plan.out} is finished")
        return
    ran = len(report.outcomes)
    if not failed:
        logs = plan.out / LOCAL_DIR / "logs"
        ui.say(f"{plan.command}: {ran} task runs finished on {on}; logs in {logs}")
        return
    shown = some([o.label for o in failed], shown=5, sep=", ")
    after = ""
    if plan.command == "select" and report.stopped_after:
        after = f"; the rounds after {report.stopped_after} did not run"
    if any(o.code == BAD_INPUT for o in failed):
        then = "its log says what the command refused; fix that and rerun"
    else:
        then = "rerun the same command to finish"
    ui.note(f"{len(failed)} of {ran} task runs failed ({shown}){after}; {then}")
