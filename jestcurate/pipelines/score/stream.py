"""score's input stream: DataLoader workers read shards into chunks of decoded samples."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from jestcurate.errors import default_sigterm
from jestcurate.io.reader import ShardReadError, iter_raw_samples, parse_sample
from jestcurate.io.shards import Shard, open_shard, shard_size
from jestcurate.io.store import marker_settles
from jestcurate.scale.claims import Claims
from jestcurate.trainer.loader import this_worker


class ShardStream(torch.utils.data.IterableDataset):
    """Yields chunks of at most `chunk_size` valid samples, shard by shard; each worker process
    takes every num_workers-th shard. A shard's last chunk has `last` set and says whether the
    shard broke (`failure`)."""

    def __init__(
        self,
        shards: Sequence[Shard],
        preprocess: Any,
        tokenizer: Any,
        chunk_size: int,
        max_pixels: int,
        claims: Claims | None = None,
        began: float = 0.0,
        defer_jpeg: bool = False,
        draft: int | None = None,
        decode_here: Any = None,
        nice: bool = False,
    ) -> None:
        self.shards = list(shards)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.max_pixels = max_pixels
        self.claims = claims
        self.began = began
        self.defer_jpeg = defer_jpeg or decode_here is not None
        self.draft = draft  # --decode pil-draft: JPEGs DCT-scaled towards this side
        # --decode torch with a CPU model: the worker runs the batched torch decoding itself,
        # so it spreads over the workers instead of taking the model's own threads.
        self.decode_here = decode_here
        self.nice = nice  # workers yield the cores to the model (a CPU model, _CpuThreads)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is not None:
            default_sigterm()  # a worker ends at once; the main process cleans up
            if self.nice:
                os.nice(19)
        worker, workers = this_worker()
        for pos in range(worker, len(self.shards), workers):
            yield from self._read(pos)

    def _chunk(
        self, pos: int, rows: list, images: list, captions: list, valid: list, **extra: Any
    ) -> dict:
        deferred = self.defer_jpeg and bool(images)
        chunk = {
            "pos": pos,
            "rows": rows,
            "images": torch.stack(images) if images and not deferred else None,
            "items": images if deferred else None,  # JPEG bytes or tensors, for the device
            "valid": valid,  # the row of each image
            "tokens": self.tokenizer(captions) if captions else None,
            "last": False,
            **extra,
        }
        if deferred and self.decode_here is not None:
            chunk["images"], chunk["tokens"] = decode_deferred(
                self.decode_here, chunk, torch.device("cpu")
            )
            chunk["items"] = None
        return chunk

    def _claim(self, shard: Shard) -> bool:
        """Claim the shard just before reading it; False if another run has it or finished it
        in the meantime."""
        claims = self.claims
        if claims is None:
            return True
        if not claims.try_claim(shard.name):
            return False
        if marker_settles(claims.dir.parent, shard.name, self.began):
            claims.release(shard.name)
            return False
        return True

    def _read(self, pos: int) -> Iterator[dict[str, Any]]:
        shard = self.shards[pos]
        if not self._claim(shard):
            yield {"pos": pos, "skipped": True}
            return
        started = time.time()
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        images: list[torch.Tensor | bytes] = []
        captions: list[str] = []
        valid: list[int] = []
        failure = None
        try:
            with open_shard(shard.url) as f:
                for raw in iter_raw_samples(f):
                    row, image = parse_sample(
                        raw, seen, self.max_pixels, self.defer_jpeg, self.draft
                    )
                    if image is not None:
                        try:
                            images.append(
                                image if isinstance(image, bytes) else self.preprocess(image)
                            )
                            captions.append(row["caption"])
                            valid.append(len(rows))
                        except Exception as exc:  # a transform failing on one image fails that row
                            row.update(status="error", error=f"preprocess failed: {exc}")
                    rows.append(row)
                    if len(images) >= self.chunk_size:
                        yield self._chunk(pos, rows, images, captions, valid, started=started)
                        rows, images, captions, valid = [], [], [], []
        except ShardReadError as exc:
            failure = str(exc)
        except Exception as exc:  # a shard that cannot be opened fails alone; the run goes on
            failure = f"cannot read shard: {type(exc).__name__}: {exc}"
        yield self._chunk(
            pos,
            rows,
            images,
            captions,
            valid,
            started=started,
            last=True,
            failure=failure,
            size=shard_size(shard.url),
        )


def _chunk_size(
    batch_size: int, image_size: tuple[int, int], budget: int = 64 << 20, least: int = 256
) -> int:
    """Samples per worker chunk: a batch, or `least` if the batch is smaller (each chunk costs
    a fixed few ms to hand over: the fd of each tensor goes through a socket handshake with
    the worker), unless that passes `budget` bytes of float32 pixels. Chunks sit in shared
    memory (prefetched by every worker), which containers often keep small; the encoder packs
    chunks back into full batches."""
    per_sample = 3 * image_size[0] * image_size[1] * 4
    return max(1, min(max(batch_size, least), budget // per_sample))


def decode_deferred(
    on_device: Any, item: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A chunk's images decoded and preprocessed on the device; a JPEG that fails to decode
    turns its row into an error row and drops its caption tokens."""
    images, bad = on_device.batch(item["items"], device)
    tokens = item["tokens"]
    if bad:
        for i, error in bad:
            item["rows"][item["valid"][i]].update(status="error", error=error)
        failed = {i for i, _ in bad}
        keep = [i for i in range(len(item["items"])) if i not in failed]
        tokens = tokens[keep] if keep else None
    return images, tokens
