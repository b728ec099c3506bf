"""`jestcurate slurm score` and `slurm select`: sbatch array scripts that run a command per task.

Task t of N scores shards t, t+N, t+2N, ... (tasks.for_task). Clusters cap array indexes
below MaxArraySize, so a larger N is submitted as several array jobs of the same script, each
given its first task as an argument; the script passes `--task-index OFFSET+SLURM_ARRAY_TASK_ID
--num-tasks N` explicitly (SLURM_ARRAY_TASK_COUNT would be per job). Scoring is idempotent and
claims survive requeues, so the script asks Slurm to requeue tasks on node failure, and
`--retry` resubmits only the tasks that still have shards to do.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.store import read_json, write_json_atomic

SLURM_DIR = "slurm"
SCRIPT = "score.sbatch"
PLAN = "score.json"
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default for MaxArraySize


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem: str | None = None
    time: str = "24:00:00"
    max_concurrent: int | None = None
    account: str | None = None
    qos: str | None = None
    max_array_size: int | None = None  # None: ask scontrol, else Slurm's default
    extra: tuple[str, ...] = field(default_factory=tuple)  # more #SBATCH options, verbatim
    job_name: str = "jestcurate-score"


def cluster_max_array_size() -> int:
    """MaxArraySize from `scontrol show config`, or Slurm's default when that cannot be read."""
    if shutil.which("scontrol") is None:
        return DEFAULT_MAX_ARRAY_SIZE
    try:
        shown = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", shown, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY_SIZE


def array_spec(indices: Sequence[int], max_concurrent: int | None = None) -> str:
    """Slurm's --array value: sorted indexes folded into ranges, "0-99,120,130-131%8"."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{max_concurrent}" if max_concurrent else "")


def split_tasks(tasks: Sequence[int], size: int) -> list[tuple[int, list[int]]]:
    """Group task numbers into array jobs whose indexes stay below `size`: (offset, indexes)."""
    groups: dict[int, list[int]] = {}
    for task in sorted(tasks):
        offset = task // size * size
        groups.setdefault(offset, []).append(task - offset)
    return sorted(groups.items())


def script_text(
    out: Path,
    command: Sequence[str],
    num_tasks: int,
    opts: SlurmOptions,
    log_name: str = "score-%A_%a",
    array: bool = True,
    script: str = SCRIPT,
) -> str:
    """An sbatch script running `jestcurate COMMAND...`; an array script appends this task's
    `--task-index` and `--num-tasks`."""
    logs = out.resolve() / SLURM_DIR / "logs"
    sbatch = [
        f"--job-name={opts.job_name}",
        "--ntasks=1",
        f"--cpus-per-task={opts.cpus_per_task}",
        f"--time={opts.time}",
        "--requeue",  # safe: every step resumes from what it finished and redoes the rest
        "--open-mode=append",  # a requeued task appends to its log
        f"--output={logs}/{log_name}.out",
        # relative paths in the command (inputs, checkpoints) resolve in the job as they did
        # where it was written, whichever folder sbatch is run from
        f"--chdir={Path.cwd()}",
    ]
    if opts.gpus_per_task:
        sbatch.append(f"--gpus-per-task={opts.gpus_per_task}")
    for flag, value in (
        ("partition", opts.partition),
        ("mem", opts.mem),
        ("account", opts.account),
        ("qos", opts.qos),
    ):
        if value:
            sbatch.append(f"--{flag}={value}")
    sbatch += [e if e.startswith("-") else f"--{e}" for e in opts.extra]
    argv = [sys.executable, "-m", "jestcurate", *command]
    what = f"`jestcurate slurm {command[0]}`"
    if not array:
        return "\n".join([
            "#!/bin/bash",
            f"# Written by jestcurate {__version__} ({what}): one job.",
            *[f"#SBATCH {shlex.quote(s)}" for s in sbatch],
            "set -euo pipefail",
            f"exec {shlex.join(argv)}",
            "",
        ])  # fmt: skip
    lines = [
        "#!/bin/bash",
        f"# Written by jestcurate {__version__} ({what}): {num_tasks} tasks.",
        f"# Submit: sbatch --array=0-K {script} OFFSET   (runs tasks OFFSET..OFFSET+K)",
        *[f"#SBATCH {shlex.quote(s)}" for s in sbatch],
        "set -euo pipefail",
        'offset="${1:-0}"',
        "task=$((offset + SLURM_ARRAY_TASK_ID))",
        f"exec {shlex.join(argv)} \\",
        f'    --task-index "$task" --num-tasks {num_tasks}',
        "",
    ]
    return "\n".join(lines)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "logs").mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return path


def write_script(out: Path, score_args: Sequence[str], num_tasks: int, opts: SlurmOptions) -> Path:
    """Write OUT/slurm/score.sbatch and OUT/slurm/score.json (the plan `--retry` reads)."""
    directory = out / SLURM_DIR
    script = _write(directory / SCRIPT, script_text(out, ["score", *score_args], num_tasks, opts))
    write_json_atomic(
        directory / PLAN,
        {"num_tasks": num_tasks, "score_args": list(score_args), "tool_version": __version__},
    )
    return script


@dataclass(frozen=True)
class SelectScripts:
    select: Path  # the array: each task selects from its partition
    merge: Path  # one job after the array: joins the tasks (if the last task has not already)
    export: Path | None  # with --export, an array after the merge: each task its share of shards
    # with --ledger (--spread-ledger), an array after the merge: each task its ledger parts
    ledger: Path | None = None


SELECT_SCRIPT = "select.sbatch"
LEDGER_SCRIPT = "select-ledger.sbatch"


def written_command(path: Path) -> list[str]:
    """A written script's command lines (not its #SBATCH resources): what --retry keeps."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line for line in lines if not line.startswith("#")]


