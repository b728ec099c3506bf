"""What the launcher trains, checked before anything is built: the steps of the selections (or,
online, of the reference's super-batches) cut into open_clip_train's epochs, and the numbers
that keep every batch whole."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.remote import is_url
from jestcurate.io.store import read_json, read_output, require_selection_images

TAR_GZ = (".gz", ".tgz")

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
    exported = selection / "shards" / "export.json"
    finished = exported.is_file() and "shards" in read_json(exported)
    if requested == "export" and not finished:
        raise JCError(f"{selection} has no finished export; run select with --export")
    source = ("export" if finished else "original") if requested == "auto" else requested
    if source == "original":  # read by position: say so now, not from a DataLoader worker
        shards = read_output(selection / "manifest.parquet", ["shard"]).column("shard")
        unreadable = [s for s in set(shards.to_pylist()) if is_url(s) or s.endswith(TAR_GZ)]
        if unreadable:
            raise JCError(
                f"{selection} has no finished export and its source shards cannot be read by "
                f"position ({unreadable[0]}: only local uncompressed tars can); run select "
                "with --export"
            )
    return source


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
        if n <= 0 or n % batch:
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


def _online_steps(ours: argparse.Namespace, theirs: argparse.Namespace, world: int) -> int:
    """The reference's super-batches (one per step), counted without building the row cache."""
    from jestcurate.io.eligible import Filters, scan
    from jestcurate.io.store import open_score_set
    from jestcurate.math.sampling import SamplerOptions

    if int(theirs.accum_freq) != 1:
        raise JCError("--online scores and picks a whole batch per step: drop --accum-freq")
    batch = int(theirs.batch_size) * world
    big = SamplerOptions(batch, ours.online_ratio).super_batch
    if big % world:
        raise JCError(f"a super-batch of {big} does not split over {world} ranks")
    reference = open_score_set(Path(ours.online), role="reference")
    reference.require_images("the open_clip_train launcher")
    eligible = scan(reference, None, Filters()).counts.eligible
    if eligible < big:
        raise JCError(f"{eligible} eligible rows: fewer than one super-batch of {big}")
    return eligible // big


def plan(ours: argparse.Namespace, theirs: argparse.Namespace, world_size: int) -> Plan:
    """Check that the numbers keep every batch, before anything is built or trained."""
    given = [flag for flag in DATA_FLAGS if _given(theirs, flag)]
    if given:
        raise JCError(
            f"{' and '.join(given)}: the selection is the training data, and open_clip_train "
            "would read these shuffled; drop them (--val-data still works)"
        )
    common = {
        "epochs": int(theirs.epochs),
        "world_size": world_size,
        "accum": int(theirs.accum_freq),
        "micro": int(theirs.batch_size),
        "record": Path(ours.record_steps) if ours.record_steps else None,
    }
    if ours.online:
        batch = int(theirs.batch_size) * world_size
        total = _online_steps(ours, theirs, world_size)
        online = Online(Path(ours.online), float(ours.online_ratio), int(ours.online_seed))
        per_epoch = _steps_per_epoch(theirs, batch, total, "the reference's super-batches")
        return Plan((), (), batch, (total,), per_epoch, online=online, **common)
    selections = tuple(Path(s) for s in ours.selection)
    summaries = [_summary(s) for s in selections]
    sources = tuple(
        _source(s, ours.selection_source, summary)
        for s, summary in zip(selections, summaries, strict=True)
    )
    sizes = {int(s["parameters"]["batch_size"]) for s in summaries}
    if len(sizes) > 1:
        raise JCError(f"the selections have different batch sizes ({sorted(sizes)}); use one")
    batch = sizes.pop()
    _check_batch(theirs, batch, world_size)
    steps = tuple(int(s["counts"]["steps"]) for s in summaries)
    per_epoch = _steps_per_epoch(theirs, batch, sum(steps), "the selection")
    return Plan(selections, sources, batch, steps, per_epoch, **common)


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    return value not in (None, False, "", "auto")
