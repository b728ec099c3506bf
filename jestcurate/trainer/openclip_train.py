"""open_clip_train on a selection's batches, in step order.

    torchrun --nproc_per_node 8 -m jestcurate.openclip_train --selection sel/ \\
        --model ViT-B-32 --batch-size 64 --epochs 10 --lr 5e-4 --logs logs/ ...

Every flag but the launcher's own (`--selection`, `--selection-source`, `--record-steps`) goes
to open_clip_train's own `main`, which runs unchanged: its model, optimizer, losses, schedule,
precision, logging, checkpoints and evaluation. Only the training data changes. open_clip_train
builds it with one function, `open_clip_train.data.get_dataset_fn`; the launcher swaps in its
own builder for the training split (validation data still goes to open_clip's), which returns
open_clip's `DataInfo` around a loader that yields, for each manifest step, this rank's slice of
that step's batch, decoded with open_clip's training transform and tokenizer. open_clip's loss
gathers the ranks' slices back into the manifest's batch (`--accum-freq k` splits each slice into
k micro-batches, whose features open_clip concatenates before the loss).

Epochs are runs of manifest steps: epoch e trains steps e*S .. (e+1)*S - 1, where S is
`--train-num-samples` / b (or the selection's steps / `--epochs`). open_clip_train's step counter
(`num_batches * epoch + i`, which drives the learning-rate schedule) is then the manifest step,
the schedule's length is the steps trained, and a run resumed from an epoch's checkpoint
(`--resume`) continues at the step after it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from jestcurate.errors import JCError, first_line
from jestcurate.io.reader import IMAGE_EXTS, load_image
from jestcurate.io.store import read_json, require_selection_images
from jestcurate.model.openclip import _open_clip
from jestcurate.trainer.loader import Sample, SelectionBatches, this_worker

# open_clip_torch releases this launcher is tested with (the `openclip-train` extra pins them).
TESTED_OPEN_CLIP = ("3.3.0",)

# Flags that would give open_clip_train training data of its own, read shuffled.
DATA_FLAGS = (
    "--train-data",
    "--train-data-upsampling-factors",
    "--dataset-type",
    "--dataset-resampled",
)

log = logging.getLogger("jestcurate.openclip_train")


def _parser() -> argparse.ArgumentParser:
    # argparse, not typer: the launcher forwards every other flag to open_clip_train's own
    # argparse parser, as `torchrun -m open_clip_train.main` would get them.
    parser = argparse.ArgumentParser(
        prog="python -m jestcurate.openclip_train",
        description=(
            "Run open_clip_train's main on a selection's batches, one manifest step per "
            "optimizer step. Every other flag is open_clip_train's (see python -m "
            "open_clip_train.main --help); run it under torchrun as open_clip_train is."
        ),
    )
    parser.add_argument(
        "--selection",
        nargs="+",
        required=True,
        metavar="DIR",
        help="select's output folder(s); several are trained one after another, in order "
        "(selections with successive seeds, for more steps than one selection holds)",
    )
    parser.add_argument(
        "--selection-source",
        choices=("auto", "export", "original"),
        default="auto",
        help="read samples from the export (select --export) or from the source tars the "
        "selection was made from (local, uncompressed); auto: the export where finished",
    )
    parser.add_argument(
        "--record-steps",
        metavar="DIR",
        help="append the keys each optimizer step trained on to DIR/rank-NNN.jsonl (one JSON "
        "line per step and rank: step, keys): an audit that the batches survived",
    )
    return parser


@dataclass(frozen=True)
class Plan:
    """What the launcher trains: the selections' steps, cut into open_clip_train's epochs."""

    selections: tuple[Path, ...]
    sources: tuple[str, ...]
    batch: int  # b, the selections' batch size
    steps: tuple[int, ...]  # each selection's steps
    steps_per_epoch: int
    epochs: int
    world_size: int
    accum: int
    micro: int  # samples per rank per micro-batch: open_clip's --batch-size
    record: Path | None

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

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
    if requested == "auto":
        return "export" if finished else "original"
    return requested


def _summary(selection: Path) -> dict[str, Any]:
    if not selection.is_dir():
        raise JCError(f"selection not found: {selection}")
    if not (selection / "summary.json").is_file():
        raise JCError(f"{selection} is not a finished selection (no summary.json)")
    return read_json(selection / "summary.json")


def _steps_per_epoch(args: argparse.Namespace, batch: int, total: int) -> int:
    epochs = int(args.epochs)
    if epochs < 1:
        raise JCError(f"--epochs must be at least 1, not {epochs}")
    if args.train_num_samples is not None:
        n = int(args.train_num_samples)
        if n <= 0 or n % batch:
            lower, upper = max(batch, n // batch * batch), (n // batch + 1) * batch
            raise JCError(
                f"--train-num-samples {n} is not a whole number of the selection's batches of "
                f"{batch}: pass {lower} or {upper} (an epoch is that many samples / {batch} steps)"
            )
        per_epoch = n // batch
    else:
        per_epoch = total // epochs
        if per_epoch == 0:
            raise JCError(f"--epochs {epochs} is more than the selection's {total} steps")
    if per_epoch * epochs > total:
        raise JCError(
            f"--epochs {epochs} × {per_epoch} steps = {per_epoch * epochs} steps, but the "
            f"selection holds {total}: lower --epochs or --train-num-samples, or add a selection "
            "made with another --seed"
        )
    return per_epoch


def plan(ours: argparse.Namespace, theirs: argparse.Namespace, world_size: int) -> Plan:
    """Check that the numbers keep every batch, before anything is built or trained."""
    given = [flag for flag in DATA_FLAGS if _given(theirs, flag)]
    if given:
        raise JCError(
            f"{' and '.join(given)}: the selection is the training data, and open_clip_train "
            "would read these shuffled; drop them (--val-data still works)"
        )
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
    steps = tuple(int(s["counts"]["steps"]) for s in summaries)
    per_epoch = _steps_per_epoch(theirs, batch, sum(steps))
    return Plan(
        selections=selections,
        sources=sources,
        batch=batch,
        steps=steps,
        steps_per_epoch=per_epoch,
        epochs=int(theirs.epochs),
        world_size=world_size,
        accum=accum,
        micro=int(theirs.batch_size),
        record=Path(ours.record_steps) if ours.record_steps else None,
    )


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    return value not in (None, False, "", "auto")


def _sample_key(sample: Sample) -> str:
    """The manifest's key of a sample: an exported sample carries it as jestcurate.source_key."""
    if "json" in sample:
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, KeyError):
            return str(json.loads(sample["json"])["jestcurate"]["source_key"])
    return str(sample["__key__"])


