"""score's encoding: chunks packed into model batches, then each shard's part and marker."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from jestcurate import __version__
from jestcurate.io.reader import error_reason
from jestcurate.io.shards import Shard
from jestcurate.io.store import part_table
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.math.scoring import clip_scores, example_losses
from jestcurate.model.openclip import LoadedModel
from jestcurate.pipelines.score.stream import Chunk
from jestcurate.scale.claims import Claims


@dataclass
class ShardResult:
    name: str
    shard: str
    status: str  # "ok" | "failed"
    error: str | None
    samples: int
    ok: int
    errors: int
    error_reasons: dict[str, int]
    seconds: float
    input_bytes: int | None
    part: dict[str, Any] = field(default_factory=dict)  # part_bytes, part_sha256

    def marker(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "name": self.name,
            "status": self.status,
            "error": self.error,
            "counts": {"samples": self.samples, "ok": self.ok, "errors": self.errors},
            "error_reasons": self.error_reasons,
            "seconds": round(self.seconds, 3),
            "input_bytes": self.input_bytes,
            **self.part,
            "tool_version": __version__,
        }


@dataclass
class Pending:
    """A shard whose chunks are still arriving; its embeddings stay on the model's device."""

    started: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    img: list[torch.Tensor] = field(default_factory=list)
    txt: list[torch.Tensor] = field(default_factory=list)
    waiting: int = 0  # samples queued for encoding but not yet encoded
    last: Chunk | None = None  # the shard's last chunk, once it has arrived

    @property
    def complete(self) -> bool:
        return self.last is not None and self.waiting == 0


class Encoder:
    """Packs the valid samples of incoming chunks, whatever their shard, into full model
    batches, so short shards and shard ends do not leave the device with small batches."""

    def __init__(self, model: LoadedModel, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.queue: list[tuple[Pending, torch.Tensor, torch.Tensor]] = []
        self.queued = 0

    def add(self, state: Pending, images: torch.Tensor, tokens: torch.Tensor) -> None:
        device = self.model.device
        # Copy now: the chunk is in pinned memory, so this overlaps with the work below.
        images = images.to(device, non_blocking=True)
        tokens = tokens.to(device, non_blocking=True)
        self.queue.append((state, images, tokens))
        self.queued += len(images)
        state.waiting += len(images)
        while self.queued >= self.batch_size:
            self._encode_one_batch()

    def flush(self) -> None:
        while self.queue:
            self._encode_one_batch()

    def _encode_one_batch(self) -> None:
        parts: list[tuple[Pending, torch.Tensor, torch.Tensor]] = []
        taken = 0
        while self.queue and taken < self.batch_size:
            state, images, tokens = self.queue[0]
            room = min(len(images), self.batch_size - taken)
            parts.append((state, images[:room], tokens[:room]))
            if room == len(images):
                self.queue.pop(0)
            else:
                self.queue[0] = (state, images[room:], tokens[room:])
            taken += room
        img = self.model.encode_image(torch.cat([p[1] for p in parts]))
        txt = self.model.encode_text(torch.cat([p[2] for p in parts]))
        start = 0
        for state, images, _ in parts:
            end = start + len(images)
            state.img.append(img[start:end])
            state.txt.append(txt[start:end])
            state.waiting -= len(images)
            start = end
        self.queued -= taken


class Scorer:
    """Turns one shard's rows and embeddings into its part file and completion marker."""

    def __init__(
        self,
        model: LoadedModel,
        writer: ScoreSetWriter,
        claims: Claims | None = None,
    ) -> None:
        self.model = model
        self.writer = writer
        self.claims = claims
        self.dim = model.embed_dim
        self.scale = model.logit_scale
        self.bias = model.logit_bias
        self.kind = model.loss_kind

    def finish(self, shard: Shard, state: Pending) -> ShardResult:
        dim, device = self.dim, self.model.device
        img = torch.cat(state.img) if state.img else torch.empty(0, dim, device=device)
        txt = torch.cat(state.txt) if state.txt else torch.empty(0, dim, device=device)
        # Scores come from the stored float16 values, so anyone can recompute them from the part.
        img16, txt16 = img.half(), txt.half()
        clip = clip_scores(img16, txt16)
        loss = example_losses(img16, txt16, self.scale, self.bias, self.kind)
        table = part_table(
            shard.url,
            state.rows,
            img16.cpu().numpy(),
            txt16.cpu().numpy(),
            clip.cpu().numpy(),
            loss.cpu().numpy(),
            dim,
        )
        part = self.writer.write_part(shard.name, table)
        reasons = Counter(error_reason(r["error"]) for r in state.rows if r["status"] != "ok")
        failure = state.last.failure if state.last else None
        result = ShardResult(
            name=shard.name,
            shard=shard.url,
            status="failed" if failure else "ok",
            error=failure,
            samples=len(state.rows),
            ok=len(state.rows) - sum(reasons.values()),
            errors=sum(reasons.values()),
            error_reasons=dict(sorted(reasons.items())),
            seconds=time.time() - state.started,
            input_bytes=state.last.size if state.last else None,
            part=part,
        )
        # The marker comes last: a crash before it leaves the shard to be redone.
        self.writer.mark(shard.name, result.marker())  # with a mirror: the part, then the marker
        if self.claims is not None:
            self.claims.release(shard.name)
        return result
