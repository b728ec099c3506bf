"""`python -m jestcurate.openclip_train`: open_clip_train's own `main`, with the training data
taken from selections (or chosen online), one manifest step per optimizer step.

Every flag but the launcher's own goes to open_clip_train, which runs unchanged: its model,
optimizer, losses, schedule, precision, logging, checkpoints and evaluation. Three narrow
patches, each undone when main returns:
* `open_clip_train.data.get_dataset_fn` hands get_data the launcher's builder (steps.py) for the
  training data (`--train-data` is set to the first selection), open_clip's own for the rest;
* `open_clip_train.main.create_model_and_transforms` is watched for the model it makes (online
  JEST scores with it);
* on a CPU only, DistributedDataParallel gets no `device_ids` (see _ddp_on_cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from jestcurate.errors import JCError, first_line
from jestcurate.model.openclip import _open_clip
from jestcurate.trainer.loader import INDEXES_KEPT
from jestcurate.trainer.openclip.online import candidates, online_batches
from jestcurate.trainer.openclip.plan import Plan, check_run_folder, plan
from jestcurate.trainer.openclip.steps import (
    Decode,
    Pending,
    Recorder,
    StepDataset,
    StepLoader,
    data_loader,
)

# open_clip_torch releases this launcher is tested with (the `openclip-train` extra pins them).
TESTED_OPEN_CLIP = ("3.3.0",)


def _parser() -> argparse.ArgumentParser:
    # argparse, not typer: the launcher forwards every other flag to open_clip_train's own
    # argparse parser, as `torchrun -m open_clip_train.main` would get them.
    parser = argparse.ArgumentParser(
        prog="python -m jestcurate.openclip_train",
        description=(
            "Run open_clip_train's main on a selection's batches, one manifest step per "
            "optimizer step, each rank its slice; or, with --online, on batches the model "
            "being trained picks from each super-batch. Every other flag is open_clip_train's "
            "(python -m open_clip_train.main --help). Under torchrun, put -- before the flags: "
            "torchrun ... -m jestcurate.openclip_train -- --selection sel/ --logs logs/ ..."
        ),
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--selection",
        nargs="+",
        metavar="DIR",
        help="select's output folder(s); several are trained one after another, in order "
        "(selections with successive seeds, for more steps than one selection holds)",
    )
    data.add_argument(
        "--online",
        metavar="SCORES",
        help="online JEST: a reference score set (jestcurate score) whose rows are the "
        "candidates; the model being trained picks b = --batch-size × ranks of each "
        "super-batch by learnability",
    )
    parser.add_argument(
        "--selection-source",
        choices=("auto", "export", "original"),
        default="auto",
        help="read samples from the export (select --export) or from the source tars the "
        "selection was made from (local, uncompressed); auto: the export where finished",
    )
    parser.add_argument(
        "--online-ratio",
        type=float,
        help="--online: the kept fraction; super-batches hold b / ratio (default 0.2)",
    )
    parser.add_argument(
        "--online-seed",
        type=int,
        help="--online: the candidates' permutation seed, as select --seed (default 0)",
    )
    parser.add_argument(
        "--record-steps",
        metavar="DIR",
        help="append the keys each optimizer step trained on to DIR/rank-NNN.jsonl (one JSON "
        "line per step and rank: step, keys): an audit that the batches survived",
    )
    return parser


def builder(plan: Plan, pending: Pending | None, model: Callable[[], Any]) -> Callable[..., Any]:
    """A builder with the signature of open_clip_train's (get_dataset_fn's result) for the
    training split; `model` returns the model being trained and its evaluation transform
    (online JEST scores with them)."""

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
        decode = Decode(preprocess, tokenizer)
        if plan.online is not None:
            batches = online_batches(plan, args, decode, shared, model())
        else:
            batches = data_loader(StepDataset(plan, args.rank, decode, shared), args.workers)
        return DataInfo(dataloader=StepLoader(batches, plan, pending), shared_epoch=shared)

    return build


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` for the duration of the block, then what it was."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _training_data(marker: str, build: Callable[..., Any]) -> Iterator[None]:
    """open_clip_train's get_data asks get_dataset_fn for a builder per split: for the training
    data (`--train-data` set to `marker`) it gets the launcher's."""
    import open_clip_train.data as data

    original = data.get_dataset_fn

    def get_dataset_fn(data_path: str, dataset_type: str) -> Callable[..., Any]:
        return build if data_path == marker else original(data_path, dataset_type)

    with _replaced(data, "get_dataset_fn", get_dataset_fn):
        yield


