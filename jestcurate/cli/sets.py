"""Commands on score sets and what is made from them: `import`, `status`, `verify`."""

from __future__ import annotations

from typing import Annotated

import typer

from jestcurate.cli.app import app, config_from, one_line_errors, slurm_app
from jestcurate.cli.options import (
    ImportEmbeddings,
    ImportFormat,
    ImportLoss,
    ImportOut,
    ImportPretrained,
    ImportShards,
    ImportSource,
    LogitBias,
    LogitScale,
    Model,
    NumTasks,
    Role,
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
)


@app.command(
    name="import", short_help="Make a score set from embeddings you already have (DataComp, ...)."
)
@one_line_errors
def import_(
    source: ImportSource,
    out: ImportOut,
    format: ImportFormat,
    model: Model,
    pretrained: ImportPretrained = None,
    embeddings: ImportEmbeddings = "l14",
    role: Role = "reference",
    logit_scale: LogitScale = None,
    logit_bias: LogitBias = None,
    loss: ImportLoss = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    shards: ImportShards = None,
) -> None:
    """Turn embeddings that already exist into a score set (meta.json, parts/, done/), so
    select, dedup, info, report and status work on it without running a model: re-normalised,
    stored as float16, clip_score and ref_loss computed as `score` computes them. Without
    --shards, one part per source file and no images: commands that need them (select
    --export, the loaders, report thumbnails) say so. With --shards, one part per downloaded
    shard, so export and the loaders read the samples; source rows never downloaded are
    counted. Rerunning skips finished parts; array tasks split them.

    Exit status: 0 all files imported, 1 some failed (the rest are written), 2 bad input."""
    from jestcurate.pipelines import importer

    cfg = config_from(importer.ImportConfig, locals(), shards=tuple(shards or ()))
    report = importer.run(cfg)
    importer.print_summary(report)
    if report.failed:
        raise typer.Exit(1)


@slurm_app.command("import", short_help="Write (and submit) an sbatch array script for import.")
@one_line_errors
def slurm_import(
    source: ImportSource,
    out: ImportOut,
    format: ImportFormat,
    model: Model,
    num_tasks: Annotated[
        int, typer.Option(help="Array tasks; task t imports files (or shards) t, t+N, ...")
    ],
    pretrained: ImportPretrained = None,
    embeddings: ImportEmbeddings = "l14",
    role: Role = "reference",
    logit_scale: LogitScale = None,
    logit_bias: LogitBias = None,
    loss: ImportLoss = None,
    shards: ImportShards = None,
    partition: SlurmPartition = None,
    gpus_per_task: Annotated[int, typer.Option(help="GPUs per task (import needs none).")] = 0,
    cpus_per_task: Annotated[int, typer.Option(help="CPU cores per task.")] = 8,
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
            help="Resubmit only the tasks with parts left to import (same plan as before).",
        ),
    ] = False,
) -> None:
    """Write OUT/slurm/import.sbatch, an array job running `jestcurate import` per task (its
    paths absolute), and print its path; with --submit, submit it (as several array jobs if the
    tasks pass the cluster's MaxArraySize). Tasks requeue safely after node failures; --retry
    resubmits only the tasks that still have files (or shards) to import."""
    given = dict(locals())
    from jestcurate import ui
    from jestcurate.pipelines import importer
    from jestcurate.scale import slurm
    from jestcurate.scale import slurm_import as slurm_import_mod

    job = config_from(importer.ImportConfig, given, shards=tuple(shards or ()), num_tasks=None)
    extra = tuple(sbatch or ())
    opts = config_from(slurm.SlurmOptions, given, extra=extra, job_name="jestcurate-import")
    cfg = config_from(slurm_import_mod.ImportArrayConfig, given, job=job, slurm=opts)
    array = slurm_import_mod.run(cfg, importer.targets, importer.unfinished_tasks, written=ui.say)
    slurm_import_mod.print_report(array)


@app.command(short_help="Where a score set, a selection or an export stands: what is left, why.")
@one_line_errors
def status(
    path: Annotated[
        str, typer.Argument(help="A score set (path or URL), a selection or its export.")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="The score run's INPUTS, to list the shards still pending."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 unless everything is done.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Compare each part's sha256 with its marker, not only its size."
        ),
    ] = False,
) -> None:
    """Done, failed (with reasons), damaged, running and, given the INPUTS, pending shards of a
    score set; a selection's array tasks with a round left (with their logs' last lines) and
    its Slurm jobs still queued; or the written and missing shards of an export."""
    import json as json_mod

    from jestcurate import ui
    from jestcurate.pipelines import status as status_mod

    found, complete = status_mod.read_status(path, inputs or (), full=verify)
    if json_out:
        ui.stdout.print_json(json_mod.dumps(found))
    else:
        status_mod.print_status(found)
    if check and not complete:
        raise typer.Exit(1)


@app.command(short_help="Check a score set, selection or dedup output against its records.")
@one_line_errors
def verify(
    path: Annotated[
        str,
        typer.Argument(
            help="A score set (a path or a URL), a selection (and its export) or a dedup output."
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every file against its marker (score sets: size and sha256 of each part; parts
    with no marker, markers with no part) or against the sizes and hashes in summary.json and
    shards/export.json, and list what is damaged, missing or orphaned. Changes nothing. A score
    set at a URL is checked where it is: its parts are streamed, not stored.

    Exit status: 0 intact, 1 problems found, 2 not something jestcurate wrote."""
    import json as json_mod

    from jestcurate import ui
    from jestcurate.pipelines import verify as verify_mod

    found = verify_mod.verify(path)
    if json_out:
        ui.stdout.print_json(json_mod.dumps(found))
    else:
        verify_mod.print_report(found)
    if found["problems"]:
        raise typer.Exit(1)
