"""`select`'s run: reuse a finished selection, or choose and write a new one (in one run, as
an array task, or by merging tasks)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io import scatter as scatter_mod
from jestcurate.io.eligible import Counts, fill_cache, scan, score_columns
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import (
    META_NAME,
    ScoreSet,
    file_digests,
    finished_output,
    open_score_set,
    read_json,
    write_json_atomic,
)
from jestcurate.math.sampling import super_batch_size
from jestcurate.pipelines.select.choosing import choose
from jestcurate.pipelines.select.config import (
    MANIFEST,
    SCATTER_DIR,
    SELECTION_SCHEMA_VERSION,
    SUMMARY,
    SUPER_BATCH_METHODS,
    TASKS_DIR,
    UIDS,
    SelectConfig,
    _validate,
)
from jestcurate.pipelines.select.inputs import _filters, _identity, _warn_failed_shards
from jestcurate.pipelines.select.outputs import (
    _Means,
    _outputs,
    _write_uids,
    datacomp_uids,
    remove_selection,
    write_manifest,
)
from jestcurate.pipelines.select.tasks import (
    _refuse_other_task_counts,
    _scatter,
    _task,
    merge,
    partition_identity,
    task_directory,
    unfinished_tasks,
)

log = logging.getLogger(__name__)


@dataclass
class SelectReport:
    out: Path
    summary: dict[str, Any]
    reused: bool
    seconds: float
    task: int | None = None  # set when this was an array task whose merge is still to come
    waiting: str | None = None  # "scatter": this task bucketed its rows; others have still to


def run(cfg: SelectConfig) -> SelectReport:
    """Select and write the outputs; rerunning with the same inputs reuses a finished selection.

    As array task I of N (--task-index/--num-tasks, or Slurm's variables) it selects from its
    own partition into OUT/tasks/ and, when it is the last task to finish, merges all of them;
    with --merge it only merges."""
    began = time.time()
    _validate(cfg)
    index, count = _task(cfg)
    ref = open_score_set(cfg.reference, role="reference")
    learner = open_score_set(cfg.learner, role="learner") if cfg.learner else None
    for scores in (ref, learner):
        _warn_failed_shards(scores)
    identity = _identity(cfg, ref, learner)
    if count > 1:
        identity["partition"] = partition_identity(count)
    done = _existing(cfg, identity, count)
    if done is not None:
        log.info("%s already holds this selection; nothing to do", cfg.out)
        return SelectReport(cfg.out, done, reused=True, seconds=time.time() - began)
    if cfg.merge:
        summary = merge(cfg.out, identity, count)
        return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)
    if count == 1:
        filters = _filters(cfg, ref)
        with ui.step_progress("checking score sets", len(ref.parts), "parts") as tick:
            found = scan(ref, learner, filters, on_part=tick)

        def build(cache_dir: Path) -> RowCache:
            embeddings = cfg.method in SUPER_BATCH_METHODS
            with ui.step_progress("copying eligible rows", len(ref.parts), "parts") as tick:
                return fill_cache(ref, learner, found, cache_dir, filters, embeddings, tick)

        summary = _select_into(cfg, cfg.out, ref, learner, identity, found.counts, build)
        return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)

    task_dir = task_directory(cfg.out, index, count)
    task_identity = {**identity, "task": index}
    mine = finished_output(task_dir, SUMMARY, MANIFEST, task_identity, "task selection")
    if mine is None:
        dones = _scatter(cfg, ref, learner, identity, index, count)
        if dones is None:  # round 2 waits for every task's round 1
            return SelectReport(task_dir, {}, reused=False, seconds=time.time() - began,
                                task=index, waiting="scatter")  # fmt: skip
        root = cfg.out / TASKS_DIR / SCATTER_DIR
        counts = scatter_mod.counts_for(root, count, index)

        def build(cache_dir: Path) -> RowCache:
            label = "gathering this task's rows"
            with ui.step_progress(label, len(ref.parts), "parts") as tick:
                return scatter_mod.gather(ref, learner, root, dones, index, cache_dir, tick)

        where = f" in task {index}'s partition"
        mine = _select_into(cfg, task_dir, ref, learner, task_identity, counts, build, where)
        scatter_mod.drop_buckets(root, index, count)
    else:
        log.info("task %d of %d already finished in %s", index, count, task_dir)
    waiting = unfinished_tasks(cfg.out, identity, count)
    if waiting:  # another task merges when it finishes last
        log.info("task %d of %d done; %d tasks still to finish", index, count, len(waiting))
        return SelectReport(task_dir, mine, reused=False, seconds=time.time() - began, task=index)
    summary = merge(cfg.out, identity, count)
    return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)


def _existing(cfg: SelectConfig, identity: dict[str, Any], count: int) -> dict[str, Any] | None:
    """The summary of the finished selection OUT holds with this identity (to reuse), or None
    (to select); a refusal for anything else OUT holds, unless --overwrite replaces it."""
    _refuse_other_outputs(cfg.out)
    if cfg.overwrite:
        if count > 1 or cfg.merge:
            raise JCError(
                "--overwrite replaces a selection made in one run; array tasks would remove "
                f"each other's work: remove {cfg.out} first instead"
            )
        return None  # removed once the new selection is known to be possible (_select_into)
    _refuse_other_task_counts(cfg.out, count)
    instead = "use another --out, or --overwrite to replace it"
    done = finished_output(cfg.out, SUMMARY, MANIFEST, identity, "selection", instead)
    if done is not None and done.get("partition") != identity.get("partition"):
        there, now = (_made_as(x.get("partition")) for x in (done, identity))
        raise JCError(
            f"{cfg.out} holds a different selection (partition: {there} there, {now} now); "
            f"{instead}"
        )
    return done


def _refuse_other_outputs(out: Path) -> None:
    """A score set or a dedup output in OUT is not a selection, to reuse or to replace."""
    from jestcurate.pipelines.dedup import OUTPUT as DEDUP_OUTPUT

    for name, what in ((META_NAME, "a score set"), (DEDUP_OUTPUT, "a dedup output")):
        if (out / name).exists():
            raise JCError(f"{out} is {what}, not a selection; use another --out")
    summary = out / SUMMARY
    if summary.is_file():
        try:
            found = read_json(summary)
        except (OSError, ValueError):
            return  # finished_output reports it; --overwrite replaces it
        if "method" not in found:
            raise JCError(f"{summary} is not a selection's summary; use another --out")


def _made_as(partition: dict[str, Any] | None) -> str:
    return f"{partition.get('num_tasks')} array tasks" if partition else "one run"


def _too_few_rows(cfg: SelectConfig, counts: Counts) -> str:
    """Why there is no super-batch: the eligible rows, what the filters took out of the rows and
    the option to change (the filter's own when one took most of what it was given)."""
    removed = [
        (counts.errors, "are errors"),
        (counts.below_min_clip_score, "are below --min-clip-score"),
        (counts.duplicates, f"were dropped by --dedup {cfg.dedup}"),
    ]
    said = ", ".join(f"{n:,} {what}" for n, what in removed if n)
    line = (
        f"{counts.eligible:,} eligible rows{f' (of {counts.rows:,}: {said})' if said else ''} are "
        f"fewer than one super-batch of B = round(b / ratio) = {cfg.sampling.super_batch:,}; "
    )
    ok = counts.rows - counts.errors
    offered = ok - counts.below_min_clip_score  # what dedup's verdicts applied to
    if counts.duplicates > offered / 2:
        line += (
            f"the dedup dropped most rows ({counts.duplicates:,} of {offered:,}): rerun "
            "`jestcurate dedup` with a smaller --eps (its warning suggests one when the embedding "
            "space looks collapsed), or "
        )
    elif counts.below_min_clip_score and counts.below_min_clip_score == ok:
        return (
            f"no row passes --min-clip-score {cfg.min_clip_score}: all {ok:,} scored rows are "
            "below it (`jestcurate info` on the score set shows its clip_score quantiles)"
        )
    elif counts.below_min_clip_score > ok / 2:
        line += "lower --min-clip-score, or "
    ratio = cfg.sampling.ratio
    fits = _largest_batch(counts.eligible, ratio)
    if fits < 1:
        return f"{line}raise --ratio"
    return f"{line}pass --batch-size {fits:,} or less (at --ratio {ratio:g}), or raise --ratio"


def _largest_batch(rows: int, ratio: float) -> int:
    """The largest b whose super-batch fits in `rows`."""
    b = int(rows * ratio) + 1
    while b > 0 and super_batch_size(b, ratio) > rows:
        b -= 1
    return b


def _select_into(
    cfg: SelectConfig,
    out: Path,
    ref: ScoreSet,
    learner: ScoreSet | None,
    identity: dict[str, Any],
    counts: Counts,
    build: Callable[[Path], RowCache],
    where: str = "",
) -> dict[str, Any]:
    """Choose from the eligible rows `build` copies into a cache, and write manifest, uids and
    (last) summary into `out`."""
    big = cfg.sampling.super_batch if cfg.method in SUPER_BATCH_METHODS else None
    steps = counts.eligible // cfg.sampling.super_batch
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps == 0 and not where:
        raise JCError(_too_few_rows(cfg, counts))
    if steps == 0:  # a task's partition too small: its rows are tail, the other tasks go on
        log.warning("%d eligible rows%s: less than one super-batch", counts.eligible, where)
    if cfg.overwrite:  # the new selection is possible: now the old one goes
        remove_selection(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / ".cache"
    try:
        cache = build(cache_dir)
        everything = _Means()
        for start in range(0, cache.size, 1 << 20):
            stop = min(start + (1 << 20), cache.size)
            columns = score_columns(learner is not None)
            everything.add({c: cache.read_range(c, start, stop) for c in columns})
        label = f"selecting ({cfg.method})"
        with ui.step_progress(label, steps, "batches") as tick:
            batches = choose(cfg, cache, ref, learner, steps, on_batch=tick)
            kept, halves = write_manifest(out / MANIFEST, cache, batches, learner is not None)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    subset = None if halves is None else datacomp_uids(halves)
    _write_uids(out, subset)
    candidates = steps * cfg.sampling.super_batch if big else counts.eligible
    summary = {
        **identity,
        "schema_version": SELECTION_SCHEMA_VERSION,
        "tool_version": __version__,
        "counts": {
            **asdict(counts),
            "steps": steps,
            "super_batches": steps if big else None,
            "candidates": candidates,
            "tail_dropped": counts.eligible - candidates,
            "kept": kept.count,
            "dropped": counts.eligible - kept.count,
        },
        "means": {
            "kept": kept.means(learner is not None),
            "dropped": everything.means(learner is not None, minus=kept),
        },
        "outputs": _outputs(subset is not None, ref.has_images),
        "files": file_digests(out, [MANIFEST, UIDS]),  # what `jestcurate verify` checks
    }
    if where:  # an array task's: the merge needs exact sums, not rounded means
        summary["sums"] = {"kept": kept.state(), "eligible": everything.state()}
    write_json_atomic(out / SUMMARY, summary)  # last: its presence means the selection is whole
    return summary
