"""select as array tasks: which task this run is, the task folders, the scatter round, and
the merge of the tasks' selections into one."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io import scatter as scatter_mod
from jestcurate.io.eligible import COUNTS, Counts
from jestcurate.io.notes import Notes
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import atomic_write, finished_output
from jestcurate.math.density import task_shares
from jestcurate.math.partition import interleave
from jestcurate.math.sampling import super_batch_size
from jestcurate.pipelines.select import ledger_round
from jestcurate.pipelines.select import quotas as quotas_mod
from jestcurate.pipelines.select.config import (
    LEDGER_DIR,
    MANIFEST,
    SCATTER_DIR,
    SUMMARY,
    TASKS_DIR,
    UIDS,
    SelectConfig,
)
from jestcurate.pipelines.select.filters.options import ORDER as FILTER_ORDER
from jestcurate.pipelines.select.inputs import Inputs, Rows, filters, nothing_passes
from jestcurate.pipelines.select.ledger import Choice, load_choice
from jestcurate.pipelines.select.outputs import Means, manifest_schema, write_summary
from jestcurate.pipelines.select.quotas import ClusterQuotas
from jestcurate.scale.tasks import resolve_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """What this run does: array task `index` of `count` (0 of 1: one run over every row), or,
    with `merge`, only the join of the `count` tasks' finished selections."""

    index: int
    count: int
    merge: bool = False

    @property
    def partitioned(self) -> bool:
        """A share of the rows, not all of them: its own folder, and a merge to come."""
        return self.count > 1 and not self.merge

    @property
    def where(self) -> str:
        """Where the rows come from, for messages ("" for one run)."""
        return f" in task {self.index}'s partition" if self.partitioned else ""


def this_task(cfg: SelectConfig) -> Task:
    """This run's task; --merge needs only the count."""
    if cfg.merge:
        count = cfg.num_tasks or _tasks_in(cfg.out)
        if count < 2:
            raise JCError("--merge joins the outputs of 2 or more array tasks (--num-tasks N)")
        return Task(0, count, merge=True)
    if cfg.task_index is None and cfg.num_tasks == 1:
        return Task(0, 1)  # --num-tasks 1: one selection over every row, whatever Slurm says
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    if cfg.task_index is None and count > 1:
        log.warning(
            "selecting as array task %d of %d (from Slurm's variables): from 1/%d of the rows; "
            "pass --num-tasks 1 for one selection over every row",
            index,
            count,
            count,
        )
    return Task(index, count)


def refuse_other_task_counts(out: Path, count: int) -> None:
    """Array-task outputs of another N (or any, for a single run) in OUT are another selection."""
    found = _task_counts(out)
    if found and found != {count}:
        shown = ", ".join(str(n) for n in sorted(found))
        raise JCError(
            f"{out / TASKS_DIR} holds array-task outputs for N = {shown}, not {count}; use "
            "the same --num-tasks or another --out"
        )


def _task_counts(out: Path) -> set[int]:
    folders = [*(out / TASKS_DIR).glob("*-of-*"), *(out / TASKS_DIR / SCATTER_DIR).glob("*-of-*")]
    return {int(p.name[-5:]) for p in folders if re.fullmatch(r"\d{5}-of-\d{5}", p.name)}


def task_count(out: Path) -> int | None:
    """N of the array-task outputs in OUT, or None where there are none (or several N)."""
    counts = _task_counts(out)
    return counts.pop() if len(counts) == 1 else None


def _tasks_in(out: Path) -> int:
    """The N of the OUT/tasks/I-of-N folders, when --merge is not told it."""
    counts = _task_counts(out)
    if len(counts) != 1:
        found = "none" if not counts else ", ".join(map(str, sorted(counts)))
        raise JCError(f"pass --num-tasks: {out / TASKS_DIR} holds task outputs for N = {found}")
    return counts.pop()


def task_directory(out: Path, index: int, count: int) -> Path:
    return out / TASKS_DIR / f"{index:05d}-of-{count:05d}"


def _task_summary(out: Path, identity: dict[str, Any], index: int) -> dict[str, Any] | None:
    count = identity["partition"]["num_tasks"]
    directory = task_directory(out, index, count)
    return finished_output(directory, SUMMARY, MANIFEST, {**identity, "task": index}, "task")


def unfinished_tasks(out: Path, identity: dict[str, Any], count: int) -> list[int]:
    """Tasks of this selection whose outputs are not finished yet."""
    return [i for i in range(count) if _task_summary(out, identity, i) is None]