def write_select_scripts(
    out: Path,
    select_args: Sequence[str],
    num_tasks: int,
    opts: SlurmOptions,
    export_args: Sequence[str] | None = None,
) -> SelectScripts:
    """Write OUT/slurm/select.sbatch, select-merge.sbatch, (with export_args)
    select-export.sbatch and (with --spread-ledger among select_args) select-ledger.sbatch:
    the select command again, without a GPU, run after the merge to write the ledger."""
    directory = out / SLURM_DIR
    command = ["select", *select_args]
    array = _write(
        directory / SELECT_SCRIPT,
        script_text(out, command, num_tasks, opts, "select-%A_%a", script=SELECT_SCRIPT),
    )
    merge_opts = replace(opts, gpus_per_task=0, job_name=f"{opts.job_name}-merge")
    merge_command = [*command, "--merge", "--num-tasks", str(num_tasks)]
    merge = _write(
        directory / "select-merge.sbatch",
        script_text(out, merge_command, num_tasks, merge_opts, log_name="merge-%j", array=False),
    )
    export = None
    if export_args is not None:
        export_opts = replace(opts, gpus_per_task=0, job_name=f"{opts.job_name}-export")
        export = _write(
            directory / "select-export.sbatch",
            script_text(out, [*command, "--export", *export_args], num_tasks, export_opts,
                        "export-%A_%a", script="select-export.sbatch"),
        )  # fmt: skip
    ledger = None
    if "--spread-ledger" in select_args:
        ledger_opts = replace(opts, gpus_per_task=0, job_name=f"{opts.job_name}-ledger")
        ledger = _write(
            directory / LEDGER_SCRIPT,
            script_text(out, command, num_tasks, ledger_opts, "ledger-%A_%a",
                        script=LEDGER_SCRIPT),
        )  # fmt: skip
    return SelectScripts(array, merge, export, ledger)


