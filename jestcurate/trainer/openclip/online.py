"""Online JEST inside open_clip_train: at every step the model being trained embeds the step's
super-batch (no gradient), and the b examples it trains on are chosen jointly by learnability
against the reference embeddings cached from the score set (jestcurate.online's pieces).

Per step and rank: a DataLoader worker reads this rank's share of the super-batch (B / ranks
candidates) and decodes it with the model's evaluation transform (no augmentation: a score
should not depend on a random crop); the main process embeds it with the model, gathers every
rank's embeddings (all_gather), picks b with the sampler re-seeded from (--online-seed, step),
and takes rank 0's pick (a broadcast of b indices: ranks on different GPUs could otherwise
round differently); each rank then reads its b / ranks picks again from the source shards (a
pick may sit in another rank's share) and decodes them with the training transform. A resumed
run re-seeds alike, so given the same weights it picks the same batch up to floating-point
nondeterminism (open_clip_train turns on cudnn's benchmark mode on GPUs)."""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jestcurate.errors import JCError
from jestcurate.math.sampling import SamplerOptions
from jestcurate.trainer.loader import this_worker
from jestcurate.trainer.online import OnlineSelector, SuperBatch, SuperBatches, gather
from jestcurate.trainer.openclip.plan import Plan
from jestcurate.trainer.openclip.steps import Decode, data_loader


class Candidates(torch.utils.data.IterableDataset):
    """One epoch's super-batches in step order, each with this rank's share decoded for
    scoring (`score`); `decode` is the training transform, for the picks."""

    def __init__(
        self, batches: SuperBatches, plan: Plan, score: Decode, decode: Decode, epoch: Any
    ) -> None:
        self.batches = batches
        self.plan = plan
        self.score = score
        self.decode = decode
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[SuperBatch, torch.Tensor, torch.Tensor]]:
        worker, workers = this_worker()
        first = self.epoch.get_value() * self.plan.steps_per_epoch
        for step in range(first, first + len(self))[worker::workers]:
            candidates = self.batches.super_batch_at(step)
            images, texts = self.score(candidates.samples)
            yield candidates, images, texts


class OnlineSteps:
    """(images, texts, step, keys) per step: this rank's slice of the b chosen examples."""

    def __init__(
        self, loader: Any, batches: SuperBatches, plan: Plan, args: Any, model: Any
    ) -> None:
        from open_clip import get_input_dtype
        from open_clip_train.precision import get_autocast

        assert plan.online is not None
        self.loader = loader
        self.model = model
        self.seed = plan.online.seed
        self.rank, self.world_size = args.rank, args.world_size
        self.device = torch.device(args.device)
        self.autocast = get_autocast(args.precision, device_type=self.device.type)
        self.input_dtype = get_input_dtype(args.precision)
        options = SamplerOptions(plan.batch, plan.online.ratio, "learnability")
        self.selector = OnlineSelector(batches.reference, options, plan.online.seed, self.device)

    def embed(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[Any, ...]:
        """The model's embeddings of this rank's share, and its logit scale and bias."""
        model, training = self.model, self.model.training
        model.eval()
        with torch.no_grad():
            with self.autocast():
                img = model.encode_image(images.to(self.device, dtype=self.input_dtype))
                txt = model.encode_text(texts.to(self.device))
            bias = getattr(model, "logit_bias", None)
            scale = float(model.logit_scale.exp())
            bias = None if bias is None else float(bias)
        model.train(training)
        return img.float(), txt.float(), scale, bias

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[str]]]:
        for candidates, images, texts in self.loader:
            img, txt, scale, bias = self.embed(images, texts)
            step_seed = np.random.SeedSequence([self.seed, candidates.step]).generate_state(1)
            self.selector.generator.manual_seed(int(step_seed[0]))
            picked = self.selector.select(
                candidates.ref_img, candidates.ref_txt, gather(img), gather(txt), scale, bias
            )
            if self.world_size > 1:  # one pick for all ranks, whatever each one computed
                picked = picked.to(self.device)
                torch.distributed.broadcast(picked, src=0)
            mine = self.selector.rank_slice(picked, self.rank, self.world_size)
            samples = candidates.fetch(mine)
            images, texts = self.loader.dataset.decode(samples)
            yield images, texts, candidates.step, [s["__key__"] for s in samples]


@contextlib.contextmanager
def _one_builder() -> Iterator[None]:
    """Ranks on one machine build the reference row cache (in the temp dir) one at a time:
    the first builds it, the others find it ready."""
    folder = Path(tempfile.gettempdir()) / "jestcurate-online"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def candidates(plan: Plan, rank: int, world_size: int) -> SuperBatches:
    """The reference's super-batches for this rank (the row cache built once per machine);
    the launcher calls it before open_clip_train starts, so that a long build or a bad score
    set shows before any collective operation waits on it."""
    assert plan.online is not None
    online = plan.online
    with _one_builder():
        batches = SuperBatches(
            online.reference,
            plan.batch,
            online.ratio,
            online.seed,
            rank=rank,
            world_size=world_size,
        )
    if batches.total_steps != plan.total_steps:  # planned from the same score set: a change
        raise JCError(f"{online.reference} changed while the launcher started; rerun")
    return batches


def online_batches(
    plan: Plan, args: Any, decode: Decode, epoch: Any, made: tuple[Any, Any] | None
) -> OnlineSteps:
    """The step loader for --online; `made` is the model being trained and its evaluation
    transform, as open_clip_train created them."""
    if made is None:
        raise JCError("open_clip_train built no model the launcher could see; --online needs it")
    model, preprocess_val = made
    batches = candidates(plan, args.rank, args.world_size)
    score = Decode(preprocess_val, decode.tokenizer)
    loader = data_loader(Candidates(batches, plan, score, decode, epoch), args.workers)
    return OnlineSteps(loader, batches, plan, args, model)