@contextlib.contextmanager
def _watch_model(made: list[tuple[Any, Any]]) -> Iterator[None]:
    """Note the first model open_clip_train's main creates, the one it trains (a --distill
    teacher comes second), with its evaluation transform."""
    import open_clip_train.main as trainer

    original = trainer.create_model_and_transforms

    def create(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if not made:
            made.append((result[0], result[2]))
        return result

    with _replaced(trainer, "create_model_and_transforms", create):
        yield


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

    with _replaced(parallel, "DistributedDataParallel", CpuTolerantDDP):
        yield


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
    return release


def _describe(plan: Plan) -> str:
    ranks = f"{plan.world_size} rank(s) × {plan.micro}"
    if plan.accum > 1:
        ranks += f" × {plan.accum} micro-batches"
    unused = plan.total_steps - plan.trained_steps
    tail = f"; the last {unused} step(s) not trained" if unused else ""
    source = (
        f"chosen online from {plan.online.reference} (ratio {plan.online.ratio})"
        if plan.online
        else f"from {len(plan.selections)} selection(s)"
    )
    line = (
        f"jestcurate: {plan.trained_steps} steps of {plan.batch} {source}, as {plan.epochs} "
        f"epoch(s) of {plan.steps_per_epoch} steps ({ranks}){tail}"
    )
    if plan.by_position > INDEXES_KEPT:
        line += (
            f"\njestcurate: reading samples by position from {plan.by_position} source tars; "
            f"each process keeps {INDEXES_KEPT} tar indexes, so most reads re-scan a tar's "
            "headers: export the selection (select --export) for speed"
        )
    elif plan.by_position:
        line += f" (read by position from {plan.by_position} source tars)"
    return line


def run(argv: Sequence[str]) -> int:
    """Plan, then run open_clip_train's main with the launcher's training data."""
    global _started
    argv = list(argv)
    if argv[:1] == ["--"]:  # torchrun needs it before flags that abbreviate its own (--logs)
        argv = argv[1:]
    ours, rest = _parser().parse_known_args(argv)
    release = _check_trainer()
    _open_clip()  # the project's model configs (jc-tiny, ...) for --model
    from open_clip_train.distributed import world_info_from_env
    from open_clip_train.main import main as open_clip_main
    from open_clip_train.params import parse_args

    theirs = parse_args(rest)
    _, rank, world_size = world_info_from_env()
    p = plan(ours, theirs, world_size)
    check_run_folder(p, theirs, write=rank == 0)
    if p.online is not None:
        candidates(p, rank, world_size)  # the row cache, before any rank waits on another
    if rank == 0:
        if release not in TESTED_OPEN_CLIP:
            print(
                f"jestcurate: open_clip_torch {release} is untested with this launcher (tested: "
                f"{', '.join(TESTED_OPEN_CLIP)}); its data path checks out",
                file=sys.stderr,
            )
        print(_describe(p), file=sys.stderr)
    recorder = Recorder(p.record, rank) if p.record else None
    hook = register_optimizer_step_post_hook(recorder) if recorder else None
    marker = str(p.selections[0] if p.selections else p.online.reference)  # type: ignore[union-attr]
    made: list[tuple[Any, Any]] = []
    build = builder(p, recorder.pending if recorder else None, lambda: made[0] if made else None)
    _started = True  # from here on, an error may be one rank's alone
    try:
        with _training_data(marker, build), _watch_model(made), _ddp_on_cpu():
            result = open_clip_main([*rest, "--train-data", marker])
    finally:
        if hook is not None:
            hook.remove()
    return 0 if result in (None, 0) else 1


# Set once planning is over: errors before it are the same on every rank (rank 0 says them),
# errors after it may be one rank's own (a bad sample, a changed tar), and that rank says them.
_started = False


def _rank() -> int:
    try:
        from open_clip_train.distributed import world_info_from_env

        return world_info_from_env()[1]
    except ImportError:
        return int(os.environ.get("RANK", "0"))


def _message(exc: JCError) -> str:
    """A JCError raised in a DataLoader worker comes back wrapped in the worker's traceback."""
    text = str(exc)
    if text.startswith("Caught JCError"):
        return text.strip().splitlines()[-1].split("JCError: ", 1)[-1]
    return first_line(exc)


def main(argv: Sequence[str] | None = None) -> None:
    """Expected errors are one line and exit 2: from rank 0 while planning, from the rank that
    met them once training began."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except JCError as exc:
        rank = _rank()
        if rank == 0 or _started:
            where = f"[rank {rank}] " if rank else ""
            print(f"error: {where}{_message(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
