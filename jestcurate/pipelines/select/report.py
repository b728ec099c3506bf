"""What a select run reports, and how the command line shows it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from jestcurate import ui

log = logging.getLogger(__name__)

# select's other filters' counts (pipelines/select/filters), as the summary shows them
FILTERED = {
    "caption_length": "caption length (--min/max-caption-*)",
    "target": "off target (--target)",
    "language": "other language (--language)",
}


@dataclass(frozen=True)
class Exported:
    """What select --export wrote: `pattern` names every shard once all are written; before
    that, this run wrote `written` of the `shards` (its share) and `missing` are left."""

    shards: int
    pattern: str | None
    written: int
    missing: int

    @classmethod
    def of(cls, done: dict[str, Any]) -> Exported:
        """From the dict pipelines/export.py returns (export.json, or this share's counts)."""
        return cls(done["shards"], done.get("pattern"), done.get("written", 0),
                   done.get("missing", 0))  # fmt: skip


@dataclass
class SelectReport:
    out: Path
    summary: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0
    task: int | None = None  # set when this was an array task whose merge is still to come
    waiting: str | None = None  # "scatter": this task bucketed its rows; others have still to
    export_waits: bool = False  # --export, left to the task that merges
    exported: Exported | None = None


def print_selected(report: SelectReport) -> None:
    """What `select` prints once the selection is made (before any export, so that an export
    that fails leaves it on screen): the summary, or that round 2 is still to come."""
    if report.waiting:
        ui.say(
            f"task {report.task}: its rows are scattered to the tasks' buckets; rerun every "
            "task once all have done this (the second round selects)"
        )
        return
    print_summary(report)
    if (warning := learner_caught_up(report.summary)) is not None:
        log.warning(warning)


def learner_caught_up(summary: dict[str, Any]) -> str | None:
    """A warning when a selection by learnability kept rows that the reference finds harder,
    on average, than the rows it left: a sign (a heuristic, not a proof) that learnability no
    longer tells learnable pairs from noise, as when the learner has caught up with the
    reference (measured under the sigmoid loss: docs/select.md, "Under the sigmoid loss").
    None when the selection looks as it should."""
    by_learnability = summary.get("score") == "learnability" or (
        summary.get("method") == "learnability"
    )
    kept = summary.get("means", {}).get("kept", {}).get("ref_loss")
    left = summary.get("means", {}).get("dropped", {}).get("ref_loss")
    if not by_learnability or kept is None or left is None or not kept > left:  # NaN: no
        return None
    instead = "--score easy-ref" if summary.get("method") == "jest" else "--method easy-ref"
    return (
        f"the kept rows are harder for the reference than the rows left (mean ref_loss "
        f"{kept:.3f} kept, {left:.3f} left): learnability may no longer be telling learnable "
        "pairs from noise, as when the learner has caught up with the reference or passed "
        f"it; score the pool with an earlier learner checkpoint, or select with {instead} "
        "(docs/select.md, 'Under the sigmoid loss')"
    )


def print_exported(report: SelectReport) -> None:
    """What the export did, after print_selected."""
    done = report.exported
    if report.export_waits:
        ui.note(f"task {report.task}: the export waits for the merge (the last task to finish)")
    elif done is not None and done.pattern:
        kept = report.summary["counts"]["kept"]
        ui.say(f"exported {kept:,} samples to {done.shards} shards: {done.pattern}")
    elif done is not None:
        ui.say(
            f"exported {done.written} of {done.shards} shards (this task's share); "
            f"{done.missing} are left to the other tasks"
        )


def print_summary(report: SelectReport, console: Console = ui.stdout) -> None:
    summary = report.summary
    counts = summary["counts"]
    table = ui.facts(f"jestcurate select: {summary['method']}")
    if summary.get("score"):
        table.add_row("batch score", summary["score"])
    table.add_row("rows in score set", f"{counts['rows']:,}")
    table.add_row("  errors (never selected)", f"{counts['errors']:,}")
    if counts["below_min_clip_score"]:
        table.add_row("  below --min-clip-score", f"{counts['below_min_clip_score']:,}")
    if counts.get("duplicates"):
        table.add_row("  duplicates (--dedup)", f"{counts['duplicates']:,}")
    if counts.get("excluded"):  # selections before --exclude have no such count
        table.add_row("  excluded (--exclude)", f"{counts['excluded']:,}")
    for name, label in FILTERED.items():  # present only when the filter was given
        if name in counts:
            table.add_row(f"  {label}", f"{counts[name]:,}")
    table.add_row("eligible", f"{counts['eligible']:,}")
    if counts["tail_dropped"]:
        table.add_row("  tail (no full super-batch)", f"{counts['tail_dropped']:,}")
    batch = summary["parameters"]["batch_size"]
    table.add_row("batches", f"{counts['steps']:,} x {batch:,}")
    table.add_row("kept", f"{counts['kept']:,}")
    for name, value in summary["means"]["kept"].items():
        dropped = summary["means"]["dropped"].get(name)
        if value is not None and dropped is not None:
            table.add_row(f"  mean {name}", f"{value:.4f} kept, {dropped:.4f} dropped")
    partition = summary.get("partition")
    if report.task is not None:
        count = partition["num_tasks"]
        table.add_row("array task", f"{report.task} of {count} (its partition only)")
        table.add_row("", "the last task to finish merges them")
    elif partition:
        table.add_row("array tasks", f"{partition['num_tasks']:,}, merged")
    if report.reused:
        table.add_row("", "already selected (reused)")
    else:
        table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"selection: {report.out}", highlight=False, soft_wrap=True)
