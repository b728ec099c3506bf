"""select's inputs: the score sets, the identity a selection records (inputs and parameters),
and the filters (min clip score, dedup, exclusions, then pipelines/select/filters: caption
length, language, a target set) that make rows ineligible."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jestcurate import ui
from jestcurate.errors import JCError, some
from jestcurate.io.eligible import Counts, Filters, fill_cache, scan
from jestcurate.io.notes import Notes
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import ScoreSet, fingerprint, open_score_set, read_json
from jestcurate.math.partition import PARTITION_BY, PARTITION_HASH
from jestcurate.pipelines.select import filters as filters_mod
from jestcurate.pipelines.select.config import SUPER_BATCH_METHODS, SelectConfig
from jestcurate.pipelines.select.quotas import identity as quotas_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    ref: ScoreSet
    learner: ScoreSet | None
    identity: dict[str, Any]  # what the selection records: inputs, method, parameters


def open_inputs(cfg: SelectConfig, tasks: int) -> Inputs:
    """The score sets (warning once about failed shards) and the selection's identity, with
    the partition when `tasks` array tasks share the work."""
    ref = open_score_set(cfg.reference, role="reference")
    if cfg.export:  # before choosing anything: a set without images has nothing to export
        ref.require_images("select --export")
    learner = open_score_set(cfg.learner, role="learner") if cfg.learner else None
    for scores in (ref, learner):
        _warn_failed_shards(scores)
    identity = _identity(cfg, ref, learner)
    if tasks > 1:
        identity["partition"] = partition_identity(tasks)
    return Inputs(ref, learner, identity)


@dataclass(frozen=True)
class Rows:
    """The eligible rows a selection chooses from: their counts, and how to copy them into a
    cache folder."""

    counts: Counts
    build: Callable[[Path], RowCache]
    filters: Filters | None = None  # what made the others ineligible (for the ledger)
    notes: Notes | None = None  # with --ledger: what they said of each row (io/notes.py)
    quotas: Any = None  # array tasks' global ClusterQuotas (pipelines/select/tasks.py)


def eligible_rows(cfg: SelectConfig, inputs: Inputs) -> Rows:
    """One run's rows: every eligible row of the score sets."""
    ref, learner = inputs.ref, inputs.learner
    found_by = filters(cfg, ref)
    notes = Notes() if cfg.ledger else None
    with ui.step_progress("checking score sets", len(ref.parts), "parts") as tick:
        found = scan(ref, learner, found_by, on_part=tick, notes=notes)

    def build(cache_dir: Path) -> RowCache:
        embeddings = cfg.cached_embeddings
        with ui.step_progress("copying eligible rows", len(ref.parts), "parts") as tick:
            return fill_cache(ref, learner, found, cache_dir, found_by, embeddings, tick)

    return Rows(found.counts, build, found_by, notes)


def removed_by(counts: Counts, dedup: Path | str | None) -> str:
    """What the errors and each filter took out of the rows, in words ("" for nothing)."""
    removed = [
        (counts.errors, "are errors"),
        (counts.below_min_clip_score, "are below --min-clip-score"),
        (counts.duplicates, f"were dropped by --dedup {dedup}"),
        (counts.excluded, "were excluded by --exclude"),
        *((n, f"were removed by the {name} filter") for name, n in counts.filtered.items()),
    ]
    return ", ".join(f"{n:,} {what}" for n, what in removed if n)


def nothing_passes(counts: Counts, dedup: Path | str | None, hint: str = "") -> str:
    """The one line for filters that left no row."""
    said = removed_by(counts, dedup)
    return f"no row passes the filters (of {counts.rows:,} rows: {said}); loosen them{hint}"


def partition_identity(count: int) -> dict[str, Any]:
    return {"num_tasks": count, "by": PARTITION_BY, "hash": PARTITION_HASH}


def _dedup_fingerprint(dedup: Path | None) -> dict[str, Any] | None:
    if dedup is None:
        return None
    return _summary_fingerprint(dedup, "a finished dedup output")


def _summary_fingerprint(directory: Path, what: str) -> dict[str, Any]:
    """A derived output as a selection records it: its path and its summary's hash."""
    summary = directory / "summary.json"
    if not summary.is_file():
        raise JCError(f"{directory} is not {what} (no summary.json)")
    content = summary.read_bytes()
    return {"path": str(directory.resolve()), "summary_sha256": hashlib.sha256(content).hexdigest()}


def _exclude_fingerprints(exclude: tuple[Path, ...]) -> list[dict[str, Any]] | None:
    """The exclusions (decontaminate outputs) in path order: None without any, so selections
    made before the option compare equal."""
    if not exclude:
        return None
    found = [_summary_fingerprint(d, "a finished decontamination output") for d in exclude]
    return sorted(found, key=lambda f: f["path"])


def _identity(cfg: SelectConfig, ref: ScoreSet, learner: ScoreSet | None) -> dict[str, Any]:
    sampling = cfg.sampling
    jest = sampling.applied()
    others = filters_mod.identity(cfg.filters, ref)
    quotas = quotas_identity(cfg)
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
            "exclude": _exclude_fingerprints(cfg.exclude),
            "balance_clusters": cfg.balance_clusters,
            **({"cluster_quotas": quotas} if quotas is not None else {}),  # only when given
            **({"filters": others} if others is not None else {}),  # only when given
        },
    }


def filters(cfg: SelectConfig, ref: ScoreSet) -> Filters:
    """What makes a row ineligible: --min-clip-score, --dedup's dropped rows, the rows
    --exclude names, then the caption, language and target-set filters (whose target set
    first takes its pass over the pool: a k-means sample or the NormSim quantile)."""
    rows = filters_mod.build(cfg.filters, ref, cfg.seed, cfg.device)
    return replace(derived(cfg, ref), rows=rows)


def derived(cfg: SelectConfig, ref: ScoreSet) -> Filters:
    """--min-clip-score and the filters read from derived outputs (--dedup, --exclude), with
    the dedup clusters for --balance-clusters: what the merge's ledger needs (for the rows
    they point at), with no pass over the pool."""
    dedup = clusters = exclude = None
    if cfg.dedup is not None:
        from jestcurate.pipelines.dedup import load_clusters
        from jestcurate.pipelines.select.filters.derived import Dedup

        _check_made_from(cfg.dedup, ref, cfg.reference, "dedup")
        dedup = Dedup(cfg.dedup)
        balance = cfg.balance_clusters or cfg.cluster_quotas is not None
        clusters = load_clusters(cfg.dedup) if balance else None
    if cfg.exclude:
        from jestcurate.pipelines.select.filters.derived import Exclusions

        for directory in cfg.exclude:
            _check_made_from(directory, ref, cfg.reference, "decontaminate")
        exclude = Exclusions(cfg.exclude)
    return Filters(cfg.min_clip_score, dedup, clusters, exclude)


def _check_made_from(directory: Path, ref: ScoreSet, reference: Path, command: str) -> None:
    """A dedup or decontaminate output must have been made from the reference score set."""
    try:
        summary = read_json(directory / "summary.json")
    except (OSError, ValueError) as exc:
        raise JCError(f"{directory / 'summary.json'} is unreadable ({exc})") from None
    made_from = summary.get("scores", {}).get("parts_sha256")
    if made_from != fingerprint(ref)["parts_sha256"]:
        raise JCError(
            f"{directory} was made from another score set ({summary.get('scores', {}).get('path')}"
            f"), not {reference}; rerun jestcurate {command} on the reference"
        )


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