class StepDataset(torch.utils.data.IterableDataset):
    """This rank's micro-batches of one epoch's manifest steps, in order, as (images, texts,
    step, keys); DataLoader worker w takes micro-batches w, w+W, ..., so order holds."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        epoch: Any,
    ) -> None:
        self.plan = plan
        self.readers = [
            SelectionBatches(sel, source=src, rank=rank, world_size=plan.world_size)
            for sel, src in zip(plan.selections, plan.sources, strict=True)
        ]
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.epoch = epoch  # open_clip's SharedEpoch: set in the main process, read by workers

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.accum

    def collate(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = [], []
        for sample in samples:
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None or "txt" not in sample:
                raise JCError(f"sample {sample['__key__']} has no image or no caption")
            images.append(self.preprocess(load_image(data)))
            captions.append(sample["txt"].decode("utf-8"))
        return torch.stack(images), self.tokenizer(captions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[str]]]:
        worker, workers = this_worker()
        first = self.epoch.get_value() * self.plan.steps_per_epoch
        micros = range(first * self.plan.accum, first * self.plan.accum + len(self))
        for m in micros[worker::workers]:
            step, part = divmod(m, self.plan.accum)
            selection, local = self.plan.locate(step)
            samples = self.readers[selection].batch(local)
            samples = samples[part * self.plan.micro : (part + 1) * self.plan.micro]
            images, texts = self.collate(samples)
            yield images, texts, step, [_sample_key(s) for s in samples]


class StepLoader:
    """What open_clip_train's train_one_epoch iterates: (images, texts) per micro-batch, with
    the `num_batches` and `num_samples` it reads; it notes each batch's step and keys for
    --record-steps."""

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        plan: Plan,
        pending: list[tuple[int, list[str]]] | None,
    ) -> None:
        self.loader = loader
        self.num_batches = plan.steps_per_epoch * plan.accum
        self.num_samples = plan.steps_per_epoch * plan.batch
        self.pending = pending

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, texts, step, keys in self.loader:
            if self.pending is not None:
                self.pending.append((step, keys))
            yield images, texts


class Recorder:
    """Writes, after each optimizer step, the steps and keys of the batches taken since the
    last one (a step the gradient scaler skipped shows as `"updated": false`)."""

    def __init__(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank:03d}.jsonl"
        self.pending: list[tuple[int, list[str]]] = []

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        by_step: dict[int, list[str]] = {}
        for step, keys in self.pending:
            by_step.setdefault(step, []).extend(keys)
        self.pending.clear()
        last = max(by_step, default=None)
        with open(self.path, "a") as f:
            for step, keys in by_step.items():
                line = {"step": step, "keys": keys}
                if step != last:
                    line["updated"] = False
                f.write(json.dumps(line) + "\n")


def _builder(plan: Plan, pending: list[tuple[int, list[str]]] | None) -> Callable[..., Any]:
    """open_clip_train's dataset-builder signature, building the selection's step loader."""

    def build(
        args: Any, preprocess: Any, is_train: bool, epoch: int = 0, tokenizer: Any = None
    ) -> Any:
        from open_clip_train.data import DataInfo, SharedEpoch

        if not is_train:
            raise JCError("the selection is training data; pass --val-data for validation")
        if args.world_size != plan.world_size:  # the launcher planned with the environment's
            raise JCError(
                f"open_clip_train runs {args.world_size} ranks, the environment said "
                f"{plan.world_size}: start the launcher as you start open_clip_train (torchrun)"
            )
        shared = SharedEpoch(epoch)
        dataset = StepDataset(plan, args.rank, preprocess, tokenizer, shared)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        return DataInfo(dataloader=StepLoader(loader, plan, pending), shared_epoch=shared)

    return build


@contextlib.contextmanager
def _training_data(marker: str, build: Callable[..., Any]) -> Iterator[None]:
    """open_clip_train's get_data asks get_dataset_fn for a builder per split: for the training
    data (`--train-data` set to `marker`) it gets the launcher's."""
    import open_clip_train.data as data

    original = data.get_dataset_fn

    def get_dataset_fn(data_path: str, dataset_type: str) -> Callable[..., Any]:
        return build if data_path == marker else original(data_path, dataset_type)

    data.get_dataset_fn = get_dataset_fn
    try:
        yield
    finally:
        data.get_dataset_fn = original


