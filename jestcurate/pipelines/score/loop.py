"""score's run: the plan, the model, then passes over the shards until all are settled."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

import torch

from jestcurate import __version__
from jestcurate.io.remote import Mirror
from jestcurate.io.shards import Shard
from jestcurate.io.store import (
    DONE_DIR,
    META_NAME,
    PARTS_DIR,
    SCHEMA_VERSION,
    check_meta,
    create_meta,
    marker_settles,
    remove_stale_temps,
)
from jestcurate.model.devicedecode import draft_size, resolve_decode, supports_torch_decode
from jestcurate.model.openclip import LoadedModel, ModelSpec, load_model, resolve_spec
from jestcurate.pipelines.score.cpu import (
    DEFAULT_BATCH,
    _CpuThreads,
    default_workers,
    openmp_sleeps,
)
from jestcurate.pipelines.score.encode import Scorer, _Encoder, _Pending
from jestcurate.pipelines.score.plan import ScoreConfig, _existing_decode, _plan, _validate
from jestcurate.pipelines.score.progress import Progress, ScoreReport, _NoProgress
from jestcurate.pipelines.score.stream import ShardStream, _chunk_size, decode_deferred
from jestcurate.scale.claims import Claims, Owner

log = logging.getLogger(__name__)


def run(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreReport:
    """Score every shard of this task that has no ok marker yet. Safe to rerun and to run as
    several concurrent tasks on the same output."""
    progress = progress or _NoProgress()
    _validate(cfg)
    began = time.time()
    mirror = None
    if cfg.upload_to is not None:
        mirror = Mirror(cfg.upload_to, local=cfg.out)
        mirror.pull((META_NAME,))
        mirror.sync_markers(DONE_DIR)
    mine, todo, index, count = _plan(cfg, mirror)
    resolved = resolve_spec(
        ModelSpec(cfg.model, cfg.pretrained, cfg.device, cfg.precision, cfg.init_seed)
    )
    identity = {"schema_version": SCHEMA_VERSION, "role": cfg.role, **resolved.identity()}
    chosen = cfg.decode == "auto"
    cfg = dataclasses.replace(
        cfg,
        decode=resolve_decode(cfg.decode, resolved.device, _existing_decode(cfg.out)),
        batch_size=cfg.batch_size or DEFAULT_BATCH.get(resolved.device.type, 64),
    )
    if cfg.decode != "pil":  # absent means PIL, as in every score set made before the option
        identity["decode"] = cfg.decode
    # Cheap refusal before any weights load: a mismatched DIR fails in seconds, not minutes.
    check_meta(cfg.out, identity)
    report = ScoreReport(
        out=cfg.out,
        task_index=index,
        num_tasks=count,
        shards_in_task=len(mine),
        skipped=len(mine) - len(todo),
        device=str(resolved.device),
    )
    progress.start(len(mine), report.skipped)
    if not todo and (cfg.out / META_NAME).is_file():
        report.seconds = time.time() - began
        return report

    model = load_model(resolved)
    if chosen and cfg.decode == "torch" and not supports_torch_decode(model.preprocess):
        log.info("this model's transform has no torch equivalent here: decoding with PIL")
        cfg = dataclasses.replace(cfg, decode="pil")
        identity.pop("decode", None)
        check_meta(cfg.out, identity)
    meta = {
        **identity,
        **model.describe(),
        "role": cfg.role,
        "ref_loss": f"{model.loss_kind}, other valid samples of the shard as negatives, "
        "size-normalised (docs/scores.md)",
        "tool": "jestcurate",
        "tool_version": __version__,
    }
    for sub in (PARTS_DIR, DONE_DIR):
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.out / sub)
    create_meta(cfg.out, meta)
    if mirror is not None:
        mirror.push(META_NAME)
    if not todo:  # only meta.json was missing: written again from the model, as it was
        report.seconds = time.time() - began
        return report

    claims = Claims(cfg.out, Owner.this_process(), cfg.lease)
    with claims.heartbeat():
        _score_until_settled(cfg, model, mine, claims, report, progress, began, mirror)
    report.seconds = time.time() - began
    return report


def _score_until_settled(
    cfg: ScoreConfig,
    model: LoadedModel,
    mine: list[Shard],
    claims: Claims,
    report: ScoreReport,
    progress: Progress,
    began: float,
    mirror: Mirror | None = None,
) -> None:
    """Score this task's unsettled shards in passes. Shards that other live runs hold are
    skipped, then waited for: the run ends when every shard is settled, by it or by others, and
    a claim whose owner died is taken over in the next pass."""
    attempted: set[str] = set()
    first: set[str] | None = None
    last_note = 0.0
    while True:
        todo = [
            s
            for s in mine
            if s.name not in attempted and not marker_settles(cfg.out, s.name, began)
        ]
        if first is None:
            first = {s.name for s in todo}
        if not todo:
            break
        held = {s.name: c for s in todo if (c := claims.held_by_other(s.name)) is not None}
        free = [s for s in todo if s.name not in held]
        if free:
            _score_pass(cfg, model, free, claims, report, progress, began, attempted, mirror)
            continue
        if time.time() - last_note > 60:
            owners = sorted({f"{c.get('host')}:{c.get('pid')}" for c in held.values()})
            log.info(
                "waiting for %d shard(s) that other runs are scoring (%s)",
                len(held),
                ", ".join(owners[:3]) + (" ..." if len(owners) > 3 else ""),
            )
            last_note = time.time()
        time.sleep(cfg.poll)
    report.by_others = len((first or set()) - attempted)


def _score_pass(
    cfg: ScoreConfig,
    model: LoadedModel,
    todo: list[Shard],
    claims: Claims,
    report: ScoreReport,
    progress: Progress,
    began: float,
    attempted: set[str],
    mirror: Mirror | None = None,
) -> None:
    """One DataLoader pass over `todo`; each shard is claimed by the worker that reads it."""
    workers = default_workers(model.device.type) if cfg.workers is None else cfg.workers
    workers = min(workers, len(todo))
    chunk = _chunk_size(cfg.batch_size, model.image_size)
    on_device = decode_here = None
    if cfg.decode == "torch":
        from jestcurate.model.devicedecode import DevicePreprocess

        on_device = DevicePreprocess.from_transform(model.preprocess)
        if model.device.type == "cpu" and workers:  # decode where the cores are: the workers
            decode_here, on_device = on_device, None
    stream = ShardStream(
        todo,
        model.preprocess,
        model.tokenizer,
        chunk,
        cfg.max_pixels,
        claims,
        began,
        defer_jpeg=on_device is not None,
        draft=draft_size(model.preprocess) if cfg.decode == "pil-draft" else None,
        decode_here=decode_here,
        nice=model.device.type == "cpu" and openmp_sleeps(),
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    scorer = Scorer(model, cfg.out, claims, mirror)
    encoder = _Encoder(model, cfg.batch_size)
    pending: dict[int, _Pending] = {}

    def finish_complete() -> None:
        for pos in [p for p, state in pending.items() if state.complete]:
            result = scorer.finish(todo[pos], pending.pop(pos))
            report.results.append(result)
            attempted.add(result.name)
            progress.shard_done(result)

    threads = _CpuThreads(model.device.type, workers)
    batches = iter(loader)
    try:
        last = time.perf_counter()
        for item in batches:
            if item.get("skipped"):  # claimed or finished by another run meanwhile
                continue
            if not report.startup_seconds:
                report.startup_seconds = time.time() - began
            state = pending.setdefault(item["pos"], _Pending(started=item["started"]))
            images, tokens = item["images"], item["tokens"]
            if item["items"] is not None and on_device is not None:
                images, tokens = decode_deferred(on_device, item, model.device)
            state.rows.extend(item["rows"])
            if images is not None:
                encoder.add(state, images, tokens)
            if item["last"]:
                state.last = item
            progress.samples(len(item["rows"]))
            finish_complete()
            done = time.perf_counter()
            threads.record(len(item["rows"]), done - last)
            last = done
        encoder.flush()
        finish_complete()
    finally:
        threads.restore()
        if sys.exc_info()[0] is not None:
            _end_workers(batches)
        # Dropping the iterator ends the worker processes now (it joins, then terminates them),
        # even while an exception (Ctrl-C, SIGTERM, a full disk) holds this frame alive.
        del batches


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
