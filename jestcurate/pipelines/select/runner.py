"""`select`'s run: reuse a finished selection, or choose and write a new one (in one run, as
an array task, or by merging the tasks), then export it if asked."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.eligible import Counts, score_columns
from jestcurate.io.store import META_NAME, finished_output, read_json
from jestcurate.math.sampling import super_batch_size
from jestcurate.pipelines.select import ledger_round
from jestcurate.pipelines.select import quotas as quotas_mod
from jestcurate.pipelines.select.choosing import choose, clusters
from jestcurate.pipelines.select.config import (
    LEDGER_DIR,
    MANIFEST,
    SUMMARY,
    SUPER_BATCH_METHODS,
    SelectConfig,
    validate,
)
from jestcurate.pipelines.select.inputs import (
    Inputs,
    Rows,
    derived,
    eligible_rows,
    nothing_passes,
    open_inputs,
    removed_by,
)
from jestcurate.pipelines.select.ledger import (
    Choice,
    LedgerSource,
    Recorder,
    merged,
    one_run,
    save_choice,
    settle,
    write_ledger,
)
from jestcurate.pipelines.select.outputs import (
    Means,
    datacomp_uids,
    remove_selection,
    write_manifest,
    write_summary,
)
from jestcurate.pipelines.select.report import Exported, SelectReport
from jestcurate.pipelines.select.tasks import (
    Task,
    drop_buckets,
    gathered_rows,
    merge,
    merged_choices,
    refuse_other_task_counts,
    refuse_when_nothing_passes,
    scatter_notes,
    scatter_round,
    task_directory,
    this_task,
    unfinished_tasks,
)

log = logging.getLogger(__name__)


def run(
    cfg: SelectConfig, on_selected: Callable[[SelectReport], None] | None = None
) -> SelectReport:
    """Select and write the outputs; rerunning with the same inputs reuses a finished selection.
    With cfg.export, then export the kept samples (pipelines/export.py).

    As array task I of N (--task-index/--num-tasks, or Slurm's variables) it selects from its
    own partition into OUT/tasks/ and, when it is the last task to finish, merges all of them;
    with --merge it only merges."""
    began = time.time()
    validate(cfg)
    task = this_task(cfg)
    inputs = open_inputs(cfg, task.count)
    done = _existing(cfg, inputs.identity, task)
    if done is not None and cfg.ledger and "ledger" not in done:
        raise JCError(_no_ledger_there(cfg.out, task))
    if done is not None and cfg.ledger and ledger_round.is_pending(done) and not cfg.export:
        done = _ledger_round(cfg, inputs, task)  # this task's share (an export's: never)
    if done is not None:
        log.info("%s already holds this selection; nothing to do", cfg.out)
        report = SelectReport(cfg.out, done, reused=True)
    elif task.merge:
        report = SelectReport(cfg.out, _merge(cfg, inputs, task.count))
    elif not task.partitioned:
        rows = eligible_rows(cfg, inputs)
        summary = _select_into(cfg, cfg.out, inputs, inputs.identity, rows, task)
        report = SelectReport(cfg.out, summary)
    else:
        report = _array_task(cfg, inputs, task)
    report.seconds = time.time() - began
    if on_selected is not None:  # before the export: its failure leaves the selection shown
        on_selected(report)
    return _export(cfg, report, task)


def _no_ledger_there(out: Path, task: Task) -> str:
    """The advice for --ledger where OUT holds this selection without one: --overwrite for one
    run; array tasks (where --overwrite is refused) make it again from scratch."""
    if task.count > 1 or task.merge:
        again = (
            f"remove {out} and rerun every task with --ledger (the same batches; the tasks "
            "kept no notes of their rows to write one from)"
        )
    else:
        again = "pass --overwrite to make it again with one (the same batches)"
    return f"{out} holds this selection without a ledger; {again}, or leave out --ledger"


def _array_task(cfg: SelectConfig, inputs: Inputs, task: Task) -> SelectReport:
    """Task I of N: scatter (round 1), then select from its partition (round 2); the last task
    to finish merges."""
    identity = inputs.identity
    task_dir = task_directory(cfg.out, task.index, task.count)
    task_identity = {**identity, "task": task.index}
    mine = finished_output(task_dir, SUMMARY, MANIFEST, task_identity, "task selection")
    if mine is None:
        dones = scatter_round(cfg, inputs, task)
        if dones is None:  # round 2 waits for every task's round 1
            return SelectReport(task_dir, {}, task=task.index, waiting="scatter")
        refuse_when_nothing_passes(cfg, task, dones)
        rows = gathered_rows(cfg, inputs, task, dones)
        mine = _select_into(cfg, task_dir, inputs, task_identity, rows, task)
        drop_buckets(cfg, task)
    else:
        log.info("task %d of %d already finished in %s", task.index, task.count, task_dir)
    waiting = unfinished_tasks(cfg.out, identity, task.count)
    if waiting:  # another task merges when it finishes last
        log.info("task %d of %d done; %d tasks still to finish", task.index, task.count,
                 len(waiting))  # fmt: skip
        return SelectReport(task_dir, mine, task=task.index)
    return SelectReport(cfg.out, _merge(cfg, inputs, task.count))


def _export(cfg: SelectConfig, report: SelectReport, task: Task) -> SelectReport:
    """With --export, export a whole selection (this task's share of its shards, as an array
    task); an array task whose merge is still to come leaves it to the last task."""
    if not cfg.export or report.waiting:
        return report
    if report.task is not None:
        return dataclasses.replace(report, export_waits=True)
    from jestcurate.pipelines import export as export_mod

    share = None if task.merge else (task.index, task.count)
    done = export_mod.export(cfg.out, cfg.samples_per_shard, share=share)
    return dataclasses.replace(report, exported=Exported.of(done))


def _existing(cfg: SelectConfig, identity: dict[str, Any], task: Task) -> dict[str, Any] | None:
    """The summary of the finished selection OUT holds with this identity (to reuse), or None
    (to select); a refusal for anything else OUT holds, unless --overwrite replaces it."""
    _refuse_other_outputs(cfg.out)
    if cfg.overwrite:
        if task.count > 1 or task.merge:
            raise JCError(
                "--overwrite replaces a selection made in one run; array tasks would remove "
                f"each other's work: remove {cfg.out} first instead"
            )
        return None  # removed once the new selection is known to be possible (in _select_into)
    refuse_other_task_counts(cfg.out, task.count)
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
    """A score set, a dedup or a decontamination output in OUT is not a selection, to reuse or
    to replace."""
    from jestcurate.pipelines.decontam import OUTPUT as DECONTAM_OUTPUT
    from jestcurate.pipelines.dedup import OUTPUT as DEDUP_OUTPUT

    for name, what in (
        (META_NAME, "a score set"),
        (DEDUP_OUTPUT, "a dedup output"),
        (DECONTAM_OUTPUT, "a decontamination output"),
    ):
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
    said = removed_by(counts, cfg.dedup)
    if counts.eligible == 0 and counts.filtered and any(counts.filtered.values()):
        return nothing_passes(counts, cfg.dedup)
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
    elif counts.excluded > (offered - counts.duplicates) / 2:
        line += (
            f"the exclusions took most rows ({counts.excluded:,}): rerun `jestcurate "
            "decontaminate` with a higher --threshold (its warning suggests one when the "
            "embedding space looks collapsed), or "
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
    inputs: Inputs,
    identity: dict[str, Any],
    rows: Rows,
    task: Task,
) -> dict[str, Any]:
    """Choose from the eligible `rows` (copied into a cache first), and write manifest, uids and
    (last) summary into `out`. For an array task's partition, having too few rows to choose
    from is not an error, and the summary keeps the exact sums the merge needs."""
    counts, learner = rows.counts, inputs.learner
    big = cfg.sampling.super_batch if cfg.method in SUPER_BATCH_METHODS else None
    steps = counts.eligible // cfg.sampling.super_batch
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps == 0 and not task.partitioned:
        raise JCError(_too_few_rows(cfg, counts))
    if steps == 0:  # a task's partition too small: its rows are tail, the other tasks go on
        log.warning("%d eligible rows%s: less than one super-batch", counts.eligible, task.where)
    if cfg.overwrite:  # the new selection is possible: now the old one goes
        remove_selection(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / ".cache"
    choice = quotas = None
    try:
        cache = rows.build(cache_dir)
        everything = Means()
        for start in range(0, cache.size, 1 << 20):
            stop = min(start + (1 << 20), cache.size)
            columns = score_columns(learner is not None)
            everything.add({c: cache.read_range(c, start, stop) for c in columns})
        quotas = rows.quotas if rows.quotas is not None else _quotas(cfg, cache, steps)
        # with --ledger: where each kept row went (an array task saves it for the merge)
        recorder = Recorder(cache.size, cfg.sampling.batch_size) if cfg.ledger else None
        with ui.step_progress(f"selecting ({cfg.method})", steps, "batches") as tick:
            batches = choose(cfg, cache, inputs.ref, learner, steps, tick, quotas)
            if recorder is not None:
                batches = recorder.watch(batches)
            kept, halves = write_manifest(out / MANIFEST, cache, batches, learner is not None)
        if recorder is not None:
            choice = settle(cfg, cache, recorder, steps)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    candidates = steps * cfg.sampling.super_batch if big else counts.eligible
    totals = {
        **counts.as_dict(),
        "steps": steps,
        "super_batches": steps if big else None,
        "candidates": candidates,
        "tail_dropped": counts.eligible - candidates,
        "kept": kept.count,
        "dropped": counts.eligible - kept.count,
    }
    subset = None if halves is None else datacomp_uids(halves)
    # an array task's summary keeps exact sums for the merge, not only rounded means
    sums = {"kept": kept.state(), "eligible": everything.state()}
    extra: dict[str, Any] = {"sums": sums} if task.partitioned else {}
    if quotas is not None:
        extra["cluster_quotas"] = quotas.summary(cfg)
    if choice is not None and task.partitioned:  # the merge writes the ledger
        extra["ledger_choice"] = save_choice(out, choice)
    elif choice is not None:
        assert rows.notes is not None and rows.filters is not None  # eligible_rows, --ledger
        notes = rows.notes
        source = LedgerSource(inputs.ref, inputs.learner, lambda p: (notes, p),
                              rows.filters.pointing(), one_run(choice))  # fmt: skip
        extra.update(_write_ledger(out, source, len(choice.drawn)))
    elif not task.partitioned:  # an unfinished earlier run's ledger is not this selection's
        shutil.rmtree(out / LEDGER_DIR, ignore_errors=True)
    images = inputs.ref.has_images
    return write_summary(out, identity, totals, kept, everything, subset, images, **extra)


def _quotas(cfg: SelectConfig, cache: Any, steps: int) -> quotas_mod.ClusterQuotas | None:
    """With --cluster-quotas: each dedup cluster's quota of the steps * b kept rows."""
    found = clusters(cfg, cache) if cfg.cluster_quotas is not None and steps else None
    if found is None:
        return None
    return quotas_mod.compute(cfg, cache, found[0], steps * cfg.sampling.batch_size)


def _write_ledger(out: Path, source: LedgerSource, chosen_from: int) -> dict[str, Any]:
    """OUT/ledger/ (before summary.json, which marks the selection finished) from what the
    filters noted of each row; returns the summary's `fates` and `ledger`."""
    with ui.step_progress("writing the ledger", len(source.ref.parts), "parts") as tick:
        return write_ledger(out, source, chosen_from, tick)


def _merge(cfg: SelectConfig, inputs: Inputs, count: int) -> dict[str, Any]:
    """The tasks' selections joined into OUT; with --ledger, the ledger pending in its summary,
    then (unless --spread-ledger leaves them to the tasks) every part of it written here."""

    def ledger(choices: list[Choice], step_of: list[np.ndarray]) -> dict[str, Any]:
        shutil.rmtree(cfg.out / LEDGER_DIR, ignore_errors=True)  # an earlier selection's
        return {"ledger": ledger_round.pending(len(inputs.ref.parts))}

    summary = merge(cfg.out, inputs.identity, count, ledger if cfg.ledger else None)
    if not cfg.ledger:
        return summary
    return _ledger_round(cfg, inputs, Task(0, count, merge=True))


def _ledger_round(cfg: SelectConfig, inputs: Inputs, task: Task) -> dict[str, Any]:
    """The merged selection's ledger parts this run writes (task I of N: the parts I mod N; a
    merge: all, none with --spread-ledger); its summary, with `fates` once every part is
    written (pipelines/select/ledger_round.py)."""
    names = inputs.ref.part_names()
    if task.merge:
        parts = [] if cfg.spread_ledger else list(range(len(names)))
    else:
        parts = ledger_round.share(len(names), task.index, task.count)
    if parts:
        choices, step_of = merged_choices(cfg.out, inputs.identity, task.count)
        notes_of = scatter_notes(cfg.out, inputs.identity, task.count)  # its one-line check first
        first = ledger_round.first_ids(cfg.out, task.count, len(names))
        source = LedgerSource(
            inputs.ref, inputs.learner, notes_of,
            derived(cfg, inputs.ref).pointing(),  # no filter's pass over the pool
            merged(names, choices, step_of, first),
        )  # fmt: skip
        with ui.step_progress("writing the ledger", len(parts), "parts") as tick:
            ledger_round.write_parts(cfg.out, source, parts, tick)
    summary = ledger_round.finish(cfg.out, names)
    if summary is not None:
        return summary
    written = ledger_round.progress(cfg.out, names)
    log.info("the ledger: %d of %d parts written; the other tasks write the rest", written,
             len(names))  # fmt: skip
    return read_json(cfg.out / SUMMARY)
