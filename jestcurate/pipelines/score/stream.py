"""score's input stream: DataLoader workers read shards into chunks of decoded samples."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from jestcurate.errors import default_sigterm
from jestcurate.io.reader import ShardReadError, iter_raw_samples, parse_sample
from jestcurate.io.shards import Shard, open_shard, shard_size
from jestcurate.io.store import marker_settles
from jestcurate.model.devicedecode import DevicePreprocess
from jestcurate.pipelines.score.cpu import lower_priority
from jestcurate.pipelines.score.decoding import Decoding
from jestcurate.scale.claims import Claims
from jestcurate.trainer.loader import this_worker


def _pinned(value: Any) -> Any:
    return value.pin_memory() if isinstance(value, torch.Tensor) else value


@dataclass
class Chunk:
    """Up to a chunk's worth of one shard's valid samples, with the error rows read among them,
    as a worker hands them to the main process. A shard's last chunk has `last` set and says
    whether the shard broke (`failure`); a shard another run claimed or finished meanwhile
    yields one chunk with `skipped` set and nothing else."""

    pos: int  # the shard's place in the pass
    started: float = 0.0  # when the worker began the shard
    rows: list[dict[str, Any]] = field(default_factory=list)  # every sample read, errors too
    valid: list[int] = field(default_factory=list)  # the row of each image
    images: torch.Tensor | None = None  # preprocessed, stacked
    deferred: list[torch.Tensor | bytes] | None = None  # JPEG bytes or tensors, for the device
    tokens: torch.Tensor | None = None  # the captions of the images, tokenized
    last: bool = False
    failure: str | None = None  # the last chunk: why the shard broke, if it did
    size: int | None = None  # the last chunk: the shard's size in bytes
    skipped: bool = False

    def pin_memory(self) -> Chunk:
        """The chunk with its tensors in pinned memory. torch's DataLoader calls this for
        pin_memory=True: it recurses into dicts and lists, not into dataclasses."""
        deferred = None if self.deferred is None else [_pinned(d) for d in self.deferred]
        return dataclasses.replace(
            self, images=_pinned(self.images), tokens=_pinned(self.tokens), deferred=deferred
        )

    def decode(self, batched: DevicePreprocess, device: torch.device) -> None:
        """Decode and preprocess the deferred images on `device`, in place; a JPEG that fails to
        decode turns its row into an error row and drops its caption tokens."""
        assert self.deferred is not None
        images, bad = batched.batch(self.deferred, device)
        if bad:
            for i, error in bad:
                self.rows[self.valid[i]].update(status="error", error=error)
            failed = {i for i, _ in bad}
            keep = [i for i in range(len(self.deferred)) if i not in failed]
            self.tokens = self.tokens[keep] if keep and self.tokens is not None else None
        self.images, self.deferred = images, None


class ShardStream(torch.utils.data.IterableDataset):
    """Yields Chunks of at most `chunk_size` valid samples, shard by shard; each worker process
    takes every num_workers-th shard, claiming it just before reading it."""

    def __init__(
        self,
        shards: Sequence[Shard],
        preprocess: Any,
        tokenizer: Any,
        chunk_size: int,
        max_pixels: int,
        decoding: Decoding = Decoding(),
        claims: Claims | None = None,
        began: float = 0.0,
        nice: bool = False,
    ) -> None:
        self.shards = list(shards)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.max_pixels = max_pixels
        self.decoding = decoding
        self.claims = claims
        self.began = began
        self.nice = nice  # workers yield the cores to the model (cpu.nice_workers)

    def __iter__(self) -> Iterator[Chunk]:
        if torch.utils.data.get_worker_info() is not None:
            default_sigterm()  # a worker ends at once; the main process cleans up
            if self.nice:
                lower_priority()
        worker, workers = this_worker()
        for pos in range(worker, len(self.shards), workers):
            yield from self._read(pos)

    def _chunk(
        self, pos: int, started: float, rows: list, images: list, captions: list, valid: list
    ) -> Chunk:
        tokens = self.tokenizer(captions) if captions else None
        chunk = Chunk(pos, started, rows, valid, tokens=tokens)
        if not images:
            return chunk
        if not self.decoding.defers_jpeg:
            chunk.images = torch.stack(images)
            return chunk
        chunk.deferred = images
        if self.decoding.in_workers:
            assert self.decoding.batched is not None
            chunk.decode(self.decoding.batched, torch.device("cpu"))
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

    def _read(self, pos: int) -> Iterator[Chunk]:
        shard = self.shards[pos]
        if not self._claim(shard):
            yield Chunk(pos, skipped=True)
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
                        raw, seen, self.max_pixels, self.decoding.defers_jpeg, self.decoding.draft
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
                        yield self._chunk(pos, started, rows, images, captions, valid)
                        rows, images, captions, valid = [], [], [], []
        except ShardReadError as exc:
            failure = str(exc)
        except Exception as exc:  # a shard that cannot be opened fails alone; the run goes on
            failure = f"cannot read shard: {type(exc).__name__}: {exc}"
        end = self._chunk(pos, started, rows, images, captions, valid)
        end.last, end.failure, end.size = True, failure, shard_size(shard.url)
        yield end


def chunk_size(
    batch_size: int, image_size: tuple[int, int], budget: int = 64 << 20, least: int = 256
) -> int:
    """Samples per worker chunk: a batch, or `least` if the batch is smaller (each chunk costs
    a fixed few ms to hand over: the fd of each tensor goes through a socket handshake with
    the worker), unless that passes `budget` bytes of float32 pixels. Chunks sit in shared
    memory (prefetched by every worker), which containers often keep small; the encoder packs
    chunks back into full batches."""
    per_sample = 3 * image_size[0] * image_size[1] * 4
    return max(1, min(max(batch_size, least), budget // per_sample))
