"""`report` and `info`: what a score set, a selection or a dedup output holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jestcurate.cli.app import app, one_line_errors
from jestcurate.cli.options import (
    score_set_dir,
)


@app.command(short_help="Write a self-contained HTML report of a score set (and a selection).")
@one_line_errors
def report(
    scores: Annotated[
        str, typer.Argument(help="Score set to report on (path or URL).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "report.html"
    ),
    selection: Annotated[
        Path | None,
        typer.Option(help="A selection made from this score set: show kept vs dropped."),
    ] = None,
    thumbnails: Annotated[
        int, typer.Option(help="Thumbnails per grid (highest, lowest, random).")
    ] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the random grids.")] = 0,
    evals: Annotated[
        list[Path] | None,
        typer.Option("--eval", help="A `jestcurate eval` folder: show its comparison (repeat)."),
    ] = None,
) -> None:
    """Write one self-contained HTML page (opens from disk, no network): counts per shard and
    status, errors by reason, score histograms (kept vs dropped with --selection), with --eval
    the training comparison of the selections, and thumbnail grids with captions and scores,
    read back from the source shards."""
    from jestcurate.pipelines import report as report_mod

    folder = score_set_dir(scores)
    done = report_mod.write_report(folder, out, selection, thumbnails, seed, tuple(evals or ()))
    report_mod.print_written(done, out)


@app.command(short_help="Summarise a score set, a selection or a dedup output.")
@one_line_errors
def info(
    path: Annotated[
        str,
        typer.Argument(
            help="A score set (path or URL), a selection or a dedup output.", show_default=False
        ),
    ],
    why: Annotated[
        str | None,
        typer.Option(
            "--why",
            metavar="KEY",
            help="With a selection: what became of the sample with this key, and why (from "
            "its ledger).",
        ),
    ] = None,
) -> None:
    """Summarise a score set (model, counts, errors, score quantiles, shard states), a
    selection (method, parameters, counts, fates by reason, mean scores kept vs dropped,
    export) or a dedup output (parameters, clusters used, kept and dropped counts, cluster
    sizes, nearest-neighbour cosine and any collapsed-space warning). With --why KEY, one
    selection's verdict on one sample: kept (step, position), or which filter, duplicate,
    exclusion, super-batch or cut dropped it."""
    from jestcurate.pipelines import report as report_mod

    folder = score_set_dir(path)
    if why is not None:
        report_mod.print_why(folder, why)
    else:
        report_mod.print_info(path, report_mod.describe(folder))
