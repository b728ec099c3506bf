"""`jestcurate score`: stream shards through a frozen open_clip model into a Parquet score set.

Data flow: DataLoader worker processes read tars, decode and preprocess images and tokenize
captions (ShardStream); the main process encodes each chunk on the model's device and keeps a
shard's embeddings there until the shard ends, then computes its scores and writes its part and
completion marker. Shards are the unit of work, of resume and of failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.errors import JCError, default_sigterm
from jestcurate.io.reader import (
    DEFAULT_MAX_PIXELS,
    ShardReadError,
    error_reason,
    iter_raw_samples,
    parse_sample,
)
from jestcurate.io.remote import Mirror, RemoteParts
from jestcurate.io.shards import (
    Shard,
    assign_names,
    expand_inputs,
    for_task,
    open_shard,
    resolve_task,
    shard_size,
)
from jestcurate.io.store import (
    DONE_DIR,
    META_NAME,
    ORPHANED_DIR,
    PARTS_DIR,
    SCHEMA_VERSION,
    PartFiles,
    check_meta,
    create_meta,
    forget_unmatched,
    marker_settles,
    part_table,
    read_json,
    read_markers,
    remove_stale_temps,
    set_aside_strays,
    write_json_atomic,
    write_part,
)
from jestcurate.math.scoring import clip_scores, example_losses
from jestcurate.model.devicedecode import (
    DECODERS,
    draft_size,
    resolve_decode,
    supports_torch_decode,
)
from jestcurate.model.openclip import LoadedModel, ModelSpec, load_model, resolve_spec
from jestcurate.scale.claims import DEFAULT_LEASE, Claims, Owner
from jestcurate.trainer.loader import this_worker

log = logging.getLogger(__name__)
ROLES = ("reference", "learner")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what Slurm or taskset gave us, not the whole host
    except AttributeError:
        return os.cpu_count() or 2


# Samples per forward pass. On a CPU, shorter passes leave the niced decoding workers more gaps
# to run in: jc-tiny on 2 cores scored 1,069 samples/s at 64 against 747 at 256
# (docs/benchmarks.md); the embeddings do not depend on it.
DEFAULT_BATCH = {"cuda": 256, "cpu": 64}


def default_workers(device_type: str = "cpu") -> int:
    """Decoding processes. With a GPU the CPU only decodes, so use all cores but one; on a CPU
    the model needs cores too, so decoding gets half."""
    cores = _cores()
    if device_type == "cuda":
        return max(1, min(32, cores - 1))
    return max(1, cores // 2)


def openmp_sleeps() -> bool:
    """Whether torch's OpenMP threads sleep when idle instead of spinning: the CLI sets
    OMP_WAIT_POLICY=PASSIVE before torch loads (jestcurate.cli.sleeping_openmp), unless the
    user chose otherwise."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


