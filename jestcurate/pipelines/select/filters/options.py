"""select's filter options (captions, language, a target set) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from jestcurate.errors import JCError

TARGET_FILTERS = ("clusters", "normsim2", "normsiminf")
ORDER = ("caption_length", "target", "language")  # the filters' counts, in the order they apply


@dataclass(frozen=True)
class FilterOptions:
    """The filters select applies after --min-clip-score, --dedup and --exclude, in this order
    (cheap first): caption length, a target set's, caption language (docs/select.md,
    "Filters")."""

    min_caption_words: int | None = None
    max_caption_words: int | None = None
    min_caption_chars: int | None = None
    max_caption_chars: int | None = None
    language: tuple[str, ...] = ()  # ISO 639-1 codes
    target: Path | None = None  # a score set (the guide split), made with the pool's model
    target_filter: str | None = None  # one of TARGET_FILTERS
    target_keep: float | None = None  # normsim: keep this top fraction of the ok rows
    target_threshold: float | None = None  # normsim: keep rows scoring at least this
    target_clusters: int | None = None  # clusters: k of the pool's k-means

    @property
    def caption_length(self) -> bool:
        bounds = (self.min_caption_words, self.max_caption_words, self.min_caption_chars,
                  self.max_caption_chars)  # fmt: skip
        return any(b is not None for b in bounds)

    @property
    def given(self) -> bool:
        return self.caption_length or bool(self.language) or self.target is not None


def check(opts: FilterOptions) -> None:
    """The options' own checks, before anything is read (language codes included)."""
    for low, high, what in (
        (opts.min_caption_words, opts.max_caption_words, "words"),
        (opts.min_caption_chars, opts.max_caption_chars, "chars"),
    ):
        for value, side in ((low, "min"), (high, "max")):
            if value is not None and value < 0:
                raise JCError(f"--{side}-caption-{what} must be 0 or more; got {value}")
        if low is not None and high is not None and low > high:
            raise JCError(f"--min-caption-{what} {low} is above --max-caption-{what} {high}")
    if opts.language:
        from jestcurate.pipelines.select.filters.language import parse_codes

        parse_codes(opts.language)
    _check_target(opts)


def _check_target(opts: FilterOptions) -> None:
    kind = opts.target_filter
    if opts.target is None:
        if kind is not None or opts.target_keep is not None or opts.target_threshold is not None:
            raise JCError("--target-filter, --target-keep and --target-threshold need --target")
        if opts.target_clusters is not None:
            raise JCError("--target-clusters needs --target and --target-filter clusters")
        return
    if kind not in TARGET_FILTERS:
        shown = "none given" if kind is None else f"got {kind!r}"
        raise JCError(f"--target needs --target-filter {'|'.join(TARGET_FILTERS)} ({shown})")
    normsim = kind != "clusters"
    if not normsim and (opts.target_keep is not None or opts.target_threshold is not None):
        raise JCError("--target-keep and --target-threshold are for normsim2 and normsiminf")
    if normsim and opts.target_clusters is not None:
        raise JCError("--target-clusters is for --target-filter clusters")
    if normsim and (opts.target_keep is None) == (opts.target_threshold is None):
        raise JCError(f"--target-filter {kind} needs one of --target-keep or --target-threshold")
    if opts.target_threshold is not None and not math.isfinite(opts.target_threshold):
        raise JCError(f"--target-threshold must be a finite number; got {opts.target_threshold}")
    if opts.target_keep is not None and not 0 < opts.target_keep <= 1:
        raise JCError(f"--target-keep is a fraction in (0, 1]; got {opts.target_keep}")
    if opts.target_clusters is not None and opts.target_clusters < 1:
        raise JCError(f"--target-clusters must be at least 1; got {opts.target_clusters}")