@dataclass(frozen=True)
class Unfinished:
    """What `slurm select --retry` resubmits: the array tasks whose round 1 (scatter) or
    round 2 (select) has not finished, whether the merge and the export have, and (with
    --ledger --spread-ledger) the tasks with ledger parts left to write after the merge."""

    scatter: list[int]
    select: list[int]
    merged: bool
    exported: bool
    ledger: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.merged and self.exported and not self.ledger


def unfinished_rounds(out: Path, count: int, export: bool, ledger: bool = False) -> Unfinished:
    """From the files alone (each task checks its own against the selection when it runs).
    `ledger`: the tasks write the ledger's parts after the merge (--spread-ledger)."""
    from jestcurate.trainer.loader import export_meta

    exported = not export or export_meta(out) is not None
    if (out / SUMMARY).is_file():
        summary = ledger_round.read_summary(out)
        left: list[int] = []
        if ledger and ledger_round.is_pending(summary):
            left = ledger_round.tasks_left(out, int(summary["ledger"]["parts"]), count)
        return Unfinished([], [], True, exported, left)
    root = out / TASKS_DIR / SCATTER_DIR
    select = [i for i in range(count) if not (task_directory(out, i, count) / SUMMARY).is_file()]
    scatter = [
        i
        for i in range(count)
        if not (scatter_mod.scatter_directory(root, i, count) / scatter_mod.DONE).is_file()
    ]
    return Unfinished(scatter, select, False, not export, list(range(count)) if ledger else [])


def scatter_round(cfg: SelectConfig, inputs: Inputs, task: Task) -> list[dict[str, Any]] | None:
    """Round 1 (io/scatter.py): bucket this task's share of the parts, unless done; then every
    task's done.json, or None while some task has still to scatter."""
    index, count, identity = task.index, task.count, inputs.identity
    root = cfg.out / TASKS_DIR / SCATTER_DIR
    parts = len(range(index, len(inputs.ref.parts), count))
    mine = scatter_mod.scatter_directory(root, index, count)
    sums = cfg.cluster_quotas is not None
    if scatter_mod.read_done(mine, identity, cfg.ledger, sums) is not None:
        log.info("task %d of %d already scattered its rows", index, count)
    else:
        embeddings = cfg.cached_embeddings
        with ui.step_progress("scattering rows to tasks", parts, "parts") as tick:
            scatter_mod.scatter(inputs.ref, inputs.learner, filters(cfg, inputs.ref), embeddings,
                                root, index, count, identity, tick, cfg.ledger, sums)  # fmt: skip
    dones = [scatter_mod.read_done(scatter_mod.scatter_directory(root, s, count), identity,
                                   sums=sums) for s in range(count)]  # fmt: skip
    missing = [s for s, d in enumerate(dones) if d is None]
    if missing:
        log.info("task %d scattered; %d tasks have still to scatter", index, len(missing))
        return None
    return [d for d in dones if d is not None]


def gathered_rows(
    cfg: SelectConfig, inputs: Inputs, task: Task, dones: list[dict[str, Any]]
) -> Rows:
    """Round 2: this task's rows, from every task's buckets."""
    root = cfg.out / TASKS_DIR / SCATTER_DIR
    ref, learner = inputs.ref, inputs.learner

    def build(cache_dir: Path) -> RowCache:
        with ui.step_progress("gathering this task's rows", len(ref.parts), "parts") as tick:
            return scatter_mod.gather(ref, learner, root, dones, task.index, cache_dir, tick)

    names = tuple(dones[0].get("counts", COUNTS))
    counts = scatter_mod.counts_for(root, task.count, task.index, names)
    shared = global_quotas(cfg, task, names) if cfg.cluster_quotas is not None else None
    return Rows(counts, build, quotas=shared)


def global_quotas(cfg: SelectConfig, task: Task, names: tuple[str, ...]) -> ClusterQuotas:
    """--cluster-quotas as array tasks: the whole pool's quotas (every scatter's ClusterSums
    added up, as one run's cache would give) of the rows all tasks keep, and this task's share
    of them (math/density.task_shares: its caps for random and clip-score)."""
    root = cfg.out / TASKS_DIR / SCATTER_DIR
    big, b = cfg.sampling.super_batch, cfg.sampling.batch_size
    steps = [scatter_mod.counts_for(root, task.count, t, names).eligible // big
             for t in range(task.count)]  # fmt: skip
    if cfg.max_steps is not None:
        steps = [min(s, cfg.max_steps) for s in steps]
    found, pairs = scatter_mod.total_sums(root, task.count)
    quotas = quotas_mod.from_sums(cfg, found, sum(steps) * b)
    group = np.searchsorted(quotas.groups, pairs[1])
    shares = task_shares(quotas.quota, pairs[0], group, pairs[2], np.array(steps) * b)
    mine = pairs[0] == task.index
    own = dict(zip(pairs[1][mine].tolist(), shares[mine].tolist(), strict=True))
    return dataclasses.replace(quotas, shares=own)


