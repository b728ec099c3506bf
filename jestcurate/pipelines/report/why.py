"""`jestcurate info SELECTION --why KEY`: what became of one sample, read from the selection's
ledger (pipelines/select/ledger.py), in a line per row with that key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from rich.markup import escape

from jestcurate import ui
from jestcurate.errors import JCError, first_line
from jestcurate.io.eligible import MIN_CLIP_SCORE
from jestcurate.io.files import read_json
from jestcurate.pipelines.select.config import LEDGER_DIR, SUMMARY
from jestcurate.pipelines.select.ledger import ledger_parts
from jestcurate.pipelines.select.ledger_round import is_pending, still_written


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.6g}"


def _kept(row: dict[str, Any]) -> str:
    where = f"kept: step {row['step']}, position {row['position']}"
    if row["super_batch"] is not None:
        where += f" (drawn in super-batch {row['super_batch']})"
    return where


def _not_chosen(row: dict[str, Any]) -> str:
    reason = row["reason"]
    if reason == "super_batch":
        return f"not chosen: lost in super-batch {row['super_batch']}"
    if reason == "below_cut":
        return (f"not chosen: ranked below the cut (clip_score {_num(row['value'])}, the last "
                f"kept row's {_num(row['threshold'])})")  # fmt: skip
    if reason == "not_drawn":
        return "not chosen: random's seeded sample did not draw it"
    if reason == "cluster_cap":
        return "not chosen: its dedup cluster had its share (--balance-clusters)"
    if reason == "cluster_quota":
        return "not chosen: its dedup cluster's density quota was full (--cluster-quotas)"
    return f"not chosen ({reason})"


def _tail(row: dict[str, Any]) -> str:
    if row["reason"] == "max_steps":
        return f"tail: never drawn (its super-batch {row['super_batch']} is beyond --max-steps)"
    return f"tail: never drawn (after the last full super-batch; in {row['super_batch']})"


def sentence(row: dict[str, Any]) -> str:
    """One ledger row's fate and reason, in words."""
    fate, reason = row["fate"], row["reason"]
    if fate == "kept":
        return _kept(row)
    if fate == "not_chosen":
        return _not_chosen(row)
    if fate == "tail":
        return _tail(row)
    if fate == "error":
        return f"error: {reason}"
    if fate == "duplicate":
        of = f" of {row['other_key']} in {row['other_shard']}" if row["other_key"] else ""
        bound = f" (threshold {_num(row['threshold'])})" if row["threshold"] is not None else ""
        return f"duplicate ({reason}){of}: cosine {_num(row['value'])}{bound}"
    if fate == "excluded":
        return (f"excluded ({reason} match): cosine {_num(row['value'])} (threshold "
                f"{_num(row['threshold'])}) to {row['other_set']} {row['other_key']} in "
                f"{row['other_shard']}")  # fmt: skip
    return _filtered(row)


BOUNDS = {  # a caption-length detail: what was counted, how it broke the bound, which option
    "min_words": ("words", "fewer than", "--min-caption-words"),
    "max_words": ("words", "more than", "--max-caption-words"),
    "min_chars": ("characters", "fewer than", "--min-caption-chars"),
    "max_chars": ("characters", "more than", "--max-caption-chars"),
}


def _filtered(row: dict[str, Any]) -> str:
    """A row a filter removed, by the filter (its reason) and what it compared."""
    reason, detail, value, threshold = (row[c] for c in ("reason", "detail", "value", "threshold"))
    if reason == MIN_CLIP_SCORE:
        return f"filtered by --min-clip-score: clip_score {_num(value)} is below {_num(threshold)}"
    if reason == "caption_length" and detail in BOUNDS:
        what, broke, option = BOUNDS[detail]
        return (
            f"filtered by caption length: {_num(value)} {what}, {broke} {option} {_num(threshold)}"
        )
    if reason == "language":
        found = f"detected as {detail}" if detail else "no language detected"
        return f"filtered by --language: caption {found}"
    if reason == "target" and detail == "clusters":
        return (f"filtered by --target (clusters): its nearest cluster {_num(value)} is none that "
                "a target image picked")  # fmt: skip
    if reason == "target":
        return (f"filtered by --target ({detail}): score {_num(value)} is below "
                f"{_num(threshold)}")  # fmt: skip
    shown = f" ({detail})" if detail else ""
    return f"filtered by {reason}{shown}: value {_num(value)}, threshold {_num(threshold)}"


def find(selection: Path, key: str) -> list[dict[str, Any]]:
    """The ledger rows with this key (one per shard that has it)."""
    summary_path = selection / SUMMARY
    if not summary_path.is_file() or "method" not in read_json(summary_path):
        raise JCError(f"{selection} is not a finished selection (no summary.json)")
    folder = selection / LEDGER_DIR
    summary = read_json(summary_path)
    if "ledger" not in summary or not (folder.is_dir() or is_pending(summary)):
        again = (
            f"remove {selection} and rerun every array task with --ledger"
            if summary.get("partition")
            else "rerun its select with --ledger --overwrite"
        )
        raise JCError(
            f"{selection} has no ledger (made without --ledger); {again} to write one "
            "(the same batches)"
        )
    unfinished = still_written(selection, summary)
    if unfinished is not None:
        raise JCError(unfinished)
    files = ledger_parts(folder)
    try:
        found = ds.dataset(files, format="parquet")
        table = found.to_table(filter=ds.field("key") == key)
    except (OSError, pa.ArrowException) as exc:
        raise JCError(f"{folder} is unreadable ({first_line(exc)})") from None
    rows = table.to_pylist()
    if not rows:
        raise JCError(f"no sample with key {key!r} in {selection}'s ledger")
    return rows


def print_why(selection: Path, key: str) -> None:
    for row in find(selection, key):
        ui.say(escape(f"{row['key']} in {row['shard']}: {sentence(row)}"))
