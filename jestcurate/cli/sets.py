"""Commands on score sets and what is made from them: `import`, `status`, `verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jestcurate.cli.app import app, config_from, one_line_errors
from jestcurate.cli.options import (
    Model,
    NumTasks,
    Role,
    TaskIndex,
)


@app.command(
    name="import", short_help="Make a score set from embeddings you already have (DataComp, ...)."
)
@one_line_errors
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help="datacomp: a pool folder of NAME.parquet + NAME.npz; clip-retrieval: the "
            "inference output folder (img_emb/, text_emb/, metadata/)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The score set to write.")],
    format: Annotated[str, typer.Option("--format", help="datacomp or clip-retrieval.")],
    model: Model,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="open_clip tag or checkpoint of the model that made the embeddings (its logit "
            "scale and bias are read from it), or a label when --logit-scale is given."
        ),
    ] = None,
    embeddings: Annotated[
        str, typer.Option(help="datacomp: l14 (ViT-L/14) or b32 (ViT-B/32) arrays.")
    ] = "l14",
    role: Role = "reference",
    logit_scale: Annotated[
        float | None,
        typer.Option(
            help="α = exp(logit_scale) of the model, when its weights are not at hand "
            "(OpenAI's CLIP: 100). Then no model is loaded."
        ),
    ] = None,
    logit_bias: Annotated[
        float | None, typer.Option(help="With --logit-scale: a SigLIP model's logit bias.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="With --logit-scale: softmax or sigmoid (default: sigmoid with a bias)."),
    ] = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    shards: Annotated[
        list[str] | None,
        typer.Option(
            "--shards",
            help="The downloaded WebDataset shards (paths, globs, {a..b} or @list.txt, as score "
            "takes them): one part per shard, a row per sample, its embeddings found by uid "
            "(img2dataset's sidecar SHARD.parquet, else the samples' json).",
        ),
    ] = None,
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


@app.command(short_help="Done, failed, running and pending shards of a score set or an export.")
@one_line_errors
def status(
    path: Annotated[
        str, typer.Argument(help="A score set (path or URL) or a selection with an export.")
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
    score set; or written and missing shards of an export."""
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
