"""The training data open_clip_train gets from the launcher: per manifest step, this rank's
slice of that step's batch, decoded with open_clip's training transform and tokenizer, in a
loader that looks to train_one_epoch like open_clip's own (`num_batches`, `num_samples`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from jestcurate.errors import JCError
from jestcurate.io.reader import IMAGE_EXTS, SampleError, load_image
from jestcurate.trainer.loader import Sample, SelectionBatches, this_worker
from jestcurate.trainer.openclip.plan import Plan

Pending = list[tuple[int, list[str]]]  # (step, keys) of batches handed out, not yet recorded


class Decode:
    """Raw samples -> (images, tokens), with open_clip's training transform and tokenizer."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], tokenizer: Any) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = [], []
        for sample in samples:
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None or "txt" not in sample:
                raise JCError(f"sample {sample['__key__']} has no image or no caption")
            try:
                images.append(self.preprocess(load_image(data)))
            except SampleError as exc:
                raise JCError(f"sample {sample['__key__']}: {exc}") from None
            captions.append(sample["txt"].decode("utf-8"))
        return torch.stack(images), self.tokenizer(captions)


def manifest_key(sample: Sample) -> str:
    """The manifest's key of a sample: an exported sample carries it as jestcurate.source_key."""
    if "json" in sample:
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, KeyError):
            return str(json.loads(sample["json"])["jestcurate"]["source_key"])
    return str(sample["__key__"])


class StepDataset(torch.utils.data.IterableDataset):
    """This rank's micro-batches of one epoch's manifest steps, in order, as (images, texts,
    step, keys); DataLoader worker w takes micro-batches w, w+W, ..., so order holds."""

    def __init__(self, plan: Plan, rank: int, decode: Decode, epoch: Any) -> None:
        self.plan = plan
        self.readers = [
            SelectionBatches(sel, source=src, rank=rank, world_size=plan.world_size)
            for sel, src in zip(plan.selections, plan.sources, strict=True)
        ]
        self.decode = decode
        self.epoch = epoch  # open_clip's SharedEpoch: set in the main process, read by workers

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.accum

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[str]]]:
        worker, workers = this_worker()
        accum = self.plan.accum
        first = self.epoch.get_value() * self.plan.steps_per_epoch * accum
        for m in range(first, first + len(self))[worker::workers]:
            step, part = divmod(m, accum)
            selection, local = self.plan.locate(step)
            samples = self.readers[selection].batch(local, part, accum)
            images, texts = self.decode(samples)
            yield images, texts, step, [manifest_key(s) for s in samples]


class StepLoader:
    """What open_clip_train's train_one_epoch iterates: (images, texts) per micro-batch, with
    the `num_batches` and `num_samples` it reads; it notes each batch's step and keys for
    --record-steps."""

    def __init__(self, batches: Any, plan: Plan, pending: Pending | None) -> None:
        self.batches = batches  # yields (images, texts, step, keys)
        self.num_batches = plan.steps_per_epoch * plan.accum
        self.num_samples = plan.steps_per_epoch * plan.batch
        self.pending = pending

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, texts, step, keys in self.batches:
            if self.pending is not None:
                self.pending.append((step, keys))
            yield images, texts


class Recorder:
    """An optimizer step hook that appends the steps and keys of the batches taken since the
    last step to DIR/rank-NNN.jsonl (a step the gradient scaler skipped: `"updated": false`)."""

    def __init__(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank:03d}.jsonl"
        self.pending: Pending = []

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        by_step: dict[int, list[str]] = {}
        for step, keys in self.pending:
            by_step.setdefault(step, []).extend(keys)
        self.pending.clear()
        last = max(by_step, default=None)
        with open(self.path, "a") as f:
            for step, keys in by_step.items():
                line: dict[str, Any] = {"step": step, "keys": keys}
                if step != last:
                    line["updated"] = False
                f.write(json.dumps(line) + "\n")


def data_loader(dataset: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """Items as the dataset yields them (batch_size=None), workers kept across epochs."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
