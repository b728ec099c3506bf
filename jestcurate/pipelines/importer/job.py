"""The import job: this task's units (or, with --shards, tars) that have no ok marker yet, each
to a part, into a score set whose meta.json says how the embeddings were made."""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.files import read_json
from jestcurate.io.integrity import PartFiles, read_markers
from jestcurate.io.schema import META_NAME, SCHEMA_VERSION
from jestcurate.io.shards import expand_inputs
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.math.scoring import LOSS_KINDS
from jestcurate.pipelines.importer.byuid import SourceIndex, import_shard
from jestcurate.pipelines.importer.config import DATACOMP_EMBEDDINGS, FORMATS, ImportConfig
from jestcurate.pipelines.importer.sources import (
    Unit,
    import_unit,
    list_units,
    source_rows,
    width,
)
from jestcurate.scale.status import done_shard
from jestcurate.scale.tasks import for_task, resolve_task

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    out: Path
    units: int
    skipped: int
    rows: int = 0
    errors: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tied: bool = False  # --shards: parts are WebDataset shards, rows found by uid
    source_rows: int = 0
    matched: int = 0  # over every finished shard so far, not only this run's


def _model_params(cfg: ImportConfig) -> dict[str, Any]:
    """What meta.json says about the embeddings' model: given, or read from the model."""
    if cfg.logit_scale is not None:
        return {
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "logit_scale": float(cfg.logit_scale),
            "logit_bias": cfg.logit_bias,
            "loss": cfg.loss or ("sigmoid" if cfg.logit_bias is not None else "softmax"),
            "embed_dim": None,  # from the first unit
            "model_source": "given",
        }
    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec

    model = load_model(resolve_spec(ModelSpec(cfg.model, cfg.pretrained, "cpu")), warn_random=True)
    described = model.describe()
    return {
        **{k: described[k] for k in ("model", "pretrained", "logit_scale", "logit_bias", "loss")},
        "model_config_sha256": described["model_config_sha256"],
        "pretrained_sha256": described["pretrained_sha256"],
        "init_seed": described["init_seed"],
        "embed_dim": described["embed_dim"],
        "model_source": "loaded",
    }


# Besides score's identity fields, what makes an imported set's values: a rerun with any of
# them different would mix parts of two kinds in one set.
_IMPORT_IDENTITY = ("logit_scale", "logit_bias", "loss", "embed_dim", "images")


def _check_import(out: Path, meta: dict[str, Any]) -> None:
    path = out / META_NAME
    if not path.is_file():
        return
    existing = read_json(path)
    diff = [
        f"{k}: {existing.get(k)!r} there, {meta.get(k)!r} now"
        for k in _IMPORT_IDENTITY
        if existing.get(k) != meta.get(k)
    ]
    for k in ("format", "embeddings"):
        there, now = (existing.get("imported") or {}).get(k), meta["imported"][k]
        if there != now:
            diff.append(f"imported {k}: {there!r} there, {now!r} now")
    if diff:
        raise JCError(
            f"{out} holds scores made differently ({'; '.join(diff)}); use another --out, or "
            "the options it was made with"
        )


def _import_one(
    cfg: ImportConfig,
    target: Any,
    source: SourceIndex | None,
    meta: dict[str, Any],
    writer: ScoreSetWriter,
    report: ImportReport,
    reasons: Counter[str],
) -> None:
    """Import one source file (or, with --shards, one tar); a bad one gets a failed marker."""
    try:
        if source is not None:
            marker = import_shard(target, source, meta, writer)
        else:
            marker = import_unit(target, meta, writer)
        report.rows += marker["counts"]["samples"]
        report.errors += marker["counts"]["errors"]
        reasons.update(marker["error_reasons"])
    except ValueError as exc:
        where = target.url if cfg.shards else str(target.metadata.resolve())
        writer.mark(
            target.name,
            {"shard": where, "name": target.name, "status": "failed",
             "error": str(exc), "counts": None, "tool_version": __version__},
        )  # fmt: skip
        report.failed.append(f"{target.name}: {exc}")


def _validate(cfg: ImportConfig) -> None:
    if cfg.format not in FORMATS:
        raise JCError(f"unknown --format {cfg.format!r}; use one of {', '.join(FORMATS)}")
    if cfg.format == "datacomp" and cfg.embeddings not in DATACOMP_EMBEDDINGS:
        raise JCError(f"--embeddings is one of {', '.join(DATACOMP_EMBEDDINGS)}")
    if cfg.role not in ("reference", "learner"):
        raise JCError(f"--role is reference or learner, got {cfg.role!r}")
    if cfg.loss is not None and cfg.loss not in LOSS_KINDS:
        raise JCError(f"unknown --loss {cfg.loss!r}; use one of {', '.join(LOSS_KINDS)}")
    if cfg.logit_scale is None and (cfg.logit_bias is not None or cfg.loss is not None):
        raise JCError("--logit-bias and --loss go with --logit-scale (else the model gives them)")
    if cfg.logit_scale is not None and cfg.logit_scale <= 0:
        raise JCError("--logit-scale is α = exp(logit_scale), a positive number (CLIP: 100)")