def refuse_when_nothing_passes(cfg: SelectConfig, task: Task, dones: list[dict[str, Any]]) -> None:
    """Filters that leave no row of the whole score set: one line in every task, before
    round 2 writes anything (the counts of every scatter are global)."""
    root = cfg.out / TASKS_DIR / SCATTER_DIR
    names = tuple(dones[0].get("counts", COUNTS))
    counts = scatter_mod.total_counts(root, task.count, names)
    if counts.eligible == 0 and counts.removed:
        hint = f" (in another --out, or remove {cfg.out / TASKS_DIR} first)"
        raise JCError(nothing_passes(counts, cfg.dedup, hint))


def scatter_notes(
    out: Path, identity: dict[str, Any], count: int
) -> Callable[[int], tuple[Notes, int]]:
    """For the merge's ledger: what the scatters' filters said of each row (io/notes.py), as
    part id -> (a scatter's notes, the part's place in them)."""
    root = out / TASKS_DIR / SCATTER_DIR
    dones = [scatter_mod.read_done(scatter_mod.scatter_directory(root, s, count), identity)
             for s in range(count)]  # fmt: skip
    if any(d is None for d in dones):
        raise JCError(
            f"{root} no longer holds every scatter, so the merge cannot write a ledger: "
            "remove OUT/tasks and rerun the tasks with --ledger"
        )
    return scatter_mod.read_notes(root, [d for d in dones if d is not None])


def drop_buckets(cfg: SelectConfig, task: Task) -> None:
    """A task that selected no longer needs the rows bucketed for it."""
    scatter_mod.drop_buckets(cfg.out / TASKS_DIR / SCATTER_DIR, task.index, task.count)


# Writes the merged selection's ledger from the tasks' choices and each task's local step ->
# merged step; returns what the summary records of it (runner._write_ledger).
MergedLedger = Callable[[list[Choice], list[np.ndarray]], dict[str, Any]]


def _task_choices(
    out: Path, tasks: list[dict[str, Any]], order: list[tuple[int, int]]
) -> tuple[list[Choice], list[np.ndarray]]:
    """What each task chose (saved with --ledger), and where its steps went in the merge."""
    count = len(tasks)
    missing = [i for i, s in enumerate(tasks) if "ledger_choice" not in s]
    if missing:
        raise JCError(
            f"tasks {', '.join(map(str, missing[:10]))} of {out} selected without --ledger, so "
            "the merge has no ledger to write: merge without --ledger, or remove "
            f"{out / TASKS_DIR} and rerun every task with --ledger (their scatters kept no "
            "notes of the rows)"
        )
    choices = [load_choice(task_directory(out, i, count), s["ledger_choice"])
               for i, s in enumerate(tasks)]  # fmt: skip
    for i, (choice, s) in enumerate(zip(choices, tasks, strict=True)):
        eligible = int(s["counts"]["eligible"])
        if len(choice.drawn) != eligible or len(choice.slot) != eligible:
            raise JCError(
                f"task {i} of {out} chose from {eligible:,} eligible rows but saved "
                f"{len(choice.drawn):,} for the ledger: remove {out / TASKS_DIR} and rerun every "
                "task with --ledger"
            )
    step_of = [np.zeros(int(s["counts"]["steps"]), dtype=np.int64) for s in tasks]
    for step, (task, local) in enumerate(order):
        step_of[task][local] = step
    return choices, step_of


def merged_choices(
    out: Path, identity: dict[str, Any], count: int
) -> tuple[list[Choice], list[np.ndarray]]:
    """For the ledger round (after the merge): what each task chose and where its steps went."""
    summaries = [_task_summary(out, identity, i) for i in range(count)]
    if any(s is None for s in summaries):
        raise JCError(
            f"{out / TASKS_DIR} no longer holds every task's selection, so the ledger cannot be "
            "written: remove OUT and rerun every task with --ledger"
        )
    tasks = [s for s in summaries if s is not None]
    return _task_choices(out, tasks, interleave([int(s["counts"]["steps"]) for s in tasks]))


