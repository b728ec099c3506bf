"""Online JEST for PyTorch trainers: joint selection inside the training loop, against the
learner as it is now, with the reference model's cost paid once, offline, by `jestcurate score`.

Two pieces, used together in the training loop:

* `SuperBatches`: a torch IterableDataset yielding, per training step, a super-batch of
  B = b / ratio candidates drawn by the same seeded permutation `select` uses, with their cached
  reference embeddings and this rank's share of the raw samples (to run the learner on).
* `OnlineSelector`: given the learner's embeddings of the whole super-batch (computed by the
  trainer without gradients, each rank on its share, then gathered), combines them with the
  cached reference embeddings and returns the b examples to train on, with exactly the
  conditional scores and the chunked sampler of `select --method jest`.

    batches = SuperBatches("scores/", batch_size=256, ratio=0.1)
    selector = OnlineSelector(batches.reference, SamplerOptions(batch_size=256))
    for sb in torch.utils.data.DataLoader(batches, batch_size=None, num_workers=4):
        with torch.no_grad():
            img, txt = learner_embed(sb.samples)           # this rank's share of B
        img, txt = gather(img), gather(txt)                 # all of B, in order
        picked = selector.select(sb.ref_img, sb.ref_txt, img, txt, scale, bias)
        batch = sb.fetch(selector.rank_slice(picked))       # this rank's b / world_size
        train_step(batch)

Every rank must call `select` once per step, in step order: the sampler's random stream is
shared, so all ranks pick the same examples without communicating.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jestcurate.errors import JCError
from jestcurate.io.eligible import INDEX, KEY, PART, REF_IMG, REF_TXT, Filters, fill_cache, scan
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import ScoreSet, fingerprint, open_score_set, read_output
from jestcurate.math.jest import row_cache_fits, select_batch
from jestcurate.math.losses import Embeddings
from jestcurate.math.sampling import SamplerOptions
from jestcurate.trainer.loader import (
    Sample,
    _distributed,
    _index,
    finished_export,
    sample_key,
    this_worker,
)


@dataclass
class SuperBatch:
    """One step's candidates. `ids` are row ids of the reference cache (B of them, in order);
    `samples` are this rank's share of them, positions `own` (a slice of 0..B-1)."""

    step: int
    ids: np.ndarray
    ref_img: torch.Tensor  # (B, D) float16, L2-normalised
    ref_txt: torch.Tensor
    own: slice
    samples: list[Sample]
    shards: list[str] = field(repr=False, default_factory=list)
    index: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))
    keys: list[str] = field(repr=False, default_factory=list)

    def fetch(self, positions: torch.Tensor | np.ndarray | list[int]) -> list[Sample]:
        """Raw samples at super-batch positions (e.g. the ones selected for this rank), read
        by position from the source shards; those already in `samples` are not read again."""
        out = []
        for p in np.asarray(torch.as_tensor(positions).cpu()).tolist():
            if self.own.start <= p < self.own.stop:
                out.append(self.samples[p - self.own.start])
            else:
                out.append(_read(self.shards[p], int(self.index[p]), self.keys[p]))
        return out