def _identity(cfg: ImportConfig, params: dict[str, Any]) -> dict[str, Any]:
    """meta.json's identity fields, as `score` writes them, for embeddings made elsewhere."""
    return {
        "schema_version": SCHEMA_VERSION,
        "role": cfg.role,
        "model": params["model"],
        "model_config_sha256": params.get("model_config_sha256"),
        "pretrained_sha256": params.get("pretrained_sha256"),
        "init_seed": params.get("init_seed"),
        "precision": "imported",
        "decode": "imported",
    }


def _meta(cfg: ImportConfig, identity: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {
        **identity,
        **{k: params[k] for k in ("pretrained", "logit_scale", "logit_bias", "loss", "embed_dim")},
        "images": bool(cfg.shards),
        "imported": {
            "format": cfg.format,
            "source": str(cfg.source.resolve()),
            "embeddings": cfg.embeddings if cfg.format == "datacomp" else None,
            "model_parameters": params["model_source"],
            "tied_to_shards": bool(cfg.shards),
        },
        "ref_loss": f"{params['loss']}, other valid rows of the "
        f"{'WebDataset shard' if cfg.shards else 'source file'} as negatives, size-normalised "
        "(docs/scores.md)",
        "tool": "jestcurate",
        "tool_version": __version__,
    }


def _targets(cfg: ImportConfig, units: list[Unit], writer: ScoreSetWriter) -> list[Any]:
    """What gets a part each, in order: the source's files or, with --shards, the tars, named
    as `score` names them (keeping the names earlier runs' markers hold)."""
    return writer.names(expand_inputs(cfg.shards)) if cfg.shards else units


def targets(cfg: ImportConfig) -> list[Any]:
    """Check the options that need no model (format, embeddings, role, a given logit scale and
    loss, the source's files, the shards) and list what gets a part, as every task lists it:
    for `slurm import`, before it writes a script."""
    _validate(cfg)
    return _targets(cfg, list_units(cfg), ScoreSetWriter(cfg.out))


def unfinished_tasks(cfg: ImportConfig, count: int) -> list[int]:
    """Of `count` array tasks, those that would import something: a unit (or tar) of theirs
    has no ok marker, or a part that no longer matches its marker. Reads, changes nothing."""
    every = targets(cfg)
    markers, files = read_markers(cfg.out), PartFiles(cfg.out)
    left = {t.name for t in every if not done_shard(files, t.name, markers.get(t.name))}
    return [i for i in range(count) if any(t.name in left for t in for_task(every, i, count))]


def run(cfg: ImportConfig, on_unit: Any = None) -> ImportReport:
    """Import every unit of this task that has no ok marker yet; safe to rerun."""
    _validate(cfg)
    began = time.time()
    units = list_units(cfg)
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    writer = ScoreSetWriter(cfg.out)
    mine = for_task(_targets(cfg, units, writer), index, count)
    params = _model_params(cfg)
    if params["embed_dim"] is None:
        params["embed_dim"] = width(units)
    identity = _identity(cfg, params)
    writer.check(identity)
    meta = _meta(cfg, identity, params)
    writer.open(meta, agrees=functools.partial(_check_import, cfg.out))
    plan = writer.plan(mine)  # a part that no longer matches its marker is not done
    for name, problem in plan.forgotten:
        log.warning("part %s is %s: importing it again", name, problem)
    report = ImportReport(cfg.out, len(mine), len(mine) - len(plan.todo))
    report.tied = bool(cfg.shards)
    source = SourceIndex(units, meta["embed_dim"]) if cfg.shards and plan.todo else None
    reasons: Counter[str] = Counter()
    label, unit = ("importing shards", "shards") if cfg.shards else ("importing files", "files")
    with ui.step_progress(label, len(plan.todo), unit) as tick:
        for target in plan.todo:
            _import_one(cfg, target, source, meta, writer, report, reasons)
            tick()
            if on_unit:
                on_unit()
    if cfg.shards:
        done = writer.markers().values()
        report.matched = sum(m.get("matched", 0) for m in done if m.get("status") == "ok")
        report.source_rows = source.rows if source else source_rows(units)
    report.seconds = time.time() - began
    return report


def print_summary(report: ImportReport, console: Console = ui.stdout) -> None:
    table = ui.facts("jestcurate import")
    what = "WebDataset shards" if report.tied else "source files"
    table.add_row(f"{what} in this task", f"{report.units:,}")
    table.add_row("  already imported (skipped)", f"{report.skipped:,}")
    table.add_row("  failed", f"{len(report.failed):,}")
    table.add_row("rows imported", f"{report.rows:,}")
    table.add_row(
        "  errors (no uid / embedding)" if report.tied else "  without usable embeddings",
        f"{report.errors:,}",
    )
    if report.tied:
        missing = report.source_rows - report.matched
        table.add_row("source rows", f"{report.source_rows:,}")
        table.add_row("  tied to a downloaded sample", f"{report.matched:,}")
        table.add_row("  never downloaded (or not yet imported)", f"{missing:,}")
    table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"score set: {report.out}", highlight=False, soft_wrap=True)
    for line in report.failed:
        console.print(f"[red]failed[/red] {line}", highlight=False, soft_wrap=True)