class _CpuThreads:
    """On a CPU the model and the decoding workers share the cores. With OpenMP threads that
    sleep when idle (openmp_sleeps) the model keeps all of torch's threads and the workers run
    niced, so the model has the cores whenever it has data and the workers fill every gap:
    jc-tiny then scores faster than with any fixed split, and a ViT-B/32 at its two-thread
    speed (docs/benchmarks.md). With spinning threads (OMP_WAIT_POLICY=ACTIVE, or `run` called
    from a Python process that loaded torch first) a worker sharing a core with a spinning
    thread starves, and which split is best depends on the model: a ViT-B/32 on 2 cores scores
    10 samples/s with 2 torch threads and 5.7 with 1, the tiny model 405 with 2 and 600 with 1.
    So then run a few chunks with all of torch's threads, then with the cores the workers
    leave, and keep the faster."""

    WARMUP, WINDOW = 2, 4  # chunks

    def __init__(self, device_type: str, workers: int) -> None:
        self.before = torch.get_num_threads()
        self.options = [self.before, max(1, _cores() - workers)]
        self.deciding = (
            device_type == "cpu"
            and workers > 0
            and self.options[1] < self.before
            and not openmp_sleeps()
        )
        self.chunks = 0
        self.rates: list[float] = []
        self.samples = 0
        self.seconds = 0.0

    def record(self, samples: int, seconds: float) -> None:
        if not self.deciding:
            return
        self.chunks += 1
        if self.chunks <= self.WARMUP:  # workers are still starting
            return
        self.samples += samples
        self.seconds += seconds
        if (self.chunks - self.WARMUP) % self.WINDOW:
            return
        self.rates.append(self.samples / max(self.seconds, 1e-9))
        self.samples, self.seconds = 0, 0.0
        if len(self.rates) < len(self.options):
            torch.set_num_threads(self.options[len(self.rates)])
            return
        self.deciding = False
        best = self.options[self.rates.index(max(self.rates))]
        log.debug("torch threads: %s samples/s with %s; keeping %d", self.rates, self.options, best)
        torch.set_num_threads(best)

    def restore(self) -> None:
        torch.set_num_threads(self.before)


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...]
    out: Path
    model: str
    pretrained: str | None = None
    batch_size: int | None = None  # None: DEFAULT_BATCH for the device
    device: str = "auto"
    precision: str | None = None
    workers: int | None = None
    task_index: int | None = None
    num_tasks: int | None = None
    role: str = "reference"
    verify: bool = False  # rerun: check every finished part's sha256, not only its size
    max_pixels: int = DEFAULT_MAX_PIXELS
    init_seed: int = 0
    lease: float = DEFAULT_LEASE  # seconds a claim lasts unrenewed (matters across hosts)
    upload_to: str | None = None  # an fsspec URL: `out` is then its local mirror
    decode: str = "auto"  # pil, pil-draft or torch; "auto": torch where the transform allows
    poll: float = 10.0  # seconds between looks at shards that other runs are scoring


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
class ScoreReport:
    out: Path
    task_index: int
    num_tasks: int
    shards_in_task: int
    skipped: int
    results: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # resolving inputs, loading the model, starting workers
    device: str = ""
    by_others: int = 0  # shards another run scored while this one ran

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status != "ok"]

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.results)

    def error_reasons(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.error_reasons)
        return total


class Progress(Protocol):
    def start(self, total: int, skipped: int) -> None: ...
    def samples(self, n: int) -> None: ...
    def shard_done(self, result: ShardResult) -> None: ...


class _NoProgress:
    def start(self, total: int, skipped: int) -> None:
        pass

    def samples(self, n: int) -> None:
        pass

    def shard_done(self, result: ShardResult) -> None:
        pass


