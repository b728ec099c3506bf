"""Online JEST inside open_clip_train: at every step the model being trained embeds the step's
super-batch (no gradient), and the b examples it trains on are chosen jointly by learnability
against the reference embeddings cached from the score set (jestcurate.online's pieces).

Per step and rank: a DataLoader worker reads and decodes this rank's share of the super-batch
(B / ranks candidates); the main process embeds it with the model, gathers every rank's
embeddings (all_gather), picks b with the same seeded sampler on every rank (so all ranks agree
without further messages), reads its b / ranks picks again from the source shards (a pick may
sit in another rank's share) and decodes them for the training step. The sampler is re-seeded
from (--online-seed, step), so a resumed run picks as the uninterrupted one would, given the
same model weights."""

from __future__ import annotations

from collections.abc import Iterator
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
    """One epoch's super-batches in step order, each with this rank's share decoded."""

    def __init__(self, batches: SuperBatches, plan: Plan, decode: Decode, epoch: Any) -> None:
        self.batches = batches
        self.plan = plan
        self.decode = decode
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[SuperBatch, torch.Tensor, torch.Tensor]]:
        worker, workers = this_worker()
        first = self.epoch.get_value() * self.plan.steps_per_epoch
        for step in range(first, first + len(self))[worker::workers]:
            candidates = self.batches.super_batch_at(step)
            images, texts = self.decode(candidates.samples)
            yield candidates, images, texts


class OnlineSteps:
    """(images, texts, step, keys) per step: this rank's slice of the b chosen examples."""

    def __init__(self, loader: Any, batches: SuperBatches, plan: Plan, args: Any, model: Any):
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
            mine = self.selector.rank_slice(picked, self.rank, self.world_size)
            samples = candidates.fetch(mine)
            images, texts = self.loader.dataset.decode(samples)
            yield images, texts, candidates.step, [s["__key__"] for s in samples]


def online_batches(plan: Plan, args: Any, decode: Decode, epoch: Any, model: Any) -> OnlineSteps:
    """The step loader for --online. Each node's first rank builds the reference row cache
    (in the temp dir, shared by the node's ranks) while the others wait."""
    assert plan.online is not None
    if model is None:
        raise JCError("open_clip_train built no model the launcher could see; --online needs it")
    together = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = args.local_rank == 0
    if together and not first:
        torch.distributed.barrier()
    batches = SuperBatches(
        plan.online.reference,
        plan.batch,
        plan.online.ratio,
        plan.online.seed,
        rank=args.rank,
        world_size=args.world_size,
    )
    if together and first:
        torch.distributed.barrier()
    if batches.total_steps != plan.total_steps:  # planned from the same score set: a change
        raise JCError(f"{plan.online.reference} changed while the launcher started; rerun")
    loader = data_loader(Candidates(batches, plan, decode, epoch), args.workers)
    return OnlineSteps(loader, batches, plan, args, model)
