"""Array-task bookkeeping shared by score, import and select: which task this is (the flags,
else Slurm's variables), which shards are its own, and which tasks still have work left."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from jestcurate.errors import JCError
from jestcurate.io.integrity import PartFiles, read_markers
from jestcurate.io.shards import Shard
from jestcurate.scale.claims import CLAIMS_DIR, Claims, Owner
from jestcurate.scale.status import done_shard, named_shards


def resolve_task(
    task_index: int | None, num_tasks: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """This task's (index, count): from the flags, else Slurm's variables, else (0, 1).

    Slurm array ids need not start at 0 or step by 1, so the index is
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP.
    """
    env = os.environ if env is None else env
    if (task_index is None) != (num_tasks is None):
        raise JCError("--task-index and --num-tasks must be given together")
    if task_index is not None and num_tasks is not None:
        index, count = task_index, num_tasks
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            task_id = int(env["SLURM_ARRAY_TASK_ID"])
            low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or "1")
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        except ValueError:
            raise JCError(
                "Slurm array variables are not integers; pass --task-index/--num-tasks"
            ) from None
        if step <= 0 or (task_id - low) % step:
            raise JCError(
                f"cannot place array task {task_id} (min {low}, step {step}); "
                "pass --task-index/--num-tasks explicitly"
            )
        index = (task_id - low) // step
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        try:
            index, count = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        except ValueError:
            raise JCError("SLURM_PROCID/SLURM_NTASKS are not integers") from None
    else:
        index, count = 0, 1
    if count < 1:
        raise JCError(f"number of tasks must be at least 1, got {count}")
    if not 0 <= index < count:
        raise JCError(f"task index {index} is outside 0..{count - 1}")
    return index, count


def for_task(shards: Sequence[Shard], index: int, count: int) -> list[Shard]:
    """Round-robin split: deterministic, disjoint, and balanced when shard sizes drift."""
    return list(shards[index::count])


def unfinished_tasks(
    out: Path,
    urls: Sequence[str],
    num_tasks: int,
    files: PartFiles | None = None,
    skip_busy: bool = True,
) -> tuple[list[int], int]:
    """Array task indexes (of `num_tasks`) over the expanded input `urls` that still have a
    shard without an ok marker and (with `skip_busy`) not being scored by a live run; and how
    many tasks are skipped because all their remaining shards are being scored now."""
    markers = read_markers(out)
    files = files or PartFiles(out)
    shards = named_shards(urls, markers)
    claims = Claims(out, Owner.this_process()) if (out / CLAIMS_DIR).is_dir() else None
    todo, busy = [], 0
    for task in range(num_tasks):
        mine = for_task(shards, task, num_tasks)
        left = [s for s in mine if not done_shard(files, s.name, markers.get(s.name))]
        if not left:
            continue
        if skip_busy and claims is not None and all(claims.held_by_other(s.name) for s in left):
            busy += 1
            continue
        todo.append(task)
    return todo, busy


def score_tasks_left(
    out: Path, upload_to: str | None, urls: Sequence[str], num_tasks: int, skip_busy: bool = True
) -> tuple[list[int], int]:
    """unfinished_tasks of a score set in `out`, or, when it is written to the URL
    `upload_to`, of that set (`out` then being its local mirror)."""
    files = None
    if upload_to:
        from jestcurate.io.remote import Mirror, RemoteParts

        mirror = Mirror(upload_to, local=out)
        mirror.sync_markers()
        files = RemoteParts(mirror)
    return unfinished_tasks(out, urls, num_tasks, files, skip_busy)
