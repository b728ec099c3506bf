"""What the launcher trains, checked before anything is built: the steps of the selections (or,
online, of the reference's super-batches) cut into open_clip_train's epochs, and the numbers
that keep every batch whole."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.files import read_existing_json, write_json_atomic
from jestcurate.io.store import read_json, read_output, require_selection_images
from jestcurate.trainer.loader import by_position, export_meta, finished_export

# Beside open_clip_train's out.log: the plan a run was started with, which a resume must share.
PLAN_FILE = "jestcurate-plan.json"
DEFAULT_ONLINE_RATIO = 0.2

# Flags that would give open_clip_train training data of its own, read shuffled.
DATA_FLAGS = (
    "--train-data",
    "--train-data-upsampling-factors",
    "--dataset-type",
    "--dataset-resampled",
)


@dataclass(frozen=True)
class Online:
    """Online JEST: candidates from a reference score set, b of each B chosen in training."""

    reference: Path
    ratio: float
    seed: int


@dataclass(frozen=True)
class Plan:
    selections: tuple[Path, ...]  # empty online
    sources: tuple[str, ...]  # per selection: "export" or "original"
    batch: int  # b: the selections' batch size, or online --batch-size × ranks
    steps: tuple[int, ...]  # each selection's steps (online: the reference's super-batches)
    steps_per_epoch: int
    epochs: int
    world_size: int
    accum: int
    micro: int  # samples per rank per micro-batch: open_clip's --batch-size
    record: Path | None
    online: Online | None = None
    by_position: int = 0  # source tars read by position (selections without export, online)

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    @property
    def trained_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def locate(self, step: int) -> tuple[int, int]:
        """(selection number, step within it) of a global step."""
        for i, n in enumerate(self.steps):
            if step < n:
                return i, step
            step -= n
        raise IndexError(step)


def _source(selection: Path, requested: str, summary: dict[str, Any]) -> str:
    require_selection_images(summary, "the open_clip_train launcher")
    if requested == "export":
        finished_export(selection)  # refused, in one line, unless finished
    finished = export_meta(selection) is not None
    return ("export" if finished else "original") if requested == "auto" else requested


def _source_shards(selection: Path) -> list[str]:
    """The source tars a selection without export is read from, checked now rather than in a
    DataLoader worker."""
    shards = read_output(selection / "manifest.parquet", ["shard"]).column("shard")
    unique = pc.unique(shards).to_pylist()
    _require_by_position(unique, f"{selection} has no finished export")
    return unique


def _require_by_position(shards: list[str], why: str) -> None:
    unreadable = [s for s in shards if not by_position(s)]
    if unreadable:
        raise JCError(
            f"{why} and its source shards cannot be read by position ({unreadable[0]}: only "
            "local uncompressed tars can); run select with --export"
        )


def _summary(selection: Path) -> dict[str, Any]:
    if not selection.is_dir():
        raise JCError(f"selection not found: {selection}")
    if not (selection / "summary.json").is_file():
        raise JCError(f"{selection} is not a finished selection (no summary.json)")
    return read_json(selection / "summary.json")


def _steps_per_epoch(args: argparse.Namespace, batch: int, total: int, what: str) -> int:
    epochs = int(args.epochs)
    if epochs < 1:
        raise JCError(f"--epochs must be at least 1, not {epochs}")
    if args.train_num_samples is not None:
        n = int(args.train_num_samples)
        if n <= 0:
            raise JCError(f"--train-num-samples must be positive, not {n}")
        if n % batch:
            lower, upper = max(batch, n // batch * batch), (n // batch + 1) * batch
            raise JCError(
                f"--train-num-samples {n} is not a whole number of batches of {batch}: pass "
                f"{lower} or {upper} (an epoch is that many samples / {batch} steps)"
            )
        per_epoch = n // batch
    else:
        per_epoch = total // epochs
        if per_epoch == 0:
            raise JCError(f"--epochs {epochs} is more than the {total} steps {what} holds")
    if per_epoch * epochs > total:
        more = (
            "add a selection made with another --seed"
            if what == "the selection"
            else ("raise --online-ratio")
        )
        raise JCError(
            f"--epochs {epochs} × {per_epoch} steps = {per_epoch * epochs} steps, but {what} "
            f"holds {total}: lower --epochs or --train-num-samples, or {more}"
        )
    return per_epoch


def _check_batch(theirs: argparse.Namespace, batch: int, world_size: int) -> None:
    accum = int(theirs.accum_freq)
    per_step = int(theirs.batch_size) * world_size * accum
    if per_step != batch:
        grad = f" × --accum-freq {accum}" if accum > 1 else ""
        fit = batch / (world_size * accum)
        advice = f"pass --batch-size {int(fit)}" if fit == int(fit) else "change the ranks"
        raise JCError(
            f"--batch-size {theirs.batch_size} × {world_size} rank(s){grad} = {per_step} "
            f"examples per step, but the selection's batches hold {batch}: {advice}, so that "
            "each optimizer step trains exactly one selected batch"
        )


def _ratio(ours: argparse.Namespace) -> float:
    return DEFAULT_ONLINE_RATIO if ours.online_ratio is None else float(ours.online_ratio)


def _online_steps(
    ours: argparse.Namespace, theirs: argparse.Namespace, world: int
) -> tuple[int, int]:
    """The reference's super-batches (one per step), counted without building the row cache,
    and its source tars."""
    from jestcurate.io.eligible import Filters, scan
    from jestcurate.io.store import open_score_set
    from jestcurate.math.sampling import SamplerOptions

    if int(theirs.accum_freq) != 1:
        raise JCError("--online scores and picks a whole batch per step: drop --accum-freq")
    if theirs.horovod:
        raise JCError("--online gathers embeddings with torch.distributed: run it with torchrun")
    batch = int(theirs.batch_size) * world
    big = SamplerOptions(batch, _ratio(ours)).super_batch
    if big % world:
        raise JCError(f"a super-batch of {big} does not split over {world} ranks")
    reference = open_score_set(Path(ours.online), role="reference")
    reference.require_images("the open_clip_train launcher")
    found = scan(reference, None, Filters())
    _require_by_position(found.shards, f"{reference.path} is the --online reference")
    eligible = found.counts.eligible
    if eligible < big:
        raise JCError(f"{eligible} eligible rows: fewer than one super-batch of {big}")
    return eligible // big, len(found.shards)


def plan(ours: argparse.Namespace, theirs: argparse.Namespace, world_size: int) -> Plan:
    """Check that the numbers keep every batch, before anything is built or trained."""
    given = [flag for flag in DATA_FLAGS if _given(theirs, flag)]
    if given:
        raise JCError(
            f"{' and '.join(given)}: the selection is the training data, and open_clip_train "
            "would read these shuffled; drop them (--val-data still works)"
        )
    _check_loss(theirs)
    common = {
        "epochs": int(theirs.epochs),
        "world_size": world_size,
        "accum": int(theirs.accum_freq),
        "micro": int(theirs.batch_size),
        "record": Path(ours.record_steps) if ours.record_steps else None,
    }
    if not ours.online and (ours.online_ratio is not None or ours.online_seed is not None):
        raise JCError("--online-ratio and --online-seed go with --online")
    if ours.online:
        batch = int(theirs.batch_size) * world_size
        total, tars = _online_steps(ours, theirs, world_size)
        seed = 0 if ours.online_seed is None else ours.online_seed
        online = Online(Path(ours.online), _ratio(ours), seed)
        per_epoch = _steps_per_epoch(theirs, batch, total, "the reference's super-batches")
        return Plan((), (), batch, (total,), per_epoch, online=online, by_position=tars, **common)
    selections = tuple(Path(s) for s in ours.selection)
    summaries = [_summary(s) for s in selections]
    sources = tuple(
        _source(s, ours.selection_source, summary)
        for s, summary in zip(selections, summaries, strict=True)
    )
    tars: set[str] = set()
    for selection, source in zip(selections, sources, strict=True):
        if source == "original":
            tars.update(_source_shards(selection))
    sizes = {int(s["parameters"]["batch_size"]) for s in summaries}
    if len(sizes) > 1:
        raise JCError(f"the selections have different batch sizes ({sorted(sizes)}); use one")
    batch = sizes.pop()
    _check_batch(theirs, batch, world_size)
    steps = tuple(int(s["counts"]["steps"]) for s in summaries)
    per_epoch = _steps_per_epoch(theirs, batch, sum(steps), "the selection")
    return Plan(selections, sources, batch, steps, per_epoch, by_position=len(tars), **common)


def _check_loss(theirs: argparse.Namespace) -> None:
    """A SigLIP model (its config has a logit bias) trained without --siglip gets CLIP's softmax
    loss from open_clip_train, silently: refuse it."""
    from jestcurate.model.openclip import _open_clip

    if theirs.siglip or str(theirs.model).startswith(("hf-hub:", "local-dir:")):
        return  # (a hub config would need the network; open_clip reads it later)
    try:
        config = _open_clip().get_model_config(theirs.model)
    except Exception:  # an unknown name: open_clip_train says so itself
        return
    if config and "init_logit_bias" in config:
        raise JCError(
            f"{theirs.model} is a SigLIP model (its config sets a logit bias): pass --siglip, "
            "or open_clip_train trains it with CLIP's softmax loss"
        )


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    return value not in (None, False, "", "auto")


def summary_sha256(selection: Path, whole_file: bool = False) -> str:
    """summary.json's sha256 without its `fates` and `ledger` (canonical JSON of the rest): the
    same before and after the ledger round finishes (--spread-ledger rewrites the file).
    `whole_file`: the file's bytes, as plans written before this recorded it."""
    raw = (selection / "summary.json").read_bytes()
    if whole_file:
        return hashlib.sha256(raw).hexdigest()
    rest = {k: v for k, v in json.loads(raw).items() if k not in ("fates", "ledger")}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def identity(p: Plan, whole_file: bool = False) -> dict[str, Any]:
    """What decides which samples step s trains: a resume must find the same. `whole_file`:
    as older plans recorded the summaries (summary_sha256)."""
    sources: list[dict[str, Any]] = [
        {"selection": str(sel.resolve()), "summary_sha256": summary_sha256(sel, whole_file)}
        for sel in p.selections
    ]
    if p.online is not None:
        online = p.online
        sources = [{"online": str(online.reference.resolve()), "ratio": online.ratio}]
        sources[0].update(seed=online.seed, super_batches=p.total_steps)
    return {"batch_size": p.batch, "steps_per_epoch": p.steps_per_epoch, "sources": sources}