@contextlib.contextmanager
def _ddp_on_cpu() -> Iterator[None]:
    """open_clip_train (3.3.0) wraps the model in DistributedDataParallel with
    `device_ids=[device]` on every device, which torch refuses for a CPU module; on a CPU (gloo
    runs, as the tests run) the launcher drops `device_ids`, as torch asks. GPUs are untouched."""
    parallel = torch.nn.parallel
    original = parallel.DistributedDataParallel

    class CpuTolerantDDP(original):  # type: ignore[misc, valid-type]
        def __init__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            ids = kwargs.get("device_ids")
            if ids and all(torch.device(d).type == "cpu" for d in ids):
                kwargs["device_ids"] = None
            super().__init__(module, *args, **kwargs)

    parallel.DistributedDataParallel = CpuTolerantDDP
    try:
        yield
    finally:
        parallel.DistributedDataParallel = original


def _check_trainer() -> str:
    """Refuse an open_clip_train whose training data would not come from the launcher (its
    get_data no longer building through get_dataset_fn); warn on an untested release."""
    from importlib.metadata import version

    try:
        import open_clip_train.data as data
        import open_clip_train.main as trainer
    except ImportError as exc:
        raise JCError(
            f"cannot import open_clip_train ({exc}): pip install 'jestcurate[openclip-train]'"
        ) from None
    release = version("open_clip_torch")
    if "get_dataset_fn" not in data.get_data.__code__.co_names or trainer.get_data is not (
        data.get_data
    ):
        raise JCError(
            f"open_clip_train {release} builds its training data another way, so the launcher "
            "cannot give it the selection's batches (and it would read them shuffled); tested "
            f"with open_clip_torch {', '.join(TESTED_OPEN_CLIP)}: pip install "
            "'jestcurate[openclip-train]'"
        )
    if release not in TESTED_OPEN_CLIP:
        print(
            f"jestcurate: open_clip_torch {release} is untested with this launcher (tested: "
            f"{', '.join(TESTED_OPEN_CLIP)}); its data path checks out",
            file=sys.stderr,
        )
    return release


def _describe(plan: Plan) -> str:
    trained = plan.steps_per_epoch * plan.epochs
    ranks = f"{plan.world_size} rank(s) × {plan.micro}"
    if plan.accum > 1:
        ranks += f" × {plan.accum} micro-batches"
    unused = plan.total_steps - trained
    tail = f"; the last {unused} step(s) not trained" if unused else ""
    return (
        f"jestcurate: {trained} steps of {plan.batch} from {len(plan.selections)} selection(s), "
        f"as {plan.epochs} epoch(s) of {plan.steps_per_epoch} steps ({ranks}){tail}"
    )


def run(argv: Sequence[str]) -> int:
    """Plan, then run open_clip_train's main with the selection as its training data."""
    argv = list(argv)
    if argv[:1] == ["--"]:  # torchrun needs it before flags that abbreviate its own (--logs)
        argv = argv[1:]
    ours, rest = _parser().parse_known_args(argv)
    _check_trainer()
    _open_clip()  # the project's model configs (jc-tiny, ...) for --model
    from open_clip_train.distributed import world_info_from_env
    from open_clip_train.main import main as open_clip_main
    from open_clip_train.params import parse_args

    theirs = parse_args(rest)
    _, rank, world_size = world_info_from_env()
    p = plan(ours, theirs, world_size)
    recorder = Recorder(p.record, rank) if p.record else None
    hook = register_optimizer_step_post_hook(recorder) if recorder else None
    if rank == 0:
        print(_describe(p), file=sys.stderr)
    marker = str(p.selections[0])
    try:
        with (
            _training_data(marker, _builder(p, recorder.pending if recorder else None)),
            _ddp_on_cpu(),
        ):
            result = open_clip_main([*rest, "--train-data", marker])
    finally:
        if hook is not None:
            hook.remove()
    return 0 if result in (None, 0) else 1


def _message(exc: JCError) -> str:
    """A JCError raised in a DataLoader worker comes back wrapped in the worker's traceback."""
    text = str(exc)
    if text.startswith("Caught JCError"):
        return text.strip().splitlines()[-1].split("JCError: ", 1)[-1]
    return first_line(exc)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m jestcurate.openclip_train`: expected errors are one line from rank 0, exit 2."""
    import os

    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except JCError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {_message(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
