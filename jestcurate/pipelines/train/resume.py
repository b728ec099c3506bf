"""What a rerun finds: a finished checkpoint's record (CKPT.json), or the resume file
(CKPT.resume.pt) holding the model, optimizer, loss scaler, RNG and position of an interrupted
run, from which it continues as the uninterrupted run would."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jestcurate.errors import JCError
from jestcurate.io.files import atomic_write, read_json
from jestcurate.pipelines.train.config import TrainConfig, TrainReport
from jestcurate.pipelines.train.trainer import Trainer

log = logging.getLogger(__name__)


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume.pt")


def record_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


@dataclass
class Position:
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


def already_trained(cfg: TrainConfig) -> TrainReport | None:
    info_path = record_path(cfg.out)
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


def save_resume(path: Path, cfg: TrainConfig, trainer: Trainer, pos: Position) -> None:
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


def load_resume(path: Path, cfg: TrainConfig, trainer: Trainer) -> Position:
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
    pos = Position(state["step"], state["epoch"], state["samples"], epoch_step=state["step"])
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
