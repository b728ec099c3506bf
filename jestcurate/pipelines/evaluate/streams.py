"""Each arm's training batches: the pool uniformly (pipelines/train's shuffled stream, as
`jestcurate train` reads it, less the rows of any --exclude), or its selections' batches in
step order, one selection after another (trainer/loader's SelectionBatches, exported shards or
the source tars), both through the same training transform and tokenizer. Selections shorter
than the recipe are trained again from the first one's first step, as an epoch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from jestcurate.errors import JCError
from jestcurate.io.files import read_json
from jestcurate.io.shards import expand_inputs
from jestcurate.model.openclip import LoadedModel
from jestcurate.pipelines.evaluate.config import Arm
from jestcurate.trainer.loader import SelectionBatches, export_meta

Batch = tuple[torch.Tensor, torch.Tensor]


def pool_shards(pool: tuple[str, ...]) -> list[str]:
    """The pool's shard URLs: INPUTS as `score` takes them, or a score set's shards (its
    completion markers name them)."""
    if len(pool) == 1 and (Path(pool[0]) / "meta.json").is_file():
        done = sorted((Path(pool[0]) / "done").glob("*.json"))
        shards = [str(read_json(p).get("shard", "")) for p in done]
        shards = [s for s in shards if s]
        if not shards:
            raise JCError(f"{pool[0]} is a score set with no scored shard")
        return shards
    return expand_inputs(pool)


def check_from_pool(selection: Path, shards: list[str]) -> None:
    """A selection must come from this pool: every source shard of its batches among its
    shards (compared as resolved paths)."""
    import pyarrow.parquet as pq

    mine = {os.path.realpath(s) for s in shards}
    manifest = pq.read_table(selection / "manifest.parquet", columns=["shard"])
    used = {os.path.realpath(s) for s in manifest.column("shard").unique().to_pylist()}
    foreign = sorted(used - mine)
    if foreign:
        raise JCError(
            f"{selection} was selected from another pool: its batches come from {foreign[0]}"
            f"{f' and {len(foreign) - 1} more shards' if len(foreign) > 1 else ''}, which the "
            "pool does not hold"
        )


def uniform(
    shards: list[str], model: LoadedModel, preprocess: Any, b: int, seed: int, workers: int,
    skip: dict[str, Any] | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """Endless shuffled full batches of the pool, epoch after epoch (seeded per epoch), without
    the rows `skip` names (resolved shard path -> sorted sample indexes)."""
    from jestcurate.pipelines.train import batches

    epoch = 0
    while True:
        stream = batches(shards, preprocess, model.tokenizer, b, 2000, seed * 1000 + epoch, skip)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers,
            generator=torch.Generator().manual_seed(seed * 1000 + epoch),
        )  # fmt: skip
        got = 0
        for images, tokens, _ in loader:
            if images is not None:
                got += 1
                yield images, tokens
        if not got:
            less = " once --exclude's rows are left out" if skip else ""
            raise JCError(f"the pool holds less than one batch of {b} valid samples{less}")
        epoch += 1


def selections(paths: tuple[Path, ...], model: LoadedModel, preprocess: Any, seed: int,
               workers: int) -> Iterator[Batch]:  # fmt: skip
    """Endless batches of the selections in step order, one after another (all again once all
    are used)."""
    from jestcurate.trainer.openclip.steps import Decode

    decode = Decode(preprocess, model.tokenizer)
    passes = 0
    while True:  # each pass over a selection seeded anew, so repeats get other augmentations
        for path in paths:
            source = "export" if export_meta(path) is not None else "original"
            batches = SelectionBatches(path, source=source, rank=0, world_size=1, transform=decode)
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, num_workers=workers,
                generator=torch.Generator().manual_seed(seed * 1000 + passes),
            )  # fmt: skip
            yield from loader
            passes += 1


def excluded_rows(exclude: tuple[Path, ...], shards: list[str]) -> dict[str, Any] | None:
    """The rows the --exclude outputs name, by shard_location. Each output must have searched
    the whole pool: the score set it was made from holds every pool shard (an output of
    another pool, or of a part of this one, would clear the warning for shards never searched).
    """
    if not exclude:
        return None
    import numpy as np

    from jestcurate.pipelines.decontam import load_excluded
    from jestcurate.pipelines.train.stream import shard_location

    mine = {shard_location(s) for s in shards}
    found: dict[str, Any] = {}
    for directory in exclude:
        rows_by_shard = load_excluded(directory)
        searched = _searched_shards(directory)
        unsearched = sorted(mine - searched)
        if unsearched:
            raise JCError(
                f"--exclude {directory} did not search the whole pool: {unsearched[0]}"
                f"{f' and {len(unsearched) - 1} more shards' if len(unsearched) > 1 else ''} "
                "are not in the score set it was made from; decontaminate that pool's score set"
            )
        for shard, rows in rows_by_shard.items():
            path = shard_location(shard)
            if path not in mine:
                raise JCError(
                    f"--exclude {directory} was made from another pool: it names {shard}, "
                    "which the pool does not hold"
                )
            found[path] = np.union1d(found[path], rows) if path in found else rows
    return found


def _searched_shards(directory: Path) -> set[str]:
    """The shards of the score set a decontaminate output was made from."""
    from jestcurate.pipelines.train.stream import shard_location

    try:
        made_from = str(read_json(directory / "summary.json")["scores"]["path"])
        return {shard_location(s) for s in pool_shards((made_from,))}
    except (OSError, ValueError, KeyError, TypeError, JCError) as exc:
        message = f"--exclude {directory}: cannot tell which shards it searched ({exc})"
        raise JCError(message) from None


def batches_of(
    arm: Arm, shards: list[str], model: LoadedModel, preprocess: Any, b: int, seed: int,
    workers: int, skip: dict[str, Any] | None = None,
) -> Iterator[Batch]:  # fmt: skip
    if arm.uniform:
        return uniform(shards, model, preprocess, b, seed, workers, skip)
    return selections(arm.selections, model, preprocess, seed, workers)
