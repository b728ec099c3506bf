"""`jestcurate slurm score`: an sbatch array script that runs `jestcurate score` per task.

Task t of N scores shards t, t+N, t+2N, ... (shards.for_task). Clusters cap array indexes
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jestcurate import __version__
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


def script_text(out: Path, score_args: Sequence[str], num_tasks: int, opts: SlurmOptions) -> str:
    logs = out.resolve() / SLURM_DIR / "logs"
    sbatch = [
        f"--job-name={opts.job_name}",
        "--ntasks=1",
        f"--cpus-per-task={opts.cpus_per_task}",
        f"--time={opts.time}",
        "--requeue",  # safe: scoring resumes from the markers and takes over its own claims
        "--open-mode=append",  # a requeued task appends to its log
        f"--output={logs}/score-%A_%a.out",
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
    command = [sys.executable, "-m", "jestcurate", "score", *score_args]
    lines = [
        "#!/bin/bash",
        f"# Written by jestcurate {__version__} (`jestcurate slurm score`): {num_tasks} tasks.",
        "# Submit: sbatch --array=0-K score.sbatch OFFSET   (runs tasks OFFSET..OFFSET+K)",
        *[f"#SBATCH {shlex.quote(s)}" for s in sbatch],
        "set -euo pipefail",
        'offset="${1:-0}"',
        "task=$((offset + SLURM_ARRAY_TASK_ID))",
        f"exec {shlex.join(command)} \\",
        f'    --task-index "$task" --num-tasks {num_tasks}',
        "",
    ]
    return "\n".join(lines)


def write_script(out: Path, score_args: Sequence[str], num_tasks: int, opts: SlurmOptions) -> Path:
    """Write OUT/slurm/score.sbatch and OUT/slurm/score.json (the plan `--retry` reads)."""
    directory = out / SLURM_DIR
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    script = directory / SCRIPT
    script.write_text(script_text(out, score_args, num_tasks, opts), encoding="utf-8")
    script.chmod(0o755)
    write_json_atomic(
        directory / PLAN,
        {"num_tasks": num_tasks, "score_args": list(score_args), "tool_version": __version__},
    )
    return script


def read_plan(out: Path) -> dict[str, Any]:
    path = out / SLURM_DIR / PLAN
    if not path.is_file():
        raise JCError(f"nothing to retry: {path} does not exist (run slurm score without --retry)")
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable: {exc}") from None


def submit(script: Path, tasks: Sequence[int], opts: SlurmOptions) -> list[str]:
    """Submit `tasks` as array jobs of at most MaxArraySize indexes; returns the job ids."""
    if shutil.which("sbatch") is None:
        raise JCError(f"sbatch is not on PATH; submit {script} by hand (see its header)")
    size = opts.max_array_size or cluster_max_array_size()
    jobs = []
    for offset, indexes in split_tasks(tasks, size):
        cmd = ["sbatch", "--parsable", f"--array={array_spec(indexes, opts.max_concurrent)}"]
        cmd += [str(script), str(offset)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            submitted = f" after submitting {', '.join(jobs)}" if jobs else ""
            raise JCError(f"sbatch failed{submitted}: {done.stderr.strip() or done.stdout.strip()}")
        jobs.append(done.stdout.strip().split(";")[0])
    return jobs
