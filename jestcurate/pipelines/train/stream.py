"""The data stream: an epoch of shuffled, augmented, full batches from the shards (less any
rows an exclusion names), whose order and augmentation follow from (--seed, epoch) alone, with
the sample counts travelling beside the batches; and a count of the samples without decoding
them."""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from jestcurate.errors import default_sigterm
from jestcurate.io.reader import (
    IMAGE_EXTS,
    ShardReadError,
    error_reason,
    iter_raw_samples,
    parse_sample,
)
from jestcurate.io.remote import is_url
from jestcurate.io.shards import open_shard
from jestcurate.model.openclip import LoadedModel
from jestcurate.pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)


def _samples(
    urls: Iterator[dict[str, Any]], stats: Counter[str], skip: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: shard urls in, valid (image, caption) samples out, less the
    samples `skip` names (shard_location(url) -> sorted sample indexes). Bad samples and shards
    are counted, never fatal."""
    for item in urls:
        url = item["url"]
        seen: set[str] = set()
        skipped = None if skip is None else skip.get(shard_location(url))
        try:
            with open_shard(url) as f:
                for raw in iter_raw_samples(f):
                    if skipped is not None and _holds(skipped, raw.index):
                        stats["excluded"] += 1
                        continue
                    row, image = parse_sample(raw, seen)
                    if image is None:
                        stats[error_reason(row["error"])] += 1
                        continue
                    stats["ok"] += 1
                    yield {"image": image, "caption": row["caption"]}
        except ShardReadError as exc:
            stats["damaged shards"] += 1
            log.warning("%s: %s", url, exc)
        except OSError as exc:
            stats["unreadable shards"] += 1
            log.warning("cannot read %s: %s", url, exc)


def _holds(sorted_rows: Any, index: int) -> bool:
    at = int(sorted_rows.searchsorted(index))
    return at < len(sorted_rows) and int(sorted_rows[at]) == index


def shard_location(url: str) -> str:
    """A shard as exclusions are matched: a resolved path, or the URL as it is."""
    return url if is_url(url) else os.path.realpath(url)


def _augment_seed(seed: int, worker: int) -> int:
    """The torch seed of the augmentation in `worker` (0 for --workers 0) of the epoch whose data
    seed is `seed`."""
    return random.Random(f"augment {seed} {worker}").getrandbits(63)


class _PrivateRNG:
    """With --workers 0: a torch RNG state of its own, swapped in around each batch's
    augmentation and seeded as a worker 0's, so that the main process's RNG is left to training
    and --workers 0 draws as --workers 1 does."""

    def __init__(self, seed: int) -> None:
        self.state = torch.Generator().manual_seed(_augment_seed(seed, 0)).get_state()

    def run(self, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None:
            return make()  # a worker: its own RNG, seeded by _worker_init
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            out = make()
            self.state = torch.get_rng_state()
        return out


def _with_counts(src: Iterator[Any], stats: Counter[str]) -> Iterator[Any]:
    """Each batch with (worker, sample counts so far), then, after the last, (None, None, counts):
    with --workers the counts live in the worker, so they travel with the batches."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    for images, tokens in src:
        yield images, tokens, (worker, dict(stats))
    yield None, None, (worker, dict(stats))


def batches(
    urls: list[str],
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Any,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    skip: dict[str, Any] | None = None,
) -> Any:
    """One epoch of shuffled (images, tokens, (worker, counts)) batches, full batches only,
    ending with a (None, None, (worker, counts)) from each worker; `counts` are the worker's
    sample counts by outcome ("ok" or why a sample or shard was skipped) so far this epoch. The
    order and the augmentation follow from `seed` alone (see _augment_seed)."""
    import webdataset as wds

    stats: Counter[str] = Counter()
    rng = _PrivateRNG(seed)

    def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = rng.run(lambda: torch.stack([preprocess(s["image"]) for s in samples]))
        return images, tokenizer([s["caption"] for s in samples])

    return wds.DataPipeline(
        wds.SimpleShardList(urls, seed=seed),
        wds.split_by_worker,
        lambda src: _samples(src, stats, skip),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        lambda src: _with_counts(src, stats),
    )


def count_samples(urls: list[str], stop_at: int | None = None) -> int:
    """Samples with an image and a caption file, without decoding: the size of an epoch (or,
    with `stop_at`, whether there are at least that many)."""
    count = 0
    for url in urls:
        try:
            with open_shard(url) as f:
                for raw in iter_raw_samples(f):
                    has_image = any(ext in raw.files for ext in IMAGE_EXTS)
                    count += has_image and ("txt" in raw.files or "json" in raw.files)
                    if stop_at is not None and count >= stop_at:
                        return count
        except (ShardReadError, OSError):
            continue  # reported as it is met during training
    return count


def epoch_loader(
    cfg: TrainConfig, urls: list[str], model: LoadedModel, preprocess: Any, epoch: int
) -> Any:
    seed = cfg.seed + epoch
    stream = batches(urls, preprocess, model.tokenizer, cfg.batch_size, cfg.shuffle_buffer, seed)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=model.device.type == "cuda",
        # SIGTERM ends a worker at once (the main cleans up); the worker seeds its augmentation.
        worker_init_fn=functools.partial(_worker_init, seed),
        generator=torch.Generator().manual_seed(seed),  # not the main RNG: that is training's
    )


def _worker_init(seed: int, worker_id: int) -> None:
    default_sigterm()
    torch.manual_seed(_augment_seed(seed, worker_id))
