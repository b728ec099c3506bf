"""score's run: the plan, the model and the score set's meta.json, then passes over the shards
until every one is settled."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from jestcurate import __version__
from jestcurate.io.shards import Shard
from jestcurate.io.store import (
    META_NAME,
    SCHEMA_VERSION,
    marker_settles,
)
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.model.openclip import LoadedModel, ModelSpec, ResolvedSpec, load_model, resolve_spec
from jestcurate.pipelines.score.cpu import DEFAULT_BATCH, CpuThreads, default_workers, nice_workers
from jestcurate.pipelines.score.decoding import Decoding, choose_decoding, planned_decoder
from jestcurate.pipelines.score.encode import Encoder, Pending, Scorer
from jestcurate.pipelines.score.plan import ScoreConfig, open_mirror, plan_shards, validate
from jestcurate.pipelines.score.progress import NoProgress, Progress, ScoreReport
from jestcurate.pipelines.score.stream import Chunk, ShardStream, chunk_size
from jestcurate.scale.claims import Claims, Owner

log = logging.getLogger(__name__)


def run(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreReport:
    """Score every shard of this task that has no ok marker yet. Safe to rerun and to run as
    several concurrent tasks on the same output."""
    progress = progress or NoProgress()
    validate(cfg)
    began = time.time()
    writer = ScoreSetWriter(cfg.out, open_mirror(cfg))
    plan = plan_shards(cfg, writer)
    resolved = resolve_spec(
        ModelSpec(cfg.model, cfg.pretrained, cfg.device, cfg.precision, cfg.init_seed)
    )
    decoder = planned_decoder(cfg.decode, resolved.device, cfg.out)
    batch_size = cfg.batch_size or DEFAULT_BATCH.get(resolved.device.type, 64)
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    # Cheap refusal before any weights load: a mismatched DIR fails in seconds, not minutes.
    writer.check(_identity(cfg, resolved, decoder))
    report = ScoreReport(
        out=cfg.upload_to or cfg.out,
        task_index=plan.task_index,
        num_tasks=plan.num_tasks,
        shards_in_task=len(plan.mine),
        skipped=len(plan.mine) - len(plan.todo),
        device=str(resolved.device),
    )
    progress.start(len(plan.mine), report.skipped)
    if not plan.todo and (cfg.out / META_NAME).is_file():
        report.seconds = time.time() - began
        return report

    model = load_model(resolved)
    workers = default_workers(model.device.type) if cfg.workers is None else cfg.workers
    decoding = choose_decoding(cfg.decode, decoder, model, workers)
    if decoding.name != decoder:  # auto fell back to PIL
        writer.check(_identity(cfg, resolved, decoding.name))
    writer.open(_meta(cfg, _identity(cfg, resolved, decoding.name), model))
    if plan.todo:  # else only meta.json was missing: written again from the model, as it was
        claims = Claims(cfg.out, Owner.this_process(), cfg.lease)
        scoring = _Scoring(cfg, model, decoding, workers, claims, report, progress, began, writer)
        with claims.heartbeat():
            scoring.until_settled(plan.mine)
    report.seconds = time.time() - began
    return report


def _identity(cfg: ScoreConfig, resolved: ResolvedSpec, decoder: str) -> dict[str, Any]:
    """What an existing score set's meta.json must agree with for this run to add to it."""
    identity = {"schema_version": SCHEMA_VERSION, "role": cfg.role, **resolved.identity()}
    if decoder != "pil":  # absent means PIL, as in every score set made before the option
        identity["decode"] = decoder
    return identity


def _meta(cfg: ScoreConfig, identity: dict[str, Any], model: LoadedModel) -> dict[str, Any]:
    """The score set's meta.json: its identity and what the model says of itself."""
    return {
        **identity,
        **model.describe(),
        "role": cfg.role,
        "ref_loss": f"{model.loss_kind}, other valid samples of the shard as negatives, "
        "size-normalised (docs/scores.md)",
        "tool": "jestcurate",
        "tool_version": __version__,
    }


