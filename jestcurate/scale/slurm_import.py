"""`jestcurate slurm import`: an sbatch array script running `jestcurate import` per task (task
t of N imports the source files, or with --shards the tars, t, t+N, t+2N, ...), a plan that
--retry reads, and the submission, through slurm.py's script_text and submit.

Scale sits below the pipelines, so the importer's own listing (which tasks have files left,
pipelines.importer's targets and unfinished_tasks) is handed to run() by the command line.

The script's paths are absolute (SOURCE, --out, --shards, a --pretrained file), so it means the
same whichever folder it is submitted from. Import skips every part with an ok marker, so the
script asks Slurm to requeue tasks after node failures, and `--retry` resubmits only the tasks
with a part still to write."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jestcurate import __version__
from jestcurate.errors import JCError
from jestcurate.io.remote import is_url
from jestcurate.io.store import write_json_atomic
from jestcurate.scale import slurm

SCRIPT = "import.sbatch"
PLAN = "import.json"


def default_options() -> slurm.SlurmOptions:
    return slurm.SlurmOptions(gpus_per_task=0, job_name="jestcurate-import")


class ImportOptions(Protocol):
    """`import`'s options as the script passes them on (pipelines.importer.ImportConfig)."""

    @property
    def source(self) -> Path: ...
    @property
    def out(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def pretrained(self) -> str | None: ...
    @property
    def embeddings(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def logit_scale(self) -> float | None: ...
    @property
    def logit_bias(self) -> float | None: ...
    @property
    def loss(self) -> str | None: ...
    @property
    def task_index(self) -> int | None: ...
    @property
    def num_tasks(self) -> int | None: ...
    @property
    def shards(self) -> tuple[str, ...]: ...


# pipelines.importer's: check the options and list what gets a part; the tasks (of a count)
# with a part left to write.
Targets = Callable[[Any], Sequence[Any]]
Unfinished = Callable[[Any, int], list[int]]


@dataclass(frozen=True)
class ImportArrayConfig:
    """`slurm import`: the `import` options every task runs with (its task_index and num_tasks
    unset: the script passes them), and how many tasks."""

    job: ImportOptions
    num_tasks: int
    retry: bool = False  # resubmit the tasks of the written plan that have parts left
    submit: bool = False
    slurm: slurm.SlurmOptions = field(default_factory=default_options)


def _absolute(location: str) -> str:
    """A local path, glob, brace pattern or @list as an absolute one; a URL as it is."""
    if location.startswith("@"):
        return "@" + _absolute(location[1:])
    if is_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def import_args(job: ImportOptions) -> list[str]:
    """Each task's `import` arguments, paths made absolute, defaults written out, so that the
    plan (and --retry's comparison with it) compares like with like."""
    pretrained = job.pretrained
    if pretrained is not None and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    args = [str(job.source.resolve()), "--out", str(job.out.resolve()), "--format", job.format]
    args += ["--model", job.model]
    for flag, value in (
        ("--pretrained", pretrained),
        ("--embeddings", job.embeddings),
        ("--role", job.role),
        ("--logit-scale", job.logit_scale),
        ("--logit-bias", job.logit_bias),
        ("--loss", job.loss),
    ):
        if value is not None:
            args += [flag, str(value)]
    for shards in job.shards:
        args += ["--shards", _absolute(shards)]
    return args


@dataclass(frozen=True)
class ImportArray:
    """What `slurm import` wrote and submitted."""

    script: Path | None  # None: --retry found no task with a part left to write
    num_tasks: int
    targets: int  # source files, or with --shards tars
    tasks: list[int]  # the tasks submitted (without --submit: to submit)
    jobs: list[str]  # sbatch's job ids; none without --submit
    retry: bool = False
    tied: bool = False  # --shards


def _write(out: Path, args: list[str], count: int, cfg: ImportArrayConfig) -> Path:
    """Write OUT/slurm/import.sbatch and its plan OUT/slurm/import.json (at absolute paths)."""
    out = out.resolve()
    directory = out / slurm.SLURM_DIR
    text = slurm.script_text(
        out, ["import", *args], count, cfg.slurm, "import-%A_%a", script=SCRIPT
    )
    script = slurm._write(directory / SCRIPT, text)
    plan = {"num_tasks": count, "asked_num_tasks": cfg.num_tasks, "import_args": args,
            "tool_version": __version__}  # fmt: skip
    write_json_atomic(directory / PLAN, plan)
    return script


def run(
    cfg: ImportArrayConfig,
    targets: Targets,
    unfinished: Unfinished,
    written: Callable[[str], None] | None = None,
) -> ImportArray:
    """Write OUT/slurm/import.sbatch and its plan, and submit it with --submit; with --retry,
    resubmit the plan's tasks that have parts left to write (`unfinished`). Bad options, a
    source without its files and missing shards fail here (`targets` checks them), not in every
    task. `written` hears of a new script before it is submitted, so that a failed sbatch
    leaves its path known."""
    job = cfg.job
    if job.task_index is not None or job.num_tasks is not None:
        raise JCError("--task-index and --num-tasks of import are the script's to set")
    if cfg.num_tasks < 1:
        raise JCError("--num-tasks must be at least 1")
    args = import_args(job)
    listed = len(targets(job))
    tied = bool(job.shards)
    if cfg.retry:
        plan = slurm.read_plan(job.out, PLAN, "import")
        if plan.get("import_args") != args or plan.get("asked_num_tasks") != cfg.num_tasks:
            raise JCError(
                f"these options differ from the plan in {job.out / slurm.SLURM_DIR / PLAN}; "
                "--retry needs the same source, import options and --num-tasks"
            )
        count = int(plan["num_tasks"])
        tasks = unfinished(job, count)
        if not tasks:
            return ImportArray(None, count, listed, [], [], retry=True, tied=tied)
        script = _write(job.out, args, count, cfg)  # the Slurm options may have changed
        jobs = slurm.submit(script, tasks, cfg.slurm)
        return ImportArray(script, count, listed, tasks, jobs, retry=True, tied=tied)
    count = min(cfg.num_tasks, listed)
    script = _write(job.out, args, count, cfg)
    if written is not None:
        written(str(script))
    jobs = slurm.submit(script, range(count), cfg.slurm) if cfg.submit else []
    return ImportArray(script, count, listed, list(range(count)), jobs, tied=tied)


def print_report(array: ImportArray) -> None:
    """What `slurm import` did (a new script's path is printed as it is written)."""
    what = "shards" if array.tied else "source files"
    slurm.print_array(array.script, array.num_tasks, array.tasks, array.jobs, array.retry,
                      f"{array.targets} {what}", f"every task's {what} are imported")  # fmt: skip
