"""select's configuration, its checks, and the names of what it writes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from jestcurate.errors import JCError
from jestcurate.math.density import KINDS
from jestcurate.math.sampling import SamplerOptions
from jestcurate.model.openclip import resolve_device
from jestcurate.pipelines.select.filters.options import FilterOptions, check

log = logging.getLogger(__name__)

METHODS = ("random", "clip-score", "easy-ref", "learnability", "jest")
SUPER_BATCH_METHODS = ("easy-ref", "learnability", "jest")
MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
UIDS = "uids.npy"
TASKS_DIR = "tasks"
SCATTER_DIR = "scatter"
LEDGER_DIR = "ledger"  # one Parquet file per score-set part: every row's fate and why
SELECTION_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SelectConfig:
    reference: Path
    out: Path
    learner: Path | None = None
    method: str = "jest"
    # b, the ratio and jest's sampler (its criterion is --score)
    sampling: SamplerOptions = field(default_factory=lambda: SamplerOptions(4096))
    seed: int = 0
    min_clip_score: float | None = None
    max_steps: int | None = None
    device: str = "auto"
    dedup: Path | None = None  # a `jestcurate dedup` output: its dropped rows are not eligible
    exclude: tuple[Path, ...] = ()  # `jestcurate decontaminate` outputs: their rows neither
    balance_clusters: bool = False  # cap each dedup cluster's share of every batch / kept set
    # or each cluster's own quota from its density (pipelines/select/quotas.py)
    cluster_quotas: str | None = None  # "density"
    quota_temperature: float | None = None  # the softmax's temperature (default 0.5)
    quota_floor: float | None = None  # each cluster's floor, of an even share (default 0.5)
    # caption length, language and target-set filters (pipelines/select/filters)
    filters: FilterOptions = field(default_factory=FilterOptions)
    task_index: int | None = None  # array task I of N; None: from Slurm's variables, else 0 of 1
    num_tasks: int | None = None
    merge: bool = False  # only join finished task outputs into OUT
    overwrite: bool = False  # replace whatever selection OUT holds
    export: bool = False  # then write the kept samples to OUT/shards (pipelines/export.py)
    samples_per_shard: int | None = None  # with export; None: export's default
    ledger: bool = False  # write OUT/ledger/: every row's fate and why (pipelines/select/ledger.py)
    # array tasks: the merge leaves the ledger's parts to the tasks, run again after it
    spread_ledger: bool = False  # (pipelines/select/ledger_round.py)

    @property
    def cached_embeddings(self) -> bool:
        """Whether the row cache holds the embeddings: jest's and the independent methods'
        candidates, and the density quotas' centroids."""
        return self.method in SUPER_BATCH_METHODS or self.cluster_quotas is not None

    @property
    def criterion(self) -> str | None:
        """jest's batch score (None for the other methods)."""
        if self.method != "jest":
            return None
        return self.sampling.criterion_for(self.learner is not None)


def reads_learner(method: str, criterion: str | None) -> bool:
    """Whether a method (jest with its criterion) reads the learner's scores."""
    return method == "learnability" or criterion in ("learnability", "hard-learner")


def validate(cfg: SelectConfig) -> None:
    """select's own checks (the sampler options checked themselves when made)."""
    if cfg.method not in METHODS:
        raise JCError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if cfg.spread_ledger and not cfg.ledger:
        raise JCError("--spread-ledger leaves the ledger's parts to the array tasks: pass --ledger")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise JCError("--max-steps must be at least 1")
    if cfg.sampling.criterion is not None and cfg.method != "jest":
        raise JCError("--score chooses jest's criterion; other methods have their own")
    if reads_learner(cfg.method, cfg.criterion) and cfg.learner is None:
        what = f"--score {cfg.criterion}" if cfg.method == "jest" else f"--method {cfg.method}"
        raise JCError(f"{what} needs --learner (a score set made with `score --role learner`)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    if cfg.method in SUPER_BATCH_METHODS:
        resolve_device(cfg.device)  # an unusable --device fails now, not after the cache pass
    if cfg.balance_clusters and cfg.dedup is None:
        raise JCError("--balance-clusters needs --dedup (the clusters come from jestcurate dedup)")
    _check_quotas(cfg)
    if cfg.min_clip_score is not None and not -1 <= cfg.min_clip_score <= 1:
        raise JCError(
            f"--min-clip-score is a cosine similarity, in [-1, 1]; got {cfg.min_clip_score}"
        )
    check(cfg.filters)
    b = cfg.sampling.batch_size
    if cfg.method in SUPER_BATCH_METHODS and cfg.sampling.super_batch == b:
        # B = round(b / ratio) exceeds b from b / ratio >= b + 0.5 on: shown rounded down
        most = math.floor(b / (b + 0.5) * 1e4) / 1e4
        log.warning(
            "--ratio %s makes each super-batch exactly one batch of %d: %s keeps every "
            "candidate and chooses nothing (--ratio %s or less chooses)",
            cfg.sampling.ratio, b, cfg.method, most,
        )  # fmt: skip


def _check_quotas(cfg: SelectConfig) -> None:
    """--cluster-quotas and its options (pipelines/select/quotas.py computes them)."""
    if cfg.cluster_quotas is None:
        for given, name in ((cfg.quota_temperature, "temperature"), (cfg.quota_floor, "floor")):
            if given is not None:
                raise JCError(f"--quota-{name} needs --cluster-quotas density")
        return
    if cfg.cluster_quotas not in KINDS:
        raise JCError(f"unknown --cluster-quotas {cfg.cluster_quotas!r}; use {', '.join(KINDS)}")
    if cfg.dedup is None:
        raise JCError("--cluster-quotas needs --dedup (the clusters come from jestcurate dedup)")
    if cfg.balance_clusters:
        raise JCError("--cluster-quotas replaces --balance-clusters' equal caps: pass one of them")
    t = cfg.quota_temperature
    if t is not None and not (math.isfinite(t) and t > 0):
        raise JCError(f"--quota-temperature must be a positive number; got {t}")
    f = cfg.quota_floor
    if f is not None and not 0 <= f <= 1:
        raise JCError(f"--quota-floor must be between 0 and 1; got {f}")
