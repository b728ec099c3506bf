"""`jestcurate train`: train a small open_clip model contrastively on WebDataset shards.

For a reference (trained on a clean guide set) or a proxy learner (a slice of the raw pool).
open_clip supplies the model, its training transform, the tokenizer, the losses (ClipLoss for
CLIP-style models, SigLipLoss for models with a logit bias) and open_clip_train's cosine
schedule; webdataset supplies the shuffle and batching stages; the samples come from
jestcurate's own reader, so remote URLs and damaged shards behave as in `score`.

Outputs: CKPT ({"state_dict": ...}, which `score --pretrained` and open_clip's
create_model_and_transforms(..., pretrained=CKPT) both load), CKPT.json (what was trained on
what) and, while training, CKPT.resume.pt (model, optimizer and step, every --save-every steps)
from which a rerun continues.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
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


def batches(
    urls: list[str],
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Any,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    stats: Counter[str],
) -> Any:
    """One epoch of shuffled (images, tokens) batches; full batches only."""
    import webdataset as wds

    def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([preprocess(s["image"]) for s in samples])
        return images, tokenizer([s["caption"] for s in samples])

    return wds.DataPipeline(
        wds.SimpleShardList(urls, seed=seed),
        wds.split_by_worker,
        lambda src: _samples(src, stats),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
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


def run(cfg: TrainConfig, on_step: Callable[[int, int, float], None] | None = None) -> TrainReport:
    """Train, saving resume state every cfg.save_every steps; rerunning a finished run is a
    no-op and rerunning an interrupted one continues from its last save."""
    _validate(cfg)
    info_path = _info_path(cfg.out)
    if cfg.out.exists():
        info = read_json(info_path) if info_path.exists() else {}
        if info.get("config") == cfg.identity():
            log.info("%s is already trained with these settings", cfg.out)
            return TrainReport(
                cfg.out, info["steps"], info["epochs"], info["samples"], info["final_loss"],
                0.0, 0, info["data"]["skipped"], already_done=True,
            )  # fmt: skip
        raise JCError(
            f"{cfg.out} exists and was not trained with these settings; use another --out"
        )
    urls = expand_inputs(cfg.inputs)
    if cfg.steps is not None:
        enough = count_samples(urls, stop_at=cfg.batch_size) >= cfg.batch_size
        steps_total = cfg.steps if enough else 0
    else:
        per_epoch = count_samples(urls) // cfg.batch_size
        steps_total = (cfg.epochs or 1) * per_epoch
        log.info("%d full batches per epoch: %d steps", per_epoch, steps_total)
    if steps_total < 1:
        raise JCError(f"the inputs hold less than one batch of {cfg.batch_size} samples")
    resolved = resolve_spec(
        ModelSpec(cfg.model, cfg.pretrained, cfg.device, cfg.precision, init_seed=cfg.seed)
    )
    torch.manual_seed(cfg.seed)
    model = load_model(resolved, warn_random=False)
    if cfg.pretrained is None:
        log.info("training %s from scratch (initial weights from seed %d)", resolved.name, cfg.seed)
    trainer = Trainer(model, cfg.lr, cfg.weight_decay, cfg.warmup, steps_total)
    net, optimizer = trainer.net, trainer.optimizer
    preprocess = model.train_transform()

    step = epoch = samples = 0
    resume = _resume_path(cfg.out)
    if resume.exists():
        try:
            state = torch.load(resume, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: say so rather than guess
            raise JCError(f"cannot resume from {resume}: {exc}; delete it to start over") from None
        if state.get("config") != cfg.identity():
            raise JCError(
                f"{resume} was saved by a run with other settings; delete it or match them"
            )
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, samples = state["step"], state["epoch"], state["samples"]
        log.info("resuming %s from step %d", cfg.out, step)
    resumed_from = step

    def save_resume() -> None:
        state = {
            "state_dict": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "samples": samples,
            "config": cfg.identity(),
        }
        atomic_write(resume, lambda tmp: torch.save(state, tmp))

    stats: Counter[str] = Counter()
    last_loss = math.nan
    began = time.time()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    while step < steps_total:
        stream = batches(
            urls, preprocess, model.tokenizer, cfg.batch_size, cfg.shuffle_buffer,
            cfg.seed + epoch, stats,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.workers,
            pin_memory=model.device.type == "cuda",
            worker_init_fn=_worker_init,  # SIGTERM ends a worker at once; the main cleans up
        )
        produced = 0
        for images, tokens in loader:
            last_loss = trainer.step(step, images, tokens)
            step += 1
            produced += 1
            samples += len(images)
            if on_step:
                on_step(step, steps_total, last_loss)
            if step % cfg.save_every == 0:
                save_resume()
            if step >= steps_total:
                break
        epoch += 1
        if produced == 0:
            found = ", ".join(f"{k}: {v}" for k, v in stats.most_common()) or "no samples"
            raise JCError(
                f"not one full batch of {cfg.batch_size} valid samples in the inputs ({found})"
            )

    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_write(cfg.out, lambda tmp: torch.save({"state_dict": state_dict}, tmp))
    skipped = {k: v for k, v in stats.items() if k != "ok"}
    info = {
        "model": resolved.name,
        "model_config_sha256": resolved.config_sha256,
        "init": cfg.pretrained,
        "data": {"inputs": list(cfg.inputs), "shards": len(urls), "skipped": skipped},
        "steps": step,
        "epochs": epoch,
        "samples": samples,
        "final_loss": last_loss,
        "loss": model.loss_kind,
        "config": cfg.identity(),
        "tool_version": __version__,
    }
    write_json_atomic(info_path, info)
    resume.unlink(missing_ok=True)
    return TrainReport(
        cfg.out, step, epoch, samples, last_loss, time.time() - began, resumed_from, skipped
    )


def _worker_init(worker_id: int) -> None:
    default_sigterm()
