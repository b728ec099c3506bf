"""`train`, `demo` and `synth`: models and data for trying jestcurate without downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jestcurate.cli.app import app, config_from, one_line_errors
from jestcurate.errors import JCError


@app.command(short_help="Train an open_clip reference or proxy learner into a checkpoint.")
@one_line_errors
def train(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Training shards, as for score: a clean guide set for a reference, a slice "
            "of the raw pool for a proxy learner.",
            show_default=False,
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip model name or model-config .json.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint to write (CKPT; CKPT.json beside it).")
    ],
    pretrained: Annotated[
        str | None,
        typer.Option(help="Start from this open_clip tag or checkpoint (default: from scratch)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps to train.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the inputs (or --steps).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (at most a fifth of the run).")] = 20,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 autocast (default fp32 CPU, bf16 CUDA).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
    save_every: Annotated[int, typer.Option(help="Save resume state every N steps.")] = 100,
) -> None:
    """Train an open_clip model contrastively (its own loss: CLIP softmax, or SigLIP sigmoid for
    models with a logit bias) and write a checkpoint that `score --pretrained` and open_clip
    load. Rerunning continues from the last saved step; a finished run is not redone."""
    from jestcurate import ui
    from jestcurate.pipelines import train as train_mod

    cfg = config_from(train_mod.TrainConfig, locals(), inputs=tuple(inputs))
    with ui.training_progress() as on_step:
        report = train_mod.run(cfg, on_step)
    train_mod.print_summary(report)


@app.command(short_help="Run the whole JEST loop offline on a built-in synthetic corpus.")
@one_line_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for everything the demo makes.")
    ] = (Path("demo")),
    size: Annotated[
        str, typer.Option(help="small (about 2 minutes on 2 CPU cores) or medium (about 10).")
    ] = "small",
) -> None:
    """Run the whole JEST loop offline on a synthetic corpus: generate a guide split and a noisy
    pool, train a tiny reference and a proxy learner, score the pool with both, select with jest
    (learnability) and random, export both, and show which noise each kept."""
    from jestcurate import ui
    from jestcurate.pipelines import demo as demo_mod
    from jestcurate.pipelines.score import ScoreProgress

    if size not in demo_mod.SIZES:
        raise JCError(f"unknown size {size!r}; use {', '.join(demo_mod.SIZES)}")
    report = demo_mod.run(out, demo_mod.SIZES[size], ui.training_progress, ScoreProgress)
    demo_mod.print_summary(report)


@app.command(short_help="Write a synthetic img2dataset-style corpus.")
@one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write NNNNN.tar shards into.")],
    shards: Annotated[int, typer.Option(help="Number of shards.")] = 4,
    samples: Annotated[int, typer.Option(help="Samples per shard.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same samples.")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
    noise: Annotated[
        str, typer.Option(help="clean, or noisy (mismatched, junk, blank, duplicate pairs).")
    ] = "clean",
    first_shard: Annotated[int, typer.Option(help="Number of the first shard.")] = 0,
) -> None:
    """Write a synthetic img2dataset-style corpus (coloured shapes with captions) for trying
    jestcurate without downloads. Each sample's .json records its noise kind and true class."""
    from jestcurate.pipelines import synth as synth_mod

    if noise not in synth_mod.PRESETS:
        raise JCError(f"unknown noise preset {noise!r}; use {', '.join(synth_mod.PRESETS)}")
    if shards < 1 or samples < 1 or image_size < 8:
        raise JCError("--shards and --samples must be at least 1, --image-size at least 8")
    noise_mix = synth_mod.PRESETS[noise]
    spec = synth_mod.CorpusSpec(shards, samples, seed, image_size, noise_mix, first_shard)
    paths = synth_mod.write_corpus(out, spec)
    typer.echo(f"wrote {len(paths)} shards of {samples} samples to {out}")
