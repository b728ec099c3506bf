"""`eval`: does a selection train better than the pool, on your own data?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jestcurate.cli.app import app, config_from, one_line_errors
from jestcurate.cli.options import Device, NumTasks, Precision, TaskIndex


@app.command(
    name="eval",
    short_help="Train one recipe on the pool and on each selection; compare on eval sets.",
)
@one_line_errors
def eval_(
    pool: Annotated[
        list[str],
        typer.Argument(
            help="The pool: its shards (paths, globs, {a..b} or @list.txt, as score takes them) "
            "or its score set. The uniform arm trains on it; every selection must come from it.",
            show_default=False,
            metavar="POOL",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for units/ and results.")],
    selection: Annotated[
        list[str] | None,
        typer.Option(
            "--selection",
            "-s",
            help="An arm (repeat): a selection, trained in step order; or NAME=SEL1,SEL2,... to "
            "train several selections one after another (select's --seed 0, 1, ...: fresh "
            "super-batches, as a learner that keeps filtering sees them).",
            metavar="[NAME=]SEL[,SEL...]",
        ),
    ] = None,
    eval_sets: Annotated[
        list[str] | None,
        typer.Option(
            "--eval",
            help="An evaluation set (repeat): zero-shot classification in clip_benchmark's "
            "WebDataset layout, or a clean image-text split in WebDataset form (retrieval).",
        ),
    ] = None,
    scale: Annotated[
        str | None,
        typer.Option(
            help="A recipe preset: tiny (the shipped CPU model, minutes), or DataComp's small, "
            "medium or large (ViT-B, batch 4096 or 8192); options below override it."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model to train (tiny: jc-tiny).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps per arm and seed (tiny: 300).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help="Must equal every selection's b (tiny: 32)."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate, cosine (tiny: 1e-3).")
    ] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up steps (tiny: 20).")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay (tiny: 0.1).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate every K steps (tiny: 25).")
    ] = None,
    precision: Precision = None,
    seeds: Annotated[int, typer.Option(help="Seeds per arm (0, 1, ...).")] = 2,
    eval_samples: Annotated[
        int | None,
        typer.Option(
            help="Evaluate on each set's first N samples (all by default). The sets are held "
            "decoded in memory: 3 x H x W x 4 bytes a sample, 0.6 MB at 224 px."
        ),
    ] = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            help="A `jestcurate decontaminate` output (repeat): the uniform arm skips the pool "
            "rows it names (selections apply it with select --exclude).",
        ),
    ] = None,
    device: Device = "auto",
    workers: Annotated[int, typer.Option(help="Data loading processes per arm.")] = 1,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
) -> None:
    """Train a fresh model with one recipe on the uniform pool and on each selection (its batches
    in step order), for each seed, and evaluate every K steps on each set. Writes OUT/units/
    (one file per arm and seed: a rerun or another array task skips it), then, once all are
    done, results.json, results.md and curves.png: per arm the final metrics (mean ± std), the
    steps to the uniform arm's final value and the speed-up, and the FLOPs.

    Exit status: 0 done (or this task's units done), 2 bad input."""
    given = dict(locals())
    from jestcurate.pipelines.evaluate import config as config_mod
    from jestcurate.pipelines.evaluate import job

    recipe = config_mod.with_scale(
        config_mod.Recipe(), scale, model=model, steps=steps, batch_size=batch_size, lr=lr,
        warmup=warmup, weight_decay=weight_decay, eval_every=eval_every, precision=precision,
    )  # fmt: skip
    cfg = config_from(
        config_mod.EvalConfig, given, pool=tuple(pool),
        selections=tuple(config_mod.parse_arm(s) for s in selection or ()),
        eval_sets=tuple(eval_sets or ()), recipe=recipe, seeds=tuple(range(seeds)),
        exclude=tuple(exclude or ()),
    )  # fmt: skip
    job.print_summary(job.run(cfg))