def check_run_folder(p: Plan, theirs: argparse.Namespace, write: bool) -> None:
    """Refuse to resume (or reuse) a run folder begun with another plan, which would train other
    steps than the checkpoint's continuation; with `write` (rank 0), note the plan there."""
    if theirs.resume == "latest" and not theirs.name:
        raise JCError(
            "--resume latest needs --name: without one open_clip_train names each run by its "
            "start time, so a rerun never finds the checkpoints"
        )
    logs = theirs.logs if theirs.logs and str(theirs.logs).lower() != "none" else None
    folder = Path(logs) / theirs.name if logs and theirs.name else None
    if theirs.resume not in (None, "latest"):  # .../NAME/checkpoints/epoch_K.pt
        folder = Path(theirs.resume).resolve().parent.parent
    if folder is None:
        return
    previous = read_existing_json(folder / PLAN_FILE)
    ours = identity(p)
    if previous is not None and previous != ours and previous != identity(p, whole_file=True):
        raise JCError(
            f"{folder} was begun with another plan ({previous['steps_per_epoch']} steps of "
            f"{previous['batch_size']} per epoch, from "
            f"{', '.join(next(iter(s.values())) for s in previous['sources'])}): resuming it with "
            "this one would train other steps; pass the same selections, --batch-size × ranks "
            "and --train-num-samples (or --epochs), or a new --name"
        )
    if write and previous is None and logs and theirs.name:
        folder = Path(logs) / theirs.name
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / PLAN_FILE, ours)
