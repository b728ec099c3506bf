"""select's configuration, its checks, and the names of what it writes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from jestcurate.errors import JCError
from jestcurate.math.jest import (
    CRITERIA,
    DEFAULT_CHUNKS,
    DEFAULT_POOL,
    DEFAULT_TEMPERATURE,
    SAMPLERS,
)
from jestcurate.model.openclip import resolve_device

log = logging.getLogger(__name__)


METHODS = ("random", "clip-score", "easy-ref", "learnability", "jest")


SUPER_BATCH_METHODS = ("easy-ref", "learnability", "jest")


MANIFEST = "manifest.parquet"


SUMMARY = "summary.json"


UIDS = "uids.npy"


TASKS_DIR = "tasks"


SCATTER_DIR = "scatter"


SELECTION_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SelectConfig:
    reference: Path
    out: Path
    learner: Path | None = None
    method: str = "jest"
    score: str | None = None  # jest's criterion; default learnability with a learner
    ratio: float = 0.2
    batch_size: int = 4096
    chunks: int | None = None  # jest: None draws each batch in 16 chunks, or b when smaller
    seed: int = 0
    temperature: float | None = None  # None: the sampler's default (jest.DEFAULT_TEMPERATURE)
    topk: bool = False
    sampler: str = "refine"  # jest: refine (the default) or paper (Algorithm 1 as written)
    sweeps: int = 1  # jest --sampler refine: refinement sweeps over the batch's chunks
    pool: float = DEFAULT_POOL  # jest --sampler refine: re-draw from the best pool x b candidates
    min_clip_score: float | None = None
    max_steps: int | None = None
    device: str = "auto"
    dedup: Path | None = None  # a `jestcurate dedup` output: its dropped rows are not eligible
    balance_clusters: bool = False  # cap each dedup cluster's share of every batch / kept set
    task_index: int | None = None  # array task I of N; None: from Slurm's variables, else 0 of 1
    num_tasks: int | None = None
    merge: bool = False  # only join finished task outputs into OUT
    overwrite: bool = False  # replace whatever selection OUT holds

    @property
    def super_batch(self) -> int:
        return max(self.batch_size, round(self.batch_size / self.ratio))

    @property
    def n_chunks(self) -> int:
        """jest's chunks per batch, as asked or the default (the sampler draws at most b)."""
        return self.chunks if self.chunks is not None else DEFAULT_CHUNKS

    @property
    def resolved_temperature(self) -> float:
        return (
            self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.sampler]
        )

    @property
    def criterion(self) -> str | None:
        if self.method != "jest":
            return None
        return self.score or ("learnability" if self.learner else "easy-ref")


def _validate(cfg: SelectConfig) -> None:
    if cfg.method not in METHODS:
        raise JCError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if not 0 < cfg.ratio <= 1:
        raise JCError(f"--ratio is the kept fraction and must be in (0, 1], got {cfg.ratio}")
    if cfg.batch_size < 1 or (cfg.chunks is not None and cfg.chunks < 1):
        raise JCError("--batch-size and --chunks must be at least 1")
    if cfg.temperature is not None and cfg.temperature <= 0:
        raise JCError("--temperature must be positive (use --topk for deterministic choice)")
    if cfg.sampler not in SAMPLERS:
        raise JCError(f"unknown --sampler {cfg.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if cfg.sweeps < 0:
        raise JCError("--sweeps must be 0 or more")
    if cfg.pool < 1:
        raise JCError(f"--pool is a multiple of the batch size, at least 1; got {cfg.pool}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise JCError("--max-steps must be at least 1")
    if cfg.score is not None and cfg.method != "jest":
        raise JCError("--score chooses jest's criterion; other methods have their own")
    if cfg.criterion is not None and cfg.criterion not in CRITERIA:
        raise JCError(f"unknown --score {cfg.criterion!r}; use one of {', '.join(CRITERIA)}")
    needs_learner = cfg.method == "learnability" or cfg.criterion in (
        "learnability",
        "hard-learner",
    )
    if needs_learner and cfg.learner is None:
        what = f"--score {cfg.criterion}" if cfg.method == "jest" else f"--method {cfg.method}"
        raise JCError(f"{what} needs --learner (a score set made with `score --role learner`)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    if cfg.method in SUPER_BATCH_METHODS:
        resolve_device(cfg.device)  # an unusable --device fails now, not after the cache pass
    if cfg.balance_clusters and cfg.dedup is None:
        raise JCError("--balance-clusters needs --dedup (the clusters come from jestcurate dedup)")
    if cfg.min_clip_score is not None and not -1 <= cfg.min_clip_score <= 1:
        raise JCError(
            f"--min-clip-score is a cosine similarity, in [-1, 1]; got {cfg.min_clip_score}"
        )
    if cfg.method == "jest" and cfg.chunks is not None and cfg.chunks > cfg.batch_size:
        raise JCError(
            f"--chunks {cfg.chunks} is more than the batch size {cfg.batch_size}: each chunk "
            f"draws at least one example; use at most {cfg.batch_size}"
        )
    if cfg.method in SUPER_BATCH_METHODS and cfg.super_batch == cfg.batch_size:
        # B = round(b / ratio) exceeds b from b / ratio >= b + 0.5 on: shown rounded down
        most = math.floor(cfg.batch_size / (cfg.batch_size + 0.5) * 1e4) / 1e4
        log.warning(
            "--ratio %s makes each super-batch exactly one batch of %d: %s keeps every "
            "candidate and chooses nothing (--ratio %s or less chooses)",
            cfg.ratio, cfg.batch_size, cfg.method, most,
        )  # fmt: skip