class ShardStream(torch.utils.data.IterableDataset):
    """Yields chunks of at most `chunk_size` valid samples, shard by shard; each worker process
    takes every num_workers-th shard. A shard's last chunk has `last` set and says whether the
    shard broke (`failure`)."""

    def __init__(
        self,
        shards: Sequence[Shard],
        preprocess: Any,
        tokenizer: Any,
        chunk_size: int,
        max_pixels: int,
        claims: Claims | None = None,
        began: float = 0.0,
        defer_jpeg: bool = False,
        draft: int | None = None,
        decode_here: Any = None,
        nice: bool = False,
    ) -> None:
        self.shards = list(shards)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.max_pixels = max_pixels
        self.claims = claims
        self.began = began
        self.defer_jpeg = defer_jpeg or decode_here is not None
        self.draft = draft  # --decode pil-draft: JPEGs DCT-scaled towards this side
        # --decode torch with a CPU model: the worker runs the batched torch decoding itself,
        # so it spreads over the workers instead of taking the model's own threads.
        self.decode_here = decode_here
        self.nice = nice  # workers yield the cores to the model (a CPU model, _CpuThreads)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is not None:
            default_sigterm()  # a worker ends at once; the main process cleans up
            if self.nice:
                os.nice(19)
        worker, workers = this_worker()
        for pos in range(worker, len(self.shards), workers):
            yield from self._read(pos)

    def _chunk(
        self, pos: int, rows: list, images: list, captions: list, valid: list, **extra: Any
    ) -> dict:
        deferred = self.defer_jpeg and bool(images)
        chunk = {
            "pos": pos,
            "rows": rows,
            "images": torch.stack(images) if images and not deferred else None,
            "items": images if deferred else None,  # JPEG bytes or tensors, for the device
            "valid": valid,  # the row of each image
            "tokens": self.tokenizer(captions) if captions else None,
            "last": False,
            **extra,
        }
        if deferred and self.decode_here is not None:
            chunk["images"], chunk["tokens"] = decode_deferred(
                self.decode_here, chunk, torch.device("cpu")
            )
            chunk["items"] = None
        return chunk

    def _claim(self, shard: Shard) -> bool:
        """Claim the shard just before reading it; False if another run has it or finished it
        in the meantime."""
        claims = self.claims
        if claims is None:
            return True
        if not claims.try_claim(shard.name):
            return False
        if marker_settles(claims.dir.parent, shard.name, self.began):
            claims.release(shard.name)
            return False
        return True

    def _read(self, pos: int) -> Iterator[dict[str, Any]]:
        shard = self.shards[pos]
        if not self._claim(shard):
            yield {"pos": pos, "skipped": True}
            return
        started = time.time()
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        images: list[torch.Tensor | bytes] = []
        captions: list[str] = []
        valid: list[int] = []
        failure = None
        try:
            with open_shard(shard.url) as f:
                for raw in iter_raw_samples(f):
                    row, image = parse_sample(
                        raw, seen, self.max_pixels, self.defer_jpeg, self.draft
                    )
                    if image is not None:
                        try:
                            images.append(
                                image if isinstance(image, bytes) else self.preprocess(image)
                            )
                            captions.append(row["caption"])
                            valid.append(len(rows))
                        except Exception as exc:  # a transform failing on one image fails that row
                            row.update(status="error", error=f"preprocess failed: {exc}")
                    rows.append(row)
                    if len(images) >= self.chunk_size:
                        yield self._chunk(pos, rows, images, captions, valid, started=started)
                        rows, images, captions, valid = [], [], [], []
        except ShardReadError as exc:
            failure = str(exc)
        except Exception as exc:  # a shard that cannot be opened fails alone; the run goes on
            failure = f"cannot read shard: {type(exc).__name__}: {exc}"
        yield self._chunk(
            pos,
            rows,
            images,
            captions,
            valid,
            started=started,
            last=True,
            failure=failure,
            size=shard_size(shard.url),
        )


@dataclass
class _Pending:
    """A shard whose chunks are still arriving; its embeddings stay on the model's device."""

    started: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    img: list[torch.Tensor] = field(default_factory=list)
    txt: list[torch.Tensor] = field(default_factory=list)
    waiting: int = 0  # samples queued for encoding but not yet encoded
    last: dict[str, Any] | None = None  # the shard's last chunk, once it has arrived

    @property
    def complete(self) -> bool:
        return self.last is not None and self.waiting == 0


class _Encoder:
    """Packs the valid samples of incoming chunks, whatever their shard, into full model
    batches, so short shards and shard ends do not leave the device with small batches."""

    def __init__(self, model: LoadedModel, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.queue: list[tuple[_Pending, torch.Tensor, torch.Tensor]] = []
        self.queued = 0

    def add(self, state: _Pending, images: torch.Tensor, tokens: torch.Tensor) -> None:
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
        parts: list[tuple[_Pending, torch.Tensor, torch.Tensor]] = []
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
        out: Path,
        claims: Claims | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.model = model
        self.out = out
        self.claims = claims
        self.mirror = mirror
        self.dim = model.embed_dim
        self.scale = model.logit_scale
        self.bias = model.logit_bias
        self.kind = model.loss_kind

    def finish(self, shard: Shard, state: _Pending) -> ShardResult:
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
        part = write_part(self.out / PARTS_DIR / f"{shard.name}.parquet", table)
        reasons = Counter(error_reason(r["error"]) for r in state.rows if r["status"] != "ok")
        last = state.last or {}
        failure = last.get("failure")
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
            input_bytes=last.get("size"),
            part=part,
        )
        # The marker comes last: a crash before it leaves the shard to be redone.
        write_json_atomic(self.out / DONE_DIR / f"{shard.name}.json", result.marker())
        if self.mirror is not None:  # the same order remotely: the part, then its marker
            self.mirror.push(f"{PARTS_DIR}/{shard.name}.parquet")
            self.mirror.push(f"{DONE_DIR}/{shard.name}.json")
        if self.claims is not None:
            self.claims.release(shard.name)
        return result


