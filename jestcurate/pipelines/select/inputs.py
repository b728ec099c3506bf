"""select's inputs: the identity a selection records, and the filters (min clip score, dedup)
that make rows ineligible."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError, some
from jestcurate.io.eligible import Filters
from jestcurate.io.store import (
    ScoreSet,
    fingerprint,
    read_json,
)
from jestcurate.pipelines.select.config import SUPER_BATCH_METHODS, SelectConfig

log = logging.getLogger(__name__)


def _dedup_fingerprint(dedup: Path | None) -> dict[str, Any] | None:
    if dedup is None:
        return None
    summary = dedup / "summary.json"
    if not summary.is_file():
        raise JCError(f"{dedup} is not a finished dedup output (no summary.json)")
    content = summary.read_bytes()
    return {"path": str(dedup.resolve()), "summary_sha256": hashlib.sha256(content).hexdigest()}


def _identity(cfg: SelectConfig, ref: ScoreSet, learner: ScoreSet | None) -> dict[str, Any]:
    sampling = cfg.sampling
    jest = sampling.applied()
    return {
        "inputs": {
            "reference": fingerprint(ref),
            "learner": fingerprint(learner) if learner else None,
        },
        "method": cfg.method,
        "score": cfg.criterion,
        "parameters": {
            "ratio": sampling.ratio,
            "batch_size": sampling.batch_size,
            "super_batch_size": (
                sampling.super_batch if cfg.method in SUPER_BATCH_METHODS else None
            ),
            **(jest if cfg.method == "jest" else dict.fromkeys(jest)),  # jest's options
            "seed": cfg.seed,
            "min_clip_score": cfg.min_clip_score,
            "max_steps": cfg.max_steps,
            "dedup": _dedup_fingerprint(cfg.dedup),
            "balance_clusters": cfg.balance_clusters,
        },
    }


def _filters(cfg: SelectConfig, ref: ScoreSet) -> Filters:
    if cfg.dedup is None:
        return Filters(cfg.min_clip_score)
    from jestcurate.pipelines.dedup import SUMMARY, load_clusters, load_dropped

    try:
        summary = read_json(cfg.dedup / SUMMARY)
    except (OSError, ValueError) as exc:
        raise JCError(f"{cfg.dedup / SUMMARY} is unreadable ({exc})") from None
    made_from = summary.get("scores", {}).get("parts_sha256")
    if made_from != fingerprint(ref)["parts_sha256"]:
        raise JCError(
            f"{cfg.dedup} was made from another score set ({summary.get('scores', {}).get('path')}"
            f"), not {cfg.reference}; rerun jestcurate dedup on the reference"
        )
    clusters = load_clusters(cfg.dedup) if cfg.balance_clusters else None
    return Filters(cfg.min_clip_score, load_dropped(cfg.dedup), clusters)


def _warn_failed_shards(scores: ScoreSet | None) -> None:
    """Rows lost with a failed shard are missing from the pool: say so, once per run."""
    failed = [] if scores is None else scores.failed_shards()
    if not failed:
        return
    shown = some(failed)
    assert scores is not None
    log.warning(
        "%s: %d of %d shards failed when scored, so their rows after each failure are not in "
        "the pool: %s. `jestcurate status %s` lists them; rerunning `jestcurate score` with the "
        "same options retries them",
        scores.path, len(failed), len(scores.parts), shown, scores.path,
    )  # fmt: skip
