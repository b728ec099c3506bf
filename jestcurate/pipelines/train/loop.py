"""The training loop: check the options, count the steps, load the model, resume or start, train
epoch after epoch, then write the checkpoint and its record."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.files import atomic_write, write_json_atomic
from jestcurate.io.shards import expand_inputs
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines.train.config import TrainConfig, TrainReport
from jestcurate.pipelines.train.resume import (
    Position,
    already_trained,
    load_resume,
    record_path,
    resume_path,
    save_resume,
)
from jestcurate.pipelines.train.stream import count_samples, epoch_loader
from jestcurate.pipelines.train.trainer import Trainer

log = logging.getLogger(__name__)


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


def _train(
    cfg: TrainConfig,
    trainer: Trainer,
    loader: Callable[[int], Any],
    pos: Position,
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
    done = already_trained(cfg)
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
    resume = resume_path(cfg.out)
    pos = load_resume(resume, cfg, trainer) if resume.exists() else Position()
    resumed_from = pos.step

    began = time.time()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    last_loss = _train(
        cfg, trainer, lambda epoch: epoch_loader(cfg, urls, model, preprocess, epoch), pos,
        steps_total, on_step, lambda: save_resume(resume, cfg, trainer, pos),
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
    write_json_atomic(record_path(cfg.out), info)
    resume.unlink(missing_ok=True)
    return TrainReport(
        cfg.out, pos.step, pos.epoch, pos.samples, last_loss, time.time() - began, resumed_from,
        skipped,
    )  # fmt: skip


def print_summary(report: TrainReport) -> None:
    """What `jestcurate train` prints once done: the steps, samples, time and final loss."""
    if report.already_done:
        ui.stdout.print(f"{report.out} is already trained ({report.steps} steps); nothing to do")
        return
    ui.say(
        f"trained {report.steps} steps ({report.samples:,} samples) in {report.seconds:.0f} s, "
        f"final loss {report.final_loss:.4f}: {report.out}",
    )
