"""The dedup job: reuse a finished output made from the same inputs, else run the passes, write
dedup.parquet and summary.json (counts, timings, the collapse check)."""

from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.derived import file_digests, finished_output
from jestcurate.io.files import write_json_atomic
from jestcurate.io.store import ScoreSet, fingerprint, open_score_set
from jestcurate.pipelines.dedup.collapse import NeighbourSample, collapse_warning, suggest_eps
from jestcurate.pipelines.dedup.config import BY, EXACT, SEMANTIC, DedupConfig
from jestcurate.pipelines.dedup.output import OUTPUT, SUMMARY, roots, write_output
from jestcurate.pipelines.dedup.passes import Duplicates, find_duplicates, use_gpu

log = logging.getLogger(__name__)


def _validate(cfg: DedupConfig) -> None:
    if not 0 <= cfg.eps < 2:
        raise JCError(f"--eps must be in [0, 2), got {cfg.eps}")
    if cfg.by not in BY:
        raise JCError(f"--by must be one of {', '.join(BY)}, not {cfg.by!r}")
    if cfg.clusters is not None and cfg.clusters < 1:
        raise JCError("--clusters must be at least 1")
    if not 1 <= cfg.neighbors <= 8:
        raise JCError("--neighbors must be between 1 and 8")


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, where there is /proc, because ru_maxrss
    also counts what a forking parent held before the exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Laps:
    """Seconds taken by each phase; with -v logged with the peak memory so far."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.mark = time.time()

    def __call__(self, name: str) -> None:
        self.phases[name] = round(time.time() - self.mark, 3)
        self.mark = time.time()
        log.debug("%s: %.1f s, peak RSS so far %.0f MiB", name, self.phases[name], _peak_rss_mib())


def _identity(cfg: DedupConfig, scores: ScoreSet) -> dict[str, Any]:
    return {
        "scores": fingerprint(scores),
        "params": {
            "by": cfg.by,
            "eps": cfg.eps,
            "clusters": cfg.clusters,
            "seed": cfg.seed,
            "iterations": cfg.iterations,
            "neighbors": cfg.neighbors,
        },
    }


def _summary(cfg: DedupConfig, found: Duplicates, sample: NeighbourSample) -> dict[str, Any]:
    """The counts, cluster sizes, neighbour cosines and any collapsed-space warning."""
    reason = found.reason
    sizes = np.bincount(found.cluster, minlength=found.clusters)
    semantic = int((reason == SEMANTIC).sum())
    nn = sample.cosine()
    suggested = suggest_eps(found.better, reason)
    warning = collapse_warning(cfg.eps, len(reason), semantic, nn, suggested)
    if warning:
        log.warning("%s", warning)
    return {
        "rows": int(found.part_rows.sum()),
        "ok_rows": len(reason),
        "clusters_used": int(found.clusters),
        "kept": int((reason == 0).sum()),
        "dropped_exact": int((reason == EXACT).sum()),
        "dropped_semantic": semantic,
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
        "nn_cosine": nn,
        "suggested_eps": suggested if warning else None,
        "warning": warning,
    }


def run(cfg: DedupConfig) -> dict[str, Any]:
    """Deduplicate and write the outputs; returns the summary (with "seconds" and "reused")."""
    _validate(cfg)
    began = time.time()
    scores = open_score_set(cfg.scores)
    gpu = use_gpu(cfg.device)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    identity = _identity(cfg, scores)
    done = finished_output(cfg.out, SUMMARY, OUTPUT, identity, "dedup")
    if done is not None:
        if done.get("warning"):
            log.warning("%s", done["warning"])
        return {**done, "seconds": time.time() - began, "reused": True}
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache_dir = cfg.out / ".cache"
    lap = _Laps()
    try:
        found, sample = find_duplicates(cfg, scores, cache_dir, gpu, lap)
        with ui.stage("writing dedup.parquet"):
            write_output(cfg, scores, found.part, found.index, found.cluster, roots(found.dup_of),
                   found.reason, found.similarity)  # fmt: skip
        lap("write")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    summary = {
        **identity,
        **_summary(cfg, found, sample),
        "device": "cuda" if gpu else "cpu",
        "tool_version": __version__,
        "seconds": round(time.time() - began, 3),
        "seconds_by_phase": lap.phases,
        "peak_rss_mib": round(_peak_rss_mib()),
        "files": file_digests(cfg.out, [OUTPUT]),  # what `jestcurate verify` checks
    }
    write_json_atomic(cfg.out / SUMMARY, summary)
    return {**summary, "reused": False}


def print_summary(done: dict[str, Any], out: Path) -> None:
    """The one line `jestcurate dedup` prints: counts, time (or reuse) and the output."""
    how = "already done, reused" if done["reused"] else f"{done['seconds']:.1f} s"
    ui.say(
        f"{done['ok_rows']:,} rows in {done['clusters_used']:,} clusters: kept {done['kept']:,}, "
        f"dropped {done['dropped_exact']:,} exact and {done['dropped_semantic']:,} near "
        f"duplicates ({how}): {out / OUTPUT}",
    )