def read_plan(out: Path, name: str = PLAN, command: str = "score") -> dict[str, Any]:
    """The plan `slurm COMMAND` wrote as OUT/slurm/NAME, which --retry needs."""
    path = out / SLURM_DIR / name
    if not path.is_file():
        raise JCError(
            f"nothing to retry: {path} does not exist (run slurm {command} without --retry)"
        )
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable: {exc}") from None


def submit(
    script: Path, tasks: Sequence[int], opts: SlurmOptions, after: Sequence[str] = ()
) -> list[str]:
    """Submit `tasks` as array jobs of at most MaxArraySize indexes, each starting only after
    the jobs `after` succeeded; returns the job ids."""
    return [job for job, _ in submit_arrays(script, tasks, opts, after)]


def submit_arrays(
    script: Path, tasks: Sequence[int], opts: SlurmOptions, after: Sequence[str] = ()
) -> list[tuple[str, int]]:
    """submit(), returning each array job's id with its first task (task = offset + index)."""
    size = opts.max_array_size or cluster_max_array_size()
    return [
        (
            _sbatch(script, [f"--array={array_spec(idx, opts.max_concurrent)}"], after, offset),
            offset,
        )
        for offset, idx in split_tasks(tasks, size)
    ]


def queued(jobs: Sequence[str]) -> list[str] | None:
    """squeue's lines ("123_[1-2] PENDING Dependency") for those of `jobs` still queued or
    running; None where squeue cannot be asked."""
    if not jobs or shutil.which("squeue") is None:
        return None
    try:
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(jobs)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode != 0:  # e.g. every job id has left the controller's memory
        return [] if "Invalid job id" in listed.stderr else None
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def submit_one(script: Path, after: Sequence[str] = ()) -> str:
    """Submit a single job that starts after the jobs `after` succeeded."""
    return _sbatch(script, [], after, None)