def _chunk_size(
    batch_size: int, image_size: tuple[int, int], budget: int = 64 << 20, least: int = 256
) -> int:
    """Samples per worker chunk: a batch, or `least` if the batch is smaller (each chunk costs
    a fixed few ms to hand over: the fd of each tensor goes through a socket handshake with
    the worker), unless that passes `budget` bytes of float32 pixels. Chunks sit in shared
    memory (prefetched by every worker), which containers often keep small; the encoder packs
    chunks back into full batches."""
    per_sample = 3 * image_size[0] * image_size[1] * 4
    return max(1, min(max(batch_size, least), budget // per_sample))


def _plan(
    cfg: ScoreConfig, mirror: Mirror | None = None
) -> tuple[list[Shard], list[Shard], int, int]:
    """(this task's shards, those still to do, task index, task count)."""
    urls = expand_inputs(cfg.inputs)
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    markers = read_markers(cfg.out)
    owners = {name: m.get("shard") for name, m in markers.items()}
    everyone = assign_names(urls, owners)
    mine = for_task(everyone, index, count)
    # A part that no longer matches its marker is not done. (A remote set's local mirror holds
    # the markers only: its parts are checked in one listing of the URL.)
    files = RemoteParts(mirror) if mirror is not None else PartFiles(cfg.out)
    urls_of = {s.name: s.url for s in mine}
    for name, problem in forget_unmatched(cfg.out, markers, list(urls_of), cfg.verify, files):
        log.warning("part %s is %s: scoring %s again", name, problem, urls_of[name])
    if mirror is None:  # a part no input shard would redo, and no run is writing
        owner = Owner.this_process()

        def live(name: str) -> bool:  # only asked when there are strays: no claims/ otherwise
            return Claims(cfg.out, owner).held_by_other(name) is not None

        for name in set_aside_strays(cfg.out, markers, {s.name for s in everyone}, live):
            log.warning(
                "part %s has no marker and is none of the INPUTS' shards: moved to %s/%s/",
                name, cfg.out, ORPHANED_DIR,
            )  # fmt: skip
    todo = [s for s in mine if markers.get(s.name, {}).get("status") != "ok"]
    return mine, todo, index, count


def _existing_decode(out: Path) -> str | None:
    """The decoder of the score set at `out`, if there is one (absent from meta.json: pil), so
    that `--decode auto` carries on as the set was begun, whatever the default is now."""
    try:
        meta = read_json(out / META_NAME)
    except (OSError, ValueError):  # none yet; an unreadable one is check_meta's to report
        return None
    return str(meta.get("decode", "pil"))


def _validate(cfg: ScoreConfig) -> None:
    if cfg.role not in ROLES:
        raise JCError(f"unknown role {cfg.role!r}; use reference or learner")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise JCError("--batch-size must be at least 1")
    if cfg.decode not in DECODERS:
        raise JCError(f"--decode must be one of {', '.join(DECODERS)}, not {cfg.decode!r}")
    if cfg.workers is not None and cfg.workers < 0:
        raise JCError("--workers must be 0 or more")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")


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


def decode_deferred(
    on_device: Any, item: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A chunk's images decoded and preprocessed on the device; a JPEG that fails to decode
    turns its row into an error row and drops its caption tokens."""
    images, bad = on_device.batch(item["items"], device)
    tokens = item["tokens"]
    if bad:
        for i, error in bad:
            item["rows"][item["valid"][i]].update(status="error", error=error)
        failed = {i for i, _ in bad}
        keep = [i for i in range(len(item["items"])) if i not in failed]
        tokens = tokens[keep] if keep else None
    return images, tokens


class ScoreProgress:
    """Progress for `score`: rich bar over shards with samples/s, or a log line per shard and a
    throughput line every `every` seconds."""

    def __init__(self, interactive: bool | None = None, every: float = 60.0) -> None:
        self.interactive = ui.is_interactive() if interactive is None else interactive
        self.every = every
        self.samples_seen = 0
        self.done = 0
        self.total = 0
        self.began = time.monotonic()
        self.last_line = self.began
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ScoreProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, total: int, skipped: int) -> None:
        self.total, self.done = total, skipped
        self.began = self.last_line = time.monotonic()
        if skipped:
            log.info("%d of %d shards already done; skipping them", skipped, total)
        if self.interactive:
            from rich.progress import TextColumn

            self._bar = ui.progress_bar(
                "scoring",
                TextColumn("shards"),
                TextColumn("{task.fields[samples]:,} samples"),
                TextColumn("{task.fields[rate]:,.0f}/s"),
            )
            self._task = self._bar.add_task(
                "score", total=total, completed=skipped, samples=0, rate=0.0
            )
            self._bar.start()

    def _rate(self) -> float:
        return self.samples_seen / max(time.monotonic() - self.began, 1e-9)

    def samples(self, n: int) -> None:
        self.samples_seen += n
        if self._bar is not None:
            self._bar.update(self._task, samples=self.samples_seen, rate=self._rate())
        elif time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            log.info(
                "progress: %d/%d shards, %d samples, %.0f samples/s",
                self.done,
                self.total,
                self.samples_seen,
                self._rate(),
            )

    def shard_done(self, result: ShardResult) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        if result.status != "ok":
            log.warning("shard %s failed: %s", result.name, result.error)
        elif not self.interactive:
            log.info(
                "shard %s ok: %d samples, %d errors, %.1fs (%d/%d)",
                result.name,
                result.samples,
                result.errors,
                result.seconds,
                self.done,
                self.total,
            )


def print_summary(report: ScoreReport, console: Console = ui.stdout) -> None:
    done = [r for r in report.results if r.status == "ok"]
    table = ui.facts("jestcurate score")
    if report.num_tasks > 1:
        table.add_row("task", f"{report.task_index} of {report.num_tasks}")
    table.add_row("shards in this task", f"{report.shards_in_task:,}")
    table.add_row("  already done (skipped)", f"{report.skipped:,}")
    table.add_row("  scored now", f"{len(done):,}")
    if report.by_others:
        table.add_row("  scored meanwhile by another run", f"{report.by_others:,}")
    table.add_row("  failed", f"{len(report.failed):,}")
    samples = report.samples
    errors = sum(r.errors for r in report.results)
    table.add_row("samples read", f"{samples:,}")
    table.add_row("  scored", f"{samples - errors:,}")
    table.add_row("  errors", f"{errors:,}")
    for reason, count in report.error_reasons().most_common():
        table.add_row(f"    {reason}", f"{count:,}")
    if report.results:
        rate = samples / max(report.seconds - report.startup_seconds, 1e-9)
        table.add_row("throughput", f"{rate:,.1f} samples/s on {report.device}")
        table.add_row("start-up", f"{report.startup_seconds:,.1f} s")
    table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"score set: {report.out}", highlight=False, soft_wrap=True)
    for result in sorted(report.failed, key=lambda r: r.name):
        console.print(
            f"[red]failed[/red] {result.shard}: {result.error}", highlight=False, soft_wrap=True
        )