@dataclass
class _Scoring:
    """A run's passes over its shards, and what they share."""

    cfg: ScoreConfig  # batch_size settled for the device
    model: LoadedModel
    decoding: Decoding
    workers: int  # decoding processes (a pass starts at most one per shard)
    claims: Claims
    report: ScoreReport
    progress: Progress
    began: float
    writer: ScoreSetWriter
    attempted: set[str] = field(default_factory=set)  # shards this run finished or failed

    def until_settled(self, mine: list[Shard]) -> None:
        """Score this task's unsettled shards in passes. Shards that other live runs hold are
        skipped, then waited for: the run ends when every shard is settled, by it or by others,
        and a claim whose owner died is taken over in the next pass."""
        first: set[str] | None = None
        last_note = 0.0
        while True:
            todo = [
                s
                for s in mine
                if s.name not in self.attempted
                and not marker_settles(self.cfg.out, s.name, self.began)
            ]
            if first is None:
                first = {s.name for s in todo}
            if not todo:
                break
            held = {s.name: c for s in todo if (c := self.claims.held_by_other(s.name)) is not None}
            free = [s for s in todo if s.name not in held]
            if free:
                self.one_pass(free)
                continue
            if time.time() - last_note > 60:
                owners = sorted({f"{c.get('host')}:{c.get('pid')}" for c in held.values()})
                log.info(
                    "waiting for %d shard(s) that other runs are scoring (%s)",
                    len(held),
                    ", ".join(owners[:3]) + (" ..." if len(owners) > 3 else ""),
                )
                last_note = time.time()
            time.sleep(self.cfg.poll)
        self.report.by_others = len((first or set()) - self.attempted)

    def one_pass(self, todo: list[Shard]) -> None:
        """One DataLoader pass over `todo`; each shard is claimed by the worker that reads it."""
        workers = min(self.workers, len(todo))
        loader = self._loader(todo, workers)
        scorer = Scorer(self.model, self.writer, self.claims)
        encoder = Encoder(self.model, self.cfg.batch_size)
        pending: dict[int, Pending] = {}
        threads = CpuThreads(self.model.device.type, workers)
        batches = iter(loader)
        try:
            last = time.perf_counter()
            for chunk in batches:
                if chunk.skipped:  # claimed or finished by another run meanwhile
                    continue
                self._take(chunk, pending, encoder)
                self._finish_complete(todo, pending, scorer)
                done = time.perf_counter()
                threads.record(len(chunk.rows), done - last)
                last = done
            encoder.flush()
            self._finish_complete(todo, pending, scorer)
        finally:
            threads.restore()
            if sys.exc_info()[0] is not None:
                _end_workers(batches)
            # Dropping the iterator ends the worker processes now (it joins, then terminates
            # them), even while an exception (Ctrl-C, SIGTERM, a full disk) holds this frame alive.
            del batches

    def _loader(self, todo: list[Shard], workers: int) -> torch.utils.data.DataLoader:
        model = self.model
        stream = ShardStream(
            todo,
            model.preprocess,
            model.tokenizer,
            chunk_size(self.cfg.batch_size, model.image_size),
            self.cfg.max_pixels,
            decoding=self.decoding,
            claims=self.claims,
            began=self.began,
            nice=nice_workers(model.device.type),
        )
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=model.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )

    def _take(self, chunk: Chunk, pending: dict[int, Pending], encoder: Encoder) -> None:
        """A chunk's rows join its shard's; its images go to the encoder (decoded here first
        when the workers left that to the model's device)."""
        if not self.report.startup_seconds:
            self.report.startup_seconds = time.time() - self.began
        state = pending.setdefault(chunk.pos, Pending(started=chunk.started))
        if chunk.deferred is not None and self.decoding.batched is not None:
            chunk.decode(self.decoding.batched, self.model.device)
        state.rows.extend(chunk.rows)
        if chunk.images is not None:
            encoder.add(state, chunk.images, chunk.tokens)
        if chunk.last:
            state.last = chunk
        self.progress.samples(len(chunk.rows))

    def _finish_complete(
        self, todo: list[Shard], pending: dict[int, Pending], scorer: Scorer
    ) -> None:
        """Write the part and marker of every shard whose samples are all encoded."""
        for pos in [p for p, state in pending.items() if state.complete]:
            result = scorer.finish(todo[pos], pending.pop(pos))
            self.report.results.append(result)
            self.attempted.add(result.name)
            self.progress.shard_done(result)


def _end_workers(batches: Any) -> None:
    """Interrupted: end the decoding workers at once. torch's own shutdown joins each worker
    for up to 5 s in turn, so four workers asleep in a retry backoff would hold a SIGTERM for
    20 s of Slurm's 30 s KillWait. Their pids leave torch's SIGCHLD watch first, so their
    deaths are not reported as a worker failure."""
    workers = getattr(batches, "_workers", None) or []
    if getattr(batches, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=2)