def _sbatch(script: Path, flags: list[str], after: Sequence[str], offset: int | None) -> str:
    if shutil.which("sbatch") is None:
        raise JCError(f"sbatch is not on PATH; submit {script} by hand (see its header)")
    cmd = ["sbatch", "--parsable", *flags]
    if after:
        # A job whose dependency fails can never start: Slurm cancels it instead of leaving
        # it pending for good, and so on down the chain.
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    cmd += [str(script), *([] if offset is None else [str(offset)])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise JCError(
            f"sbatch failed for {script.name}: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class ScoreArrayConfig:
    """`slurm score`: the `score` options every task runs with, and how to split the shards."""

    inputs: tuple[str, ...]
    out: Path  # the local folder (for a URL, its mirror)
    model: str
    upload_to: str | None = None  # --out as an fsspec URL
    pretrained: str | None = None
    batch_size: int | None = None  # None: 256 with GPUs, else 64 (written into the script)
    device: str = "auto"
    precision: str | None = None
    workers: int | None = None
    role: str = "reference"
    decode: str = "auto"
    num_tasks: int | None = None  # None: shards / shards_per_task
    shards_per_task: int = 16
    retry: bool = False  # resubmit the tasks of the written plan that have shards left
    submit: bool = False
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def score_args(self) -> list[str]:
        """Each task's `score` arguments. The batch size is explicit, so that plans (and
        --retry's comparison with the written one) compare like with like."""
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = 256 if self.slurm.gpus_per_task else 64
        out = self.upload_to or str(self.out.resolve())
        args = [*self.inputs, "--out", out, "--model", self.model]
        for flag, value in (
            ("--pretrained", self.pretrained),
            ("--batch-size", batch_size),
            ("--device", self.device),
            ("--precision", self.precision),
            ("--workers", self.workers),
            ("--role", self.role),
            ("--decode", self.decode if self.decode != "auto" else None),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args


@dataclass(frozen=True)
class ScoreArray:
    """What `slurm score` wrote and submitted."""

    script: Path | None  # None: --retry found no task with shards left to do
    num_tasks: int
    shards: int
    tasks: list[int]  # the tasks submitted (without --submit: to submit)
    jobs: list[str]  # sbatch's job ids; none without --submit
    busy: int = 0  # --retry: tasks not counted because other runs are scoring their shards
    retry: bool = False


def score_array(cfg: ScoreArrayConfig, written: Callable[[str], None] | None = None) -> ScoreArray:
    """Write OUT/slurm/score.sbatch and its plan, and submit it with --submit; with --retry,
    resubmit the plan's tasks that have shards left. Bad inputs and a checkpoint that does not
    fit the model fail here, not in a thousand tasks. `written` hears of a new script before it
    is submitted, so that a failed sbatch leaves its path known."""
    from jestcurate.io.shards import expand_inputs
    from jestcurate.model.openclip import ModelSpec, check_fit, resolve_spec

    args = cfg.score_args()
    urls = expand_inputs(cfg.inputs)
    shards = len(urls)
    check_fit(resolve_spec(ModelSpec(cfg.model, cfg.pretrained, device="cpu"), fetch=False))
    if cfg.retry:
        return _retry_score_array(cfg, args, urls)
    if cfg.shards_per_task < 1:
        raise JCError("--shards-per-task must be at least 1")
    count = cfg.num_tasks or -(-shards // cfg.shards_per_task)
    if count < 1:
        raise JCError("--num-tasks must be at least 1")
    count = min(count, shards)
    script = write_script(cfg.out, args, count, cfg.slurm)
    if written is not None:
        written(str(script))
    jobs = submit(script, range(count), cfg.slurm) if cfg.submit else []
    return ScoreArray(script, count, shards, list(range(count)), jobs)


def _retry_score_array(cfg: ScoreArrayConfig, args: list[str], urls: list[str]) -> ScoreArray:
    """--retry: the written plan's tasks that still have shards to do, resubmitted."""
    from jestcurate.scale.tasks import score_tasks_left

    plan = read_plan(cfg.out)
    if plan["score_args"] != args:
        raise JCError(
            f"these options differ from the plan in {cfg.out / SLURM_DIR / PLAN}; "
            "--retry needs the same inputs and score options"
        )
    count = int(plan["num_tasks"])
    tasks, busy = score_tasks_left(cfg.out, cfg.upload_to, urls, count)
    if not tasks:
        return ScoreArray(None, count, len(urls), [], [], busy, retry=True)
    script = write_script(cfg.out, args, count, cfg.slurm)
    jobs = submit(script, tasks, cfg.slurm)
    return ScoreArray(script, count, len(urls), tasks, jobs, busy, retry=True)


def print_score_array(array: ScoreArray) -> None:
    """What `slurm score` did (a new script's path is printed as it is written)."""
    note = f" ({array.busy} more are running now)" if array.busy else ""
    print_array(array.script, array.num_tasks, array.tasks, array.jobs, array.retry,
                f"{array.shards} shards", f"no task has shards left to do{note}", note)  # fmt: skip


def print_array(
    script: Path | None,
    num_tasks: int,
    tasks: Sequence[int],
    jobs: Sequence[str],
    retry: bool,
    over: str,
    nothing: str,
    note: str = "",
) -> None:
    """What `slurm score` or `slurm import` did with an array over `over` ("40 shards"):
    submitted, resubmitted (`note` says why some were not), nothing to retry, or how to
    submit it by hand."""
    shown = ", ".join(jobs)
    if retry and script is None:
        ui.stdout.print(f"nothing to retry: {nothing}")
    elif retry:
        ui.say(f"resubmitted {len(tasks)} of {num_tasks} tasks{note} as job(s) {shown}: {script}")
    elif jobs:
        ui.say(f"submitted {num_tasks} tasks over {over} as job(s) {shown}")
    else:
        ui.note(
            f"{num_tasks} tasks over {over}; submit with --submit, or "
            f"sbatch --array=0-{num_tasks - 1} {script} 0"
        )
