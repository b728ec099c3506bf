"""Read a selection's batches in a trainer, keeping JEST batches intact.

`SelectionBatches` yields one item per training step, in step order: this rank's slice of that
step's batch, as raw WebDataset samples (`{"__key__": ..., "jpg": bytes, "txt": bytes, ...}`),
optionally passed through `transform` (decode and collate there). Steps never mix; every rank
gets b / world_size samples of every step, and together the ranks see exactly the manifest's
batch. Wrap it in `torch.utils.data.DataLoader(batches, batch_size=None, num_workers=W)`: worker
w reads steps w, w+W, ... and the DataLoader hands them out round-robin, so step order holds.

Samples are read from the exported shards (`select --export`) or straight from the source shards
the selection was made from (`source="original"`; local uncompressed tars).
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jestcurate.errors import JCError
from jestcurate.io.reader import split_member
from jestcurate.io.remote import is_url
from jestcurate.io.store import read_json, read_output, require_selection_images

Sample = dict[str, Any]


def by_position(path: str) -> bool:
    """Whether a tar's samples can be read by position: local and uncompressed."""
    return not is_url(path) and not path.endswith((".gz", ".tgz"))


def export_meta(selection: Path) -> dict[str, Any] | None:
    """A selection's export.json once the export finished (it then names its shards), else
    None."""
    meta = selection / "shards" / "export.json"
    found = read_json(meta) if meta.is_file() else {}
    return found if "shards" in found else None


def finished_export(selection: Path) -> dict[str, Any]:
    """A selection's export.json, refused unless the export finished."""
    found = export_meta(selection)
    if found is None:
        raise JCError(f"{selection} has no finished export; run select with --export")
    return found


class TarIndex:
    """Where each sample's files lie in an uncompressed local tar, from one scan of its headers
    (tarfile's random-access mode seeks over the data). Samples are numbered in file order, as
    the score set's `index` column numbers them."""

    def __init__(self, path: str) -> None:
        if not by_position(path):
            raise JCError(
                f"cannot read {path} by position: only local uncompressed tars can be; "
                "export the selection (select --export) and read that instead"
            )
        self.path = path
        self.samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    split = split_member(member)
                    if split is None:
                        continue
                    key, ext = split
                    if not self.samples or self.samples[-1][0] != key:
                        self.samples.append((key, {}))
                    self.samples[-1][1][ext] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as exc:
            raise JCError(f"cannot index {path}: {exc}") from None
        self._file: Any = None

    def read(self, i: int) -> Sample:
        key, spans = self.samples[i]
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open across reads)
        sample: Sample = {"__key__": key, "__url__": self.path}
        for ext, (offset, size) in spans.items():
            self._file.seek(offset)
            sample[ext] = self._file.read(size)
        return sample


# Indexes kept per process: a read from a tar outside them scans its headers again.
INDEXES_KEPT = 64


@functools.lru_cache(maxsize=INDEXES_KEPT)
def _index(path: str) -> TarIndex:
    return TarIndex(path)


def sample_key(global_position: int) -> str:
    return f"{global_position:010d}"


def this_worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) outside any worker."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class SelectionBatches(torch.utils.data.IterableDataset):
    """This rank's slice of every training batch of a selection, in step order.

    selection: the folder `select` wrote (manifest.parquet, summary.json, shards/ if exported).
    source: "export" (the default; needs `select --export`) or "original".
    rank, world_size: default from torch.distributed when initialised, else RANK/WORLD_SIZE.
    transform: called on each item (a list of samples) in the worker, e.g. to decode and stack.
    steps: a range of steps to read (default all), e.g. to resume from a step.
    """

    def __init__(
        self,
        selection: str | os.PathLike[str],
        source: str = "export",
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[list[Sample]], Any] | None = None,
        steps: range | None = None,
    ) -> None:
        self.dir = Path(selection)
        if not (self.dir / "summary.json").is_file():
            raise JCError(f"{self.dir} is not a finished selection (no summary.json)")
        summary = read_json(self.dir / "summary.json")
        self.batch_size = int(summary["parameters"]["batch_size"])
        self.total_steps = int(summary["counts"]["steps"])
        if source not in ("export", "original"):
            raise JCError(f"source must be 'export' or 'original', not {source!r}")
        self.source = source
        if source == "export":
            self.per_shard = int(finished_export(self.dir)["samples_per_shard"])
        else:
            require_selection_images(summary, "SelectionBatches")
            manifest = read_output(self.dir / "manifest.parquet", ["shard", "index", "key"])
            self.shard_of = manifest.column("shard").to_pylist()
            self.index_of = np.asarray(manifest.column("index").to_numpy())
            self.key_of = manifest.column("key").to_pylist()
        default_rank, default_world = _distributed()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise JCError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.batch_size % self.world_size:
            raise JCError(
                f"batch size {self.batch_size} does not split over {self.world_size} ranks"
            )
        self.per_rank = self.batch_size // self.world_size
        self.transform = transform
        self.steps = steps if steps is not None else range(self.total_steps)

    def __len__(self) -> int:
        return len(self.steps)

    def _sample(self, p: int) -> Sample:
        if self.source == "export":
            shard = self.dir / "shards" / f"{p // self.per_shard:05d}.tar"
            return _index(str(shard)).read(p % self.per_shard)
        sample = _index(self.shard_of[p]).read(int(self.index_of[p]))
        if sample["__key__"] != self.key_of[p]:  # the manifest points by position
            raise JCError(
                f"{self.shard_of[p]} changed since it was scored: sample {self.index_of[p]} has "
                f"key {sample['__key__']!r}, the manifest says {self.key_of[p]!r}"
            )
        return sample

    def batch(self, step: int, part: int = 0, parts: int = 1) -> list[Sample]:
        """This rank's samples of one step, in manifest order; with `parts`, only part `part`
        of them (for gradient accumulation's micro-batches)."""
        size = self.per_rank // parts
        first = step * self.batch_size + self.rank * self.per_rank + part * size
        return [self._sample(p) for p in range(first, first + size)]

    def __iter__(self) -> Iterator[Any]:
        worker, workers = this_worker()
        for step in self.steps[worker::workers]:
            samples = self.batch(step)
            yield self.transform(samples) if self.transform else samples
