"""`score` and `slurm score`: shards through a frozen open_clip model into a score set."""

from __future__ import annotations

from typing import Annotated

import typer

from jestcurate.cli.app import app, config_from, one_line_errors, slurm_app
from jestcurate.cli.options import (
    BatchSize,
    Decode,
    Device,
    Inputs,
    Model,
    NumTasks,
    Precision,
    Pretrained,
    Role,
    ScoreOut,
    SlurmAccount,
    SlurmExtra,
    SlurmMaxArraySize,
    SlurmMaxConcurrent,
    SlurmMem,
    SlurmPartition,
    SlurmQos,
    SlurmSubmit,
    SlurmTime,
    TaskIndex,
    Workers,
)
from jestcurate.io import remote


@app.command(short_help="Score shards with a frozen open_clip model into a Parquet score set.")
@one_line_errors
def score(
    inputs: Inputs,
    out: ScoreOut,
    model: Model,
    pretrained: Pretrained = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    precision: Precision = None,
    workers: Workers = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    role: Role = "reference",
    decode: Decode = "auto",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check each finished part's sha256 against its marker (the size is always "
            "checked); a part that does not match is scored again.",
        ),
    ] = False,
) -> None:
    """Score shards with a frozen open_clip model: embeddings, clip_score and ref_loss per sample,
    one Parquet part per shard under OUT/parts. Rerunning skips finished shards and retries
    failed ones; array tasks split the shards between them. Runs sharing OUT (overlapping cron
    runs) claim shards, never score one twice, and each exits once every shard is settled.

    Exit status: 0 all shards ok, 1 some shards failed (the rest are written), 2 bad input."""
    given = dict(locals())
    from jestcurate.pipelines.score.cpu import sleeping_openmp

    sleeping_openmp(device, workers)  # before torch loads
    from jestcurate.pipelines import score as score_mod

    local, url = remote.score_out(out)
    cfg = config_from(score_mod.ScoreConfig, given, inputs=tuple(inputs), out=local, upload_to=url)
    with score_mod.ScoreProgress() as progress:
        report = score_mod.run(cfg, progress)
    score_mod.print_summary(report)
    if report.failed:
        raise typer.Exit(1)


@slurm_app.command("score", short_help="Write (and submit) an sbatch array script for score.")
@one_line_errors
def slurm_score(
    inputs: Inputs,
    out: ScoreOut,
    model: Model,
    pretrained: Pretrained = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    precision: Precision = None,
    workers: Workers = None,
    role: Role = "reference",
    decode: Decode = "auto",
    num_tasks: Annotated[
        int | None, typer.Option(help="Array tasks (default: shards / --shards-per-task).")
    ] = None,
    shards_per_task: Annotated[
        int, typer.Option(help="Shards per task when --num-tasks is not given.")
    ] = 16,
    partition: SlurmPartition = None,
    gpus_per_task: Annotated[int, typer.Option(help="GPUs per task (0: none).")] = 1,
    cpus_per_task: Annotated[int, typer.Option(help="CPU cores per task (decoding).")] = 8,
    mem: SlurmMem = None,
    time: SlurmTime = "24:00:00",
    max_concurrent: SlurmMaxConcurrent = None,
    account: SlurmAccount = None,
    qos: SlurmQos = None,
    max_array_size: SlurmMaxArraySize = None,
    sbatch: SlurmExtra = None,
    submit: SlurmSubmit = False,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help="Resubmit only the tasks whose shards are not all done (same plan as before).",
        ),
    ] = False,
) -> None:
    """Write OUT/slurm/score.sbatch, an array job running `jestcurate score` per task, and print
    its path; with --submit, submit it (as several array jobs if the tasks pass the cluster's
    MaxArraySize). Tasks requeue safely after node failures; --retry resubmits only the tasks
    that still have shards to do."""
    given = dict(locals())
    from jestcurate import ui
    from jestcurate.scale import slurm

    local, url = remote.score_out(out)
    opts = config_from(slurm.SlurmOptions, given, extra=tuple(sbatch or ()))
    fixed = {"inputs": tuple(inputs), "out": local, "upload_to": url, "slurm": opts}
    cfg = config_from(slurm.ScoreArrayConfig, given, **fixed)
    array = slurm.score_array(cfg, written=ui.say)
    slurm.print_score_array(array)