def merge(
    out: Path, identity: dict[str, Any], count: int, ledger: MergedLedger | None = None
) -> dict[str, Any]:
    """Join the N tasks' selections into OUT/manifest.parquet, uids.npy and summary.json: their
    batches interleaved into one step order (partition.interleave), counts summed, means from
    the tasks' exact sums; with `ledger`, the ledger too. Deterministic: the same task outputs
    give the same bytes."""
    summaries = [_task_summary(out, identity, i) for i in range(count)]
    missing = [i for i, s in enumerate(summaries) if s is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise JCError(
            f"cannot merge {out}: {len(missing)} of {count} tasks have not finished ({shown}); "
            "run them (select --task-index I --num-tasks N) first"
        )
    tasks: list[dict[str, Any]] = [s for s in summaries if s is not None]
    steps = [int(s["counts"]["steps"]) for s in tasks]
    if not sum(steps):
        given = identity["parameters"].get("filters") or {}
        names = tuple(name for name in FILTER_ORDER if name in given)
        total = Counts.from_summary(_summed([s["counts"] for s in tasks]), names)
        if total.eligible == 0 and total.removed:
            dedup = (identity["parameters"].get("dedup") or {}).get("path")
            raise JCError(nothing_passes(total, dedup))
        eligible = total.eligible
        b, ratio = identity["parameters"]["batch_size"], identity["parameters"]["ratio"]
        raise JCError(
            f"no task's partition holds one super-batch of B = {super_batch_size(b, ratio)} rows "
            f"({eligible} eligible in all, about {eligible // count} per task); use fewer "
            "tasks, a lower --batch-size or a higher --ratio"
        )
    learner = identity["inputs"]["learner"] is not None
    order = interleave(steps)
    files = [pq.ParquetFile(task_directory(out, i, count) / MANIFEST) for i in range(count)]

    def write(tmp: Path) -> None:
        schema = manifest_schema(learner)
        with (
            pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer,
            ui.step_progress("merging task manifests", len(order), "batches") as tick,
        ):
            for step, (task, local) in enumerate(order):
                table = files[task].read_row_group(local)
                renumbered = pa.array(np.full(table.num_rows, step, dtype=np.int64))
                table = table.set_column(0, schema.field("step"), renumbered)
                writer.write_table(table, row_group_size=max(table.num_rows, 1))  # one per step
                tick()

    atomic_write(out / MANIFEST, write)
    subset = None
    if all(s["outputs"]["uids"] for s in tasks):
        parts = [np.load(task_directory(out, i, count) / UIDS) for i in range(count)]
        subset = np.sort(np.concatenate(parts))
    counts = _summed([s["counts"] for s in tasks])
    kept, eligible = Means(), Means()
    for s in tasks:
        kept.merge(s["sums"]["kept"])
        eligible.merge(s["sums"]["eligible"])
    images = all(s["outputs"]["images"] for s in tasks)
    shares = [{"task": i, "steps": s["counts"]["steps"], "eligible": s["counts"]["eligible"]}
              for i, s in enumerate(tasks)]  # fmt: skip
    extra = ledger(*_task_choices(out, tasks, order)) if ledger is not None else {}
    quotas = [s["cluster_quotas"] for s in tasks if "cluster_quotas" in s]
    if quotas:  # every task's is the same global block
        extra["cluster_quotas"] = quotas[0]
    if ledger is None:  # an unfinished earlier merge's ledger is not this selection's
        shutil.rmtree(out / LEDGER_DIR, ignore_errors=True)
    summary = write_summary(out, identity, counts, kept, eligible, subset, images,
                            tasks=shares, **extra)  # fmt: skip
    if ledger is None:  # every task has its rows; with a ledger, the scatters' notes stay
        shutil.rmtree(out / TASKS_DIR / SCATTER_DIR, ignore_errors=True)  # (a merge again)
    else:  # but no bucket (a scatter made again may have filled those of finished tasks)
        scatter_mod.drop_all_buckets(out / TASKS_DIR / SCATTER_DIR)
    return summary


def _summed(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """The tasks' counts, summed name by name (None stays None)."""
    total: dict[str, Any] = {}
    for found in counts:
        for name, value in found.items():
            total[name] = None if value is None else total.get(name, 0) + value
    return total
