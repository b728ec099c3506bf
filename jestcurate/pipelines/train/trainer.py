"""One optimizer step at a time, as open_clip_train takes it."""

from __future__ import annotations

import math

import torch

from jestcurate.model.openclip import LoadedModel


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
