"""What both `report` and `info` read of a score set: the small columns of every row, counts
per shard and status, errors by reason, and which rows a selection kept."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.derived import read_output
from jestcurate.io.files import read_json
from jestcurate.io.integrity import read_markers
from jestcurate.io.reader import error_reason
from jestcurate.io.store import ScoreSet


@dataclass
class Stats:
    """Small columns of every row, and counts; what both info and report need."""

    scores: ScoreSet
    shards: list[str]  # part id -> shard path or URL
    part: np.ndarray  # per row: part id
    row: np.ndarray  # per row: row in its part (== index in the shard)
    ok: np.ndarray
    clip: np.ndarray
    loss: np.ndarray
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)


def gather(scores: ScoreSet) -> Stats:
    parts, rows, oks, clips, losses = [], [], [], [], []
    shards: list[str] = []
    per_shard = []
    reasons: Counter[str] = Counter()
    markers = read_markers(scores.path)
    for part_id, name in enumerate(scores.part_names()):
        table = scores.read_part(name, ["shard", "status", "error", "clip_score", "ref_loss"])
        n = table.num_rows
        shards.append(table.column("shard")[0].as_py() if n else name)
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False)) == "ok"
        errors = table.filter(pc.invert(pc.equal(table.column("status"), "ok")))
        reasons.update(error_reason(e) for e in errors.column("error").to_pylist())
        parts.append(np.full(n, part_id, dtype=np.int32))
        rows.append(np.arange(n, dtype=np.int32))
        oks.append(ok)
        clips.append(table.column("clip_score").fill_null(np.nan).to_numpy().astype(np.float32))
        losses.append(table.column("ref_loss").fill_null(np.nan).to_numpy().astype(np.float32))
        marker = markers.get(name, {})
        per_shard.append(
            {
                "name": name,
                "samples": n,
                "ok": int(ok.sum()),
                "errors": int(n - ok.sum()),
                "status": marker.get("status", "no marker"),
            }
        )
    return Stats(
        scores,
        shards,
        np.concatenate(parts) if parts else np.empty(0, np.int32),
        np.concatenate(rows) if rows else np.empty(0, np.int32),
        np.concatenate(oks) if oks else np.empty(0, bool),
        np.concatenate(clips) if clips else np.empty(0, np.float32),
        np.concatenate(losses) if losses else np.empty(0, np.float32),
        per_shard,
        reasons,
        markers,
    )


def kept_mask(stats: Stats, selection: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Which rows of the score set a selection kept (joined on shard and index)."""
    summary_path = selection / "summary.json"
    if not summary_path.is_file():
        raise JCError(f"{selection} is not a finished selection (no summary.json)")
    summary = read_json(summary_path)
    manifest = read_output(selection / "manifest.parquet", ["shard", "index"])
    part_of = {shard: i for i, shard in enumerate(stats.shards)}
    starts = np.zeros(len(stats.shards) + 1, dtype=np.int64)
    np.cumsum([s["samples"] for s in stats.per_shard], out=starts[1:])
    kept = np.zeros(len(stats.ok), dtype=bool)
    missing = 0
    for shard, index in zip(
        manifest.column("shard").to_pylist(), manifest.column("index").to_pylist(), strict=True
    ):
        part = part_of.get(shard)
        if part is None or index >= stats.per_shard[part]["samples"]:
            missing += 1
            continue
        kept[starts[part] + index] = True
    if missing:
        raise JCError(
            f"{missing} rows of {selection}/manifest.parquet are not in {stats.scores.path}: "
            "the selection was made from another score set"
        )
    return kept, summary


def quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    qs = np.quantile(values, [0.0, 0.05, 0.5, 0.95, 1.0])
    return dict(zip(("min", "p5", "median", "p95", "max"), map(float, qs), strict=True))
