"""`jestcurate train`: train a small open_clip model contrastively on WebDataset shards.

For a reference (trained on a clean guide set) or a proxy learner (a slice of the raw pool).
open_clip supplies the model, its training transform, the tokenizer, the losses (ClipLoss for
CLIP-style models, SigLipLoss for models with a logit bias) and open_clip_train's cosine
schedule; webdataset supplies the shuffle and batching stages; the samples come from
jestcurate's own reader, so remote URLs and damaged shards behave as in `score`.

Outputs: CKPT ({"state_dict": ...}, which `score --pretrained` and open_clip's
create_model_and_transforms(..., pretrained=CKPT) both load), CKPT.json (what was trained on
what) and, while training, CKPT.resume.pt, every --save-every steps, from which a rerun
continues.

A rerun after an interruption trains as the uninterrupted run would (bit for bit on a CPU,
tested): CKPT.resume.pt holds the model, the optimizer, the fp16 loss scaler, the main process's
RNG (training's own, e.g. dropout), the step and the step at which the current epoch began. An
epoch's data order and augmentation follow from (--seed, epoch) alone, so the rerun rebuilds
the epoch's stream and passes over the batches already trained on. The augmentation draws from
an RNG of its own (the worker's, or with --workers 0 a private one), which leaves the main RNG
to training and makes --workers 0 and 1 train alike. CKPT.json's "resumed_from" lists the
steps a run was resumed from and whether each resume was exact: one from an older jestcurate's
resume file, or with another --workers above 1, is not (a warning says why).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from jestcurate import __version__
from jestcurate.errors import JCError, default_sigterm
from jestcurate.io.reader import (
    IMAGE_EXTS,
    ShardReadError,
    error_reason,
    iter_raw_samples,
    parse_sample,
)
from jestcurate.io.shards import expand_inputs, open_shard
from jestcurate.io.store import atomic_write, read_json, write_json_atomic
from jestcurate.model.openclip import LoadedModel, ModelSpec, load_model, resolve_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    inputs: tuple[str, ...]
    out: Path
    model: str
    pretrained: str | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    device: str = "auto"
    precision: str | None = None
    workers: int = 1
    seed: int = 0
    save_every: int = 100
    shuffle_buffer: int = 2000

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the resume file."""
        fields = asdict(self)
        for volatile in ("out", "device", "workers", "save_every"):
            fields.pop(volatile)
        fields["inputs"] = list(self.inputs)
        return fields


def _validate(cfg: TrainConfig) -> None:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise JCError("give exactly one of --steps and --epochs")
    if (cfg.steps or cfg.epochs or 0) < 1:
        raise JCError("--steps / --epochs must be at least 1")
    if cfg.batch_size < 2:
        raise JCError("--batch-size must be at least 2 (contrastive losses need negatives)")
    if cfg.lr <= 0:
        raise JCError("--lr must be positive")
    if cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} is a directory; give the checkpoint file to write")


def _samples(urls: Iterator[dict[str, Any]], stats: Counter[str]) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: shard urls in, valid (image, caption) samples out. Bad
    samples and shards are counted, never fatal."""
    for item in urls:
        url = item["url"]
        seen: set[str] = set()
        try:
            with open_shard(url) as f:
                for raw in iter_raw_samples(f):
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
        lambda src: _samples(src, stats),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        lambda src: _with_counts(src, stats),
    )


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # As open_clip_train: no weight decay on gains, biases, norms and the logit scale/bias.
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit" in name
        (rest if exclude else decay).append(p)
    groups = [
        {"params": rest, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


class Trainer:
    """One optimizer step at a time on an open_clip model, as open_clip_train does it: AdamW
    without decay on gains and biases, cosine schedule with warm-up, the model's own loss,
    autocast, and the logit scale clamped to 100."""

    def __init__(
        self, model: LoadedModel, lr: float, weight_decay: float, warmup: int, total_steps: int
    ) -> None:
        from open_clip_train.scheduler import cosine_lr

        self.model = model
        self.net = model.model.train()
        self.loss_fn = _loss_fn(model)
        self.optimizer = _optimizer(self.net, lr, weight_decay)
        fp16_on_cuda = model.precision == "fp16" and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(enabled=fp16_on_cuda)
        # Warm-up never takes more than a fifth of a short run.
        warmup = min(warmup, max(1, total_steps // 5))
        self.schedule = cosine_lr(self.optimizer, lr, warmup, total_steps)

    def step(self, step: int, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """Train on one batch as step number `step` (0-based); returns the loss."""
        self.schedule(step)
        images = images.to(self.model.device, non_blocking=True)
        tokens = tokens.to(self.model.device, non_blocking=True)
        with self.model.autocast():
            loss = self.loss_fn(*self.net(images, tokens))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, math.log(100))
        return float(loss.detach())


def _loss_fn(model: LoadedModel) -> torch.nn.Module:
    from open_clip.loss import ClipLoss, SigLipLoss

    return SigLipLoss() if model.loss_kind == "sigmoid" else ClipLoss()


@dataclass
class TrainReport:
    out: Path
    steps: int
    epochs: int
    samples: int
    final_loss: float
    seconds: float
    resumed_from: int
    skipped: dict[str, int]
    already_done: bool = False


def _resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume.pt")


def _info_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


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


@dataclass
class _Position:
    """Where a run stands; what the resume file holds besides the model and optimizer state."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    epoch_step: int = 0  # the step at which the current epoch began
    stats: Counter[str] = field(default_factory=Counter)  # sample counts before this epoch
    skip: int = 0  # batches of the current epoch trained on before a resume
    resumed_from: list[dict[str, Any]] = field(default_factory=list)

    def end_epoch(self, counts: dict[int, dict[str, int]]) -> None:
        for worker_counts in counts.values():
            self.stats.update(worker_counts)
        self.epoch += 1
        self.epoch_step = self.step
        self.skip = 0


