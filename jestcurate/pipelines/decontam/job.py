"""The decontamination job: reuse a finished output made from the same inputs, else load the
evaluation sets, search the pool, write decontam.parquet and (last) summary.json with counts,
examples and the collapsed-space check."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.derived import file_digests, finished_output
from jestcurate.io.files import atomic_write, write_json_atomic
from jestcurate.io.schema import META_NAME
from jestcurate.io.store import ScoreSet, fingerprint, open_score_set
from jestcurate.pipelines.decontam import evalsets
from jestcurate.pipelines.decontam.config import OUTPUT, SUMMARY, DecontamConfig
from jestcurate.pipelines.decontam.output import SCHEMA
from jestcurate.pipelines.decontam.search import (
    Indexes,
    Search,
    Tally,
    gpu_resources,
    nearest_other,
)
from jestcurate.pipelines.dedup.passes import use_gpu

log = logging.getLogger(__name__)

# A collapsed embedding space (a tiny or untrained model's) puts distinct images close: warn
# when more than OWN_SHARE of an evaluation set's own images have another of them at or above
# the threshold, or when its hits are more than POOL_SHARE of the pool.
OWN_SHARE = 0.1
POOL_SHARE = 0.5
SUGGEST_QUANTILE = 0.99  # suggest the threshold only 1 % of an evaluation set's own images reach


def _validate(cfg: DecontamConfig) -> None:
    if not 0 < cfg.threshold <= 1:
        raise JCError(f"--threshold is a cosine similarity in (0, 1], got {cfg.threshold}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise JCError("--batch-size must be at least 1")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    if (cfg.out / META_NAME).exists():
        raise JCError(f"--out {cfg.out} is a score set; use another folder")


def _identity(cfg: DecontamConfig, pool: ScoreSet, found: list[evalsets.Located]) -> dict[str, Any]:
    return {
        "scores": fingerprint(pool),
        "against": [
            {"name": f.name, "location": f.location, "kind": f.kind, **f.identity} for f in found
        ],
        "params": {"threshold": cfg.threshold},
    }


def run(cfg: DecontamConfig) -> dict[str, Any]:
    """Search the pool for near copies of the evaluation sets and write the exclusion; returns
    the summary (with "seconds" and "reused")."""
    _validate(cfg)
    began = time.time()
    pool = open_score_set(cfg.scores)
    gpu = use_gpu(cfg.device)
    found = evalsets.locate(cfg.against, pool)
    identity = _identity(cfg, pool, found)
    done = finished_output(cfg.out, SUMMARY, OUTPUT, identity, "decontamination")
    if done is not None:
        for line in done.get("warnings") or []:
            log.warning("%s", line)
        return {**done, "seconds": time.time() - began, "reused": True}
    sets = evalsets.load(found, pool, cfg.device, cfg.batch_size)
    loaded = time.time()
    resources = gpu_resources(gpu)
    indexes = [Indexes(s, resources) for s in sets]
    nearest = [nearest_other(s, ix) for s, ix in zip(sets, indexes, strict=True)]
    suggested = [_suggest(n, cfg.threshold) for n in nearest]
    counted = [[] if t is None else [t] for t in suggested]
    search = Search(sets, indexes, cfg.threshold, counted, int(identity["scores"]["rows"]))
    cfg.out.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with (
            pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer,
            ui.step_progress("searching the pool", len(pool.parts), "parts") as tick,
        ):
            for name in pool.part_names():
                table = search.part(pool, name)
                if table is not None:
                    writer.write_table(table)
                tick()

    atomic_write(cfg.out / OUTPUT, write)
    searched = time.time()
    reports = [
        _set_summary(s, n, t, tally, cfg.threshold, search.totals.searched)
        for s, n, t, tally in zip(sets, nearest, suggested, search.tallies, strict=True)
    ]
    warnings = [r["warning"] for r in reports if r["warning"]]
    for line in warnings:
        log.warning("%s", line)
    totals = search.totals
    summary = {
        **identity,
        "rows": totals.rows,
        "ok_rows": totals.ok_rows,
        "searched": totals.searched,
        "excluded": totals.excluded,
        "sets": reports,
        "warnings": warnings,
        "multiply_adds_per_row": sum(s.images.size + s.pairs.size for s in sets),
        "device": "cuda" if gpu else "cpu",
        "tool_version": __version__,
        "seconds": round(time.time() - began, 3),
        "seconds_by_phase": {
            "load_eval_sets": round(loaded - began, 3),
            "search": round(searched - loaded, 3),
        },
        "files": file_digests(cfg.out, [OUTPUT]),  # what `jestcurate verify` checks
    }
    write_json_atomic(cfg.out / SUMMARY, summary)
    return {**summary, "reused": False}


def _quantiles(values: np.ndarray) -> dict[str, Any] | None:
    if not len(values):
        return None
    qs = np.quantile(values.astype(np.float64), [0.01, 0.1, 0.5, 0.9, 0.99])
    named = zip(("p1", "p10", "median", "p90", "p99"), qs, strict=True)
    return {"images": len(values), **{k: round(float(v), 6) for k, v in named}}


def _suggest(nearest: np.ndarray, threshold: float) -> float | None:
    """The threshold that only 1 % of the evaluation set's own images reach with another of
    them (its cosine distance rounded down to two digits), if above `threshold`."""
    if not len(nearest):
        return None
    gap = 1 - float(np.quantile(nearest.astype(np.float64), SUGGEST_QUANTILE))
    if gap <= 0:
        return None
    step = 10.0 ** (math.floor(math.log10(gap)) - 1)
    at = round(1 - math.floor(gap / step) * step, 12)
    return at if at > threshold else None


def _set_summary(
    evalset: evalsets.EvalSet,
    nearest: np.ndarray,
    suggested: float | None,
    tally: Tally,
    threshold: float,
    searched: int,
) -> dict[str, Any]:
    """What one evaluation set found: counts, examples, how close its own images sit to each
    other, the pool's closest cosines, and the warning when the space looks collapsed."""
    own = _quantiles(nearest)
    own_share = float((nearest >= threshold).mean()) if len(nearest) else 0.0
    pool_share = tally.hits / max(searched, 1)
    warning = None
    if own_share > OWN_SHARE or pool_share > POOL_SHARE:
        warning = (
            f"{evalset.name}: {tally.hits:,} of {searched:,} pool rows ({pool_share:.1%}) are "
            f"near copies at --threshold {threshold:g}, and {own_share:.0%} of its own images "
            "have another of them as close: the embedding space looks collapsed (a tiny or "
            "untrained model's does this)"
        )
        if suggested is not None:
            warning += (
                f". Try --threshold {suggested:g}, which only 1% of its own images reach with "
                f"another and {tally.rows_at(suggested):,} pool rows reach here, or score with a "
                "trained model"
            )
    located = evalset.located
    return {
        "name": evalset.name,
        "location": located.location,
        "kind": located.kind,
        "images": len(evalset.keys),
        "captions": len(evalset.pairs),
        "skipped": evalset.skipped,
        "hits": tally.hits,
        "image_hits": tally.image_hits,
        "pair_hits": tally.pair_hits,
        "examples": {"closest": tally.closest, "borderline": tally.borderline},
        "own_nearest_cosine": own,
        "pool_closest_cosine": tally.quantiles(),
        "pool_rows_at": {f"{t:g}": int(n) for t, n in zip(tally.thresholds, tally.at, strict=True)},
        "suggested_threshold": (
            {"threshold": suggested, "rows": tally.rows_at(suggested)}
            if warning and suggested
            else None
        ),
        "warning": warning,
    }


def print_summary(done: dict[str, Any], out: Path) -> None:
    """What `jestcurate decontaminate` prints: per evaluation set its hits and a few examples,
    then one line with the total, the time (or reuse) and the output."""
    for s in done["sets"]:
        kinds = f"{s['image_hits']:,} by image, {s['pair_hits']:,} by pair"
        ui.say(
            f"{s['name']} ({s['images']:,} images, {s['kind']}): {s['hits']:,} pool rows ({kinds})"
        )
        for e in s["examples"]["closest"][:3]:
            ui.say(
                f"  {e['pool_shard']} {e['pool_key']} ~ {e['eval_key']}: {e['match']} "
                f"cosine {e['cosine']:.4f}"
            )
    how = "already done, reused" if done["reused"] else f"{done['seconds']:.1f} s"
    threshold = done["params"]["threshold"]
    ui.say(
        f"{done['excluded']:,} of {done['searched']:,} pool rows excluded at --threshold "
        f"{threshold:g} ({how}): {out / OUTPUT}"
    )
