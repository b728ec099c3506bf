"""select's filters beyond --min-clip-score, --dedup and --exclude (which io/eligible.py
applies the same way), in this order: caption length (captions), a target set's (target:
DataComp's image-based cluster filter, NormSim) and caption language (language). Each is a
RowFilter (io/eligible.py): given a part's table it returns the rows it removes, so every
filter composes with every other and with every method (docs/select.md)."""

from __future__ import annotations

import logging
from typing import Any

from jestcurate.io.eligible import RowFilter
from jestcurate.io.store import ScoreSet
from jestcurate.pipelines.select.filters.options import TARGET_FILTERS, FilterOptions, check

__all__ = ["TARGET_FILTERS", "FilterOptions", "build", "check", "identity"]

log = logging.getLogger(__name__)


def identity(opts: FilterOptions, pool: ScoreSet) -> dict[str, Any] | None:
    """What a selection records of its filters (None without any, so that selections made
    before them keep their identity). A target set made with another model is refused here,
    before anything is read."""
    if not opts.given:
        return None
    found: dict[str, Any] = {}
    if opts.caption_length:
        bounds = {
            "min_words": opts.min_caption_words, "max_words": opts.max_caption_words,
            "min_chars": opts.min_caption_chars, "max_chars": opts.max_caption_chars,
        }  # fmt: skip
        found["caption_length"] = {k: v for k, v in bounds.items() if v is not None}
    if opts.language:
        from jestcurate.pipelines.select.filters.language import detector_version, parse_codes

        found["language"] = {"codes": list(parse_codes(opts.language)),
                             "detector": detector_version()}  # fmt: skip
    if opts.target is not None:
        from jestcurate.pipelines.select.filters.target import target_identity

        target = {"filter": opts.target_filter, **target_identity(opts.target, pool)}
        for key in ("keep", "threshold", "clusters"):
            value = getattr(opts, f"target_{key}")
            if value is not None:
                target[key] = value
        found["target"] = target
    return found


def build(opts: FilterOptions, pool: ScoreSet, seed: int, device: str) -> tuple[RowFilter, ...]:
    """The filters, in the order they apply (cheap first): caption length, target, language
    (lingua is the costliest per row: it sees only what the others left). A target filter
    first makes its pass over the pool (k-means sample, NormSim quantile)."""
    made: list[RowFilter] = []
    if opts.caption_length:
        from jestcurate.pipelines.select.filters.captions import CaptionLength

        made.append(CaptionLength(opts.min_caption_words, opts.max_caption_words,
                                  opts.min_caption_chars, opts.max_caption_chars))  # fmt: skip
    if opts.target is not None:
        made.append(_target(opts, pool, seed, device))
    if opts.language:
        from jestcurate.pipelines.select.filters.language import CaptionLanguage, parse_codes

        made.append(CaptionLanguage(parse_codes(opts.language)))
    return tuple(made)


def _target(opts: FilterOptions, pool: ScoreSet, seed: int, device: str) -> RowFilter:
    from jestcurate.pipelines.select.filters import target as target_mod

    assert opts.target is not None
    images = target_mod.read_target(opts.target, pool)
    if opts.target_filter == "clusters":
        gpu = kmeans_on_gpu(device)
        return target_mod.build_clusters(pool, images, opts.target_clusters, seed, gpu)
    p = 2.0 if opts.target_filter == "normsim2" else float("inf")
    return target_mod.build_normsim(pool, images, p, opts.target_keep, opts.target_threshold, seed)


def kmeans_on_gpu(device: str) -> bool:
    """Where the target's k-means runs, from select's --device (meant for the jest sampler, so
    never refused here): auto or cuda[:N] on the GPU when faiss sees one, anything else (cpu,
    mps, ...) on the CPU."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0 and device != "auto":
        log.info("--device %s: faiss sees no GPU (faiss-cpu?), so the target's k-means runs "
                 "on the CPU", device)  # fmt: skip
    return gpus > 0