def _already_trained(cfg: TrainConfig) -> TrainReport | None:
    info_path = _info_path(cfg.out)
    if not cfg.out.exists():
        return None
    info = read_json(info_path) if info_path.exists() else {}
    if info.get("config") == cfg.identity():
        log.info("%s is already trained with these settings", cfg.out)
        return TrainReport(
            cfg.out, info["steps"], info["epochs"], info["samples"], info["final_loss"],
            0.0, 0, info["data"]["skipped"], already_done=True,
        )  # fmt: skip
    raise JCError(f"{cfg.out} exists and was not trained with these settings; use another --out")


def _count_steps(cfg: TrainConfig, urls: list[str]) -> int:
    if cfg.steps is not None:
        enough = count_samples(urls, stop_at=cfg.batch_size) >= cfg.batch_size
        steps_total = cfg.steps if enough else 0
    else:
        per_epoch = count_samples(urls) // cfg.batch_size
        steps_total = (cfg.epochs or 1) * per_epoch
        log.info("%d full batches per epoch: %d steps", per_epoch, steps_total)
    if steps_total < 1:
        raise JCError(f"the inputs hold less than one batch of {cfg.batch_size} samples")
    return steps_total


def _save_resume(path: Path, cfg: TrainConfig, trainer: Trainer, pos: _Position) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if trainer.model.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.model.device)
    state = {
        "state_dict": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng,
        "step": pos.step,
        "epoch": pos.epoch,
        "samples": pos.samples,
        "epoch_step": pos.epoch_step,
        "epoch_stats": dict(pos.stats),
        "resumed_from": pos.resumed_from,
        "workers": cfg.workers,
        "config": cfg.identity(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_resume(path: Path, cfg: TrainConfig, trainer: Trainer) -> _Position:
    """Restore the model, optimizer, scaler and RNG from `path` and return the position, with
    the batches of the current epoch to pass over; warn where the rerun cannot be exact."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say so rather than guess
        raise JCError(f"cannot resume from {path}: {exc}; delete it to start over") from None
    if state.get("config") != cfg.identity():
        raise JCError(f"{path} was saved by a run with other settings; delete it or match them")
    trainer.net.load_state_dict(state["state_dict"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    pos = _Position(state["step"], state["epoch"], state["samples"], epoch_step=state["step"])
    pos.resumed_from = list(state.get("resumed_from", []))
    why = []
    if "epoch_step" in state:
        pos.epoch_step, pos.stats = state["epoch_step"], Counter(state["epoch_stats"])
        pos.skip = pos.step - pos.epoch_step
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and trainer.model.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], trainer.model.device)
    else:
        why.append(
            f"it was saved by an older jestcurate, so epoch {pos.epoch}'s data starts again from "
            "its beginning, with other augmentations, and earlier skipped-sample counts are lost"
        )
    if trainer.scaler.is_enabled():
        if state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        else:
            why.append("it holds no fp16 loss-scaler state, so the loss scale starts afresh")
    saved_workers = state.get("workers", cfg.workers)
    if max(saved_workers, 1) != max(cfg.workers, 1):
        why.append(f"it was saved with --workers {saved_workers}, which orders batches otherwise")
    resumed: dict[str, Any] = {"step": pos.step, "exact": not why}
    if why:
        resumed["why"] = "; ".join(why)
        log.warning("resuming %s from step %d, not exactly: %s", cfg.out, pos.step, resumed["why"])
    else:
        log.info("resuming %s from step %d (epoch %d, batch %d)", cfg.out, pos.step, pos.epoch,
                 pos.skip)  # fmt: skip
    pos.resumed_from.append(resumed)
    return pos


def _loader(
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


def _train(
    cfg: TrainConfig,
    trainer: Trainer,
    loader: Callable[[int], Any],
    pos: _Position,
    steps_total: int,
    on_step: Callable[[int, int, float], None] | None,
    save: Callable[[], None],
) -> float:
    """Train from `pos` to `steps_total`, epoch after epoch, passing over the first `pos.skip`
    batches (trained on before a resume); returns the last loss."""
    last_loss = math.nan
    while pos.step < steps_total:
        counts: dict[int, dict[str, int]] = {}  # this epoch's, by worker
        batches_seen = 0
        for images, tokens, (worker, worker_counts) in loader(pos.epoch):
            counts[worker] = worker_counts
            if images is None:  # a worker's end of the epoch
                continue
            batches_seen += 1
            if batches_seen <= pos.skip:
                continue
            last_loss = trainer.step(pos.step, images, tokens)
            pos.step += 1
            pos.samples += len(images)
            if on_step:
                on_step(pos.step, steps_total, last_loss)
            if pos.step % cfg.save_every == 0:
                save()
            if pos.step >= steps_total:
                break
        pos.end_epoch(counts)
        if batches_seen == 0:
            found = ", ".join(f"{k}: {v}" for k, v in pos.stats.most_common()) or "no samples"
            raise JCError(
                f"not one full batch of {cfg.batch_size} valid samples in the inputs ({found})"
            )
    return last_loss


def run(cfg: TrainConfig, on_step: Callable[[int, int, float], None] | None = None) -> TrainReport:
    """Train, saving resume state every cfg.save_every steps; rerunning a finished run is a
    no-op and rerunning an interrupted one continues from its last save as if uninterrupted."""
    _validate(cfg)
    done = _already_trained(cfg)
    if done is not None:
        return done
    urls = expand_inputs(cfg.inputs)
    steps_total = _count_steps(cfg, urls)
    resolved = resolve_spec(
        ModelSpec(cfg.model, cfg.pretrained, cfg.device, cfg.precision, init_seed=cfg.seed)
    )
    torch.manual_seed(cfg.seed)
    # Fine-tuning a CLIP checkpoint as a SigLIP (open_clip's own path) starts the bias at 0.
    model = load_model(resolved, warn_random=False, allow_new_bias=True)
    if cfg.pretrained is None:
        log.info("training %s from scratch (initial weights from seed %d)", resolved.name, cfg.seed)
    trainer = Trainer(model, cfg.lr, cfg.weight_decay, cfg.warmup, steps_total)
    preprocess = model.train_transform()
    resume = _resume_path(cfg.out)
    pos = _load_resume(resume, cfg, trainer) if resume.exists() else _Position()
    resumed_from = pos.step

    began = time.time()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    last_loss = _train(
        cfg, trainer, lambda epoch: _loader(cfg, urls, model, preprocess, epoch), pos,
        steps_total, on_step, lambda: _save_resume(resume, cfg, trainer, pos),
    )  # fmt: skip

    state_dict = {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()}
    atomic_write(cfg.out, lambda tmp: torch.save({"state_dict": state_dict}, tmp))
    skipped = {k: v for k, v in pos.stats.items() if k != "ok"}
    info = {
        "model": resolved.name,
        "model_config_sha256": resolved.config_sha256,
        "init": cfg.pretrained,
        "data": {"inputs": list(cfg.inputs), "shards": len(urls), "skipped": skipped},
        "steps": pos.step,
        "epochs": pos.epoch,
        "samples": pos.samples,
        "final_loss": last_loss,
        "loss": model.loss_kind,
        "config": cfg.identity(),
        "resumed_from": pos.resumed_from,
        "tool_version": __version__,
    }
    write_json_atomic(_info_path(cfg.out), info)
    resume.unlink(missing_ok=True)
    return TrainReport(
        cfg.out, pos.step, pos.epoch, pos.samples, last_loss, time.time() - began, resumed_from,
        skipped,
    )  # fmt: skip


def _worker_init(seed: int, worker_id: int) -> None:
    default_sigterm()
    torch.manual_seed(_augment_seed(seed, worker_id))
