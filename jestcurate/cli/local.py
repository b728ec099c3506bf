"""`local`: the array tasks of score, import or select as processes on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from jestcurate.cli.app import app, command_options, one_line_errors


@app.command(
    short_help="Run score, import or select as N tasks on this machine's GPUs (no scheduler).",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@one_line_errors
def local(
    ctx: typer.Context,
    num_tasks: Annotated[
        int | None,
        typer.Option(
            help="Tasks (score and import: at most one per shard or file). Default: as many as "
            "the last local run into the same OUT had, else one per GPU (at least 2 for "
            "select), else 2 on the CPU."
        ),
    ] = None,
    devices: Annotated[
        str,
        typer.Option(
            help="auto (every visible GPU, else the CPU), cpu, or GPU ids such as 0,1,3 (as "
            "CUDA numbers them here). Each task sees one GPU as cuda:0 and an equal share of "
            "the CPU cores."
        ),
    ] = "auto",
) -> None:
    """Run `jestcurate COMMAND` as N array tasks, as processes on this machine, as many at once as
    there are devices: the same task flags, claims, markers, select rounds and merge as
    `jestcurate slurm`. A failed task does not stop the others; rerunning the same command does
    only what is unfinished. Logs: OUT/local/logs.

    The command and its options follow `--`, for example

    jestcurate local -- score 'pool/*.tar' --out scores/ -m ViT-B-32

    Exit status: 0 every task finished, 1 some failed (rerun to finish), 2 bad input."""
    from jestcurate.pipelines import local as local_mod

    plan = local_mod.plan(ctx.args, num_tasks, devices, command_options)
    report = local_mod.run(plan, on_done=local_mod.print_outcome)
    local_mod.print_report(report)
    if report.failed:
        raise typer.Exit(1)