class SuperBatches(torch.utils.data.IterableDataset):
    """Super-batches of a reference score set's eligible rows, in the order `select` draws them.

    reference: the score set (its rows must point at local uncompressed source tars).
    batch_size, ratio: b and the kept fraction; B = round(b / ratio).
    seed: the permutation seed (as `select --seed`).
    cache_dir: where the reference rows are cached (built once, reused while the score set is
        unchanged); default a folder under the system temp dir named by the set's fingerprint.
    rank, world_size: default from torch.distributed when initialised, else RANK/WORLD_SIZE.
    transform: applied to this rank's share of raw samples, in the worker.
    export: a selection folder with an export (`select --export`): candidates are then the rows
        it kept, read from its shards (for sources that cannot be read by position).
    """

    def __init__(
        self,
        reference: str | Path,
        batch_size: int,
        ratio: float = 0.1,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[list[Sample]], Any] | None = None,
        min_clip_score: float | None = None,
        steps: range | None = None,
        export: str | Path | None = None,
    ) -> None:
        self.super_batch = SamplerOptions(batch_size, ratio).super_batch  # checked, as select
        self.reference: ScoreSet = open_score_set(Path(reference), role="reference")
        self.reference.require_images("SuperBatches")  # it trains on the samples themselves
        self.batch_size = batch_size
        self.seed = seed
        default_rank, default_world = _distributed()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise JCError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        for name, n in (("batch size", batch_size), ("super-batch", self.super_batch)):
            if n % self.world_size:
                raise JCError(f"{name} {n} does not split over {self.world_size} ranks")
        self.transform = transform
        identity = {
            "reference": fingerprint(self.reference),
            "min_clip_score": min_clip_score,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "jestcurate-online"
        directory = root / digest
        filters = Filters(min_clip_score)
        found = scan(self.reference, None, filters)
        ready = directory / "ready.json"
        if ready.is_file() and json.loads(ready.read_text()) == identity:
            self.cache = RowCache(directory, found.shards, found.counts.eligible)
        else:
            self.cache = fill_cache(
                self.reference, None, found, directory, filters, embeddings=True
            )
            ready.write_text(json.dumps(identity))
        self.part = self.cache.read_range(PART, 0, self.cache.size)
        self.index = self.cache.read_range(INDEX, 0, self.cache.size)
        rows = np.arange(self.cache.size)
        self.export: dict[str, Any] | None = None
        if export is not None:
            rows = self._from_export(Path(export))
        self.perm = rows[np.random.default_rng([seed, 0]).permutation(len(rows))]
        self.total_steps = len(rows) // self.super_batch
        if self.total_steps == 0:
            raise JCError(
                f"{len(rows)} eligible rows: fewer than one super-batch of "
                f"{self.super_batch}; lower the ratio or the batch size"
            )
        self.steps = steps if steps is not None else range(self.total_steps)

    def _from_export(self, selection: Path) -> np.ndarray:
        """The cache rows a selection kept, read from its export by manifest position."""

        meta = finished_export(selection)
        manifest = read_output(selection / "manifest.parquet", ["shard", "index"])
        position = {
            (shard, index): p
            for p, (shard, index) in enumerate(
                zip(
                    manifest.column("shard").to_pylist(),
                    manifest.column("index").to_pylist(),
                    strict=True,
                )
            )
        }
        where = np.full(self.cache.size, -1, dtype=np.int64)
        for row, (part, index) in enumerate(
            zip(self.part.tolist(), self.index.tolist(), strict=True)
        ):
            where[row] = position.get((self.cache.shards[part], index), -1)
        if (where < 0).all():
            raise JCError(f"{selection} was not made from {self.reference.path}")
        self.export = {
            "dir": selection / "shards",
            "per_shard": int(meta["samples_per_shard"]),
            "position": where,
        }
        return np.flatnonzero(where >= 0)

    def __len__(self) -> int:
        return len(self.steps)

    def super_batch_at(self, step: int) -> SuperBatch:
        big = self.super_batch
        ids = self.perm[step * big : (step + 1) * big]
        share = big // self.world_size
        own = slice(self.rank * share, (self.rank + 1) * share)
        shards = [self.cache.shards[p] for p in self.part[ids].tolist()]
        index = self.index[ids].astype(np.int64)
        keys = np.char.decode(self.cache.read(KEY, ids), "utf-8").tolist()
        if self.export is not None:  # the export's copy, at its manifest position and key
            per = self.export["per_shard"]
            where = self.export["position"][ids]
            shards = [str(self.export["dir"] / f"{p // per:05d}.tar") for p in where.tolist()]
            index = where % per
            keys = [sample_key(p) for p in where.tolist()]
        samples = [_read(shards[p], int(index[p]), keys[p]) for p in range(own.start, own.stop)]
        return SuperBatch(
            step=step,
            ids=ids,
            ref_img=torch.from_numpy(self.cache.read(REF_IMG, ids)),
            ref_txt=torch.from_numpy(self.cache.read(REF_TXT, ids)),
            own=own,
            samples=self.transform(samples) if self.transform else samples,
            shards=shards,
            index=index,
            keys=keys,
        )

    def __iter__(self) -> Iterator[SuperBatch]:
        worker, workers = this_worker()
        for step in self.steps[worker::workers]:
            yield self.super_batch_at(step)


class OnlineSelector:
    """Chooses b of each super-batch jointly, from cached reference embeddings and the
    learner's current ones, exactly as `select --method jest` does from two score sets.

    options: b and jest's sampler, as select's options (`select --batch-size/--score/
    --sampler/--chunks/--temperature/--topk/--sweeps/--pool`); the criterion defaults to
    learnability, which needs the learner's embeddings at every `select`.
    seed: as `select --seed`.
    """

    def __init__(
        self,
        reference: ScoreSet,
        options: SamplerOptions,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(options, SamplerOptions):
            raise TypeError(
                "OnlineSelector(reference, options, seed=0, device='cpu') takes a SamplerOptions "
                f"(jestcurate.online.SamplerOptions(batch_size, ratio, ...)), not {options!r}"
            )
        self.reference = reference
        # Online, the learner is the model being trained: its embeddings are always expected,
        # and their absence is a bug to report, not a cue to fall back to easy-ref.
        self.options = options.with_criterion("learnability") if not options.criterion else options
        self.device = torch.device(device)
        # On the CPU whatever the device: the same draws everywhere, as in select.
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def select(
        self,
        ref_img: torch.Tensor,
        ref_txt: torch.Tensor,
        learner_img: torch.Tensor | None,
        learner_txt: torch.Tensor | None,
        learner_scale: float | None = None,
        learner_bias: float | None = None,
        learner_loss: str | None = None,
    ) -> torch.Tensor:
        """Indices (into the super-batch, in pick order) of the b examples to train on.
        Learner embeddings need not be normalised; `learner_scale` is the learner's
        exp(logit_scale), `learner_bias` its logit bias (sigmoid models)."""
        ref = Embeddings(
            _unit(ref_img, self.device),
            _unit(ref_txt, self.device),
            self.reference.scale,
            self.reference.bias,
            self.reference.kind,
        )
        learner = None
        if learner_img is not None and learner_txt is not None:
            if learner_scale is None:
                raise JCError("learner_scale is needed with learner embeddings")
            kind = learner_loss or ("sigmoid" if learner_bias is not None else "softmax")
            learner = Embeddings(
                _unit(learner_img, self.device),
                _unit(learner_txt, self.device),
                float(learner_scale),
                None if learner_bias is None else float(learner_bias),
                kind,
            )
        models = 2 if learner is not None else 1
        fits = row_cache_fits(self.options.batch_size, len(ref.img), models, self.device)
        picked, _ = select_batch(self.options, ref, learner, self.generator, cache_rows=fits)
        self.steps += 1
        return picked

    def rank_slice(
        self, picked: torch.Tensor, rank: int | None = None, world_size: int | None = None
    ) -> torch.Tensor:
        """This rank's b / world_size of the picks; the ranks' slices cover every pick once."""
        default_rank, default_world = _distributed()
        rank = default_rank if rank is None else rank
        world = default_world if world_size is None else world_size
        share = len(picked) // world
        return picked[rank * share : (rank + 1) * share]


def _read(shard: str, index: int, key: str) -> Sample:
    """Sample `index` of a source shard, checked against the key the score set recorded: the
    reference embeddings are joined to samples by position, so a changed shard must fail."""
    sample = _index(shard).read(index)
    if sample["__key__"] != key:
        raise JCError(
            f"{shard} changed since it was scored: sample {index} has key "
            f"{sample['__key__']!r}, the score set says {key!r}"
        )
    return sample


def _unit(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device).float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (all_gather); the tensor itself when not
    distributed. For the learner embeddings of the ranks' shares of a super-batch."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@dataclass
class ComputeLedger:
    """Forward passes counted in samples, to put online JEST's extra cost beside its gains.
    One training step costs about 3 forward passes per sample (forward and backward)."""

    reference_samples: int = 0  # scored once, offline, by `jestcurate score`
    scoring_forwards: int = 0  # learner forward passes over super-batches (no gradient)
    training_samples: int = 0  # samples trained on
    steps: int = 0

    def step(self, super_batch: int, batch: int, scoring_cost: float = 1.0) -> None:
        """Record one step: `scoring_cost` is the learner's relative cost per scored sample
        (below 1 for a cheaper pass, e.g. at lower resolution)."""
        self.scoring_forwards += round(super_batch * scoring_cost)
        self.training_samples += batch
        self.steps += 1

    def summary(self, steps_total: int | None = None) -> dict[str, float]:
        """Costs in units of one forward pass of one sample; the reference cost amortised over
        `steps_total` steps (default: the steps recorded)."""
        steps = steps_total or max(self.steps, 1)
        training = 3.0 * self.training_samples
        return {
            "steps": self.steps,
            "training_forward_equivalents": training,
            "scoring_forwards": float(self.scoring_forwards),
            "reference_forwards_amortised": self.reference_samples * self.steps / steps,
            "total_with_scoring": training + self.scoring_forwards,
            "scoring_overhead": self.scoring_forwards / max(training, 1.0),
        }


@contextlib.contextmanager
def lower_resolution(model: torch.nn.Module, image_size: int) -> Iterator[None]:
    """Let an open_clip ViT embed images of `image_size` pixels (a multiple of its patch size)
    by resampling its position embeddings to the smaller grid for the duration of the block:
    a cheaper learner pass for scoring super-batches, in the spirit of the paper's Flexi-JEST.
    Use it under torch.no_grad(); the model's own weights are restored afterwards."""
    visual = getattr(model, "visual", model)
    original = getattr(visual, "positional_embedding", None)
    patch = getattr(visual, "patch_size", None)
    if original is None or patch is None:
        raise JCError("lower_resolution needs an open_clip VisionTransformer")
    patch = patch[0] if isinstance(patch, tuple | list) else patch
    if image_size % patch:
        raise JCError(f"image size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    tokens = original[1:]
    side = math.isqrt(len(tokens))
    resized = torch.nn.functional.interpolate(
        tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2),
        size=(grid, grid),
        mode="bicubic",
        align_corners=False,
    )
    resized = resized.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    visual._parameters["positional_embedding"] = torch.nn.Parameter(
        torch.cat([original[:1], resized]), requires_grad=False
    )
    try:
        yield
    finally:
        visual._parameters["positional_embedding"] = original


def downsample(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Preprocessed (N, 3, H, W) images resized to image_size (antialiased bilinear)."""
    return torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
