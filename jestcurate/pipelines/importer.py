"""`jestcurate import`: a score set from embeddings that already exist, without running a model.

Sources, each a list of units read in name order (one part per unit, resumable by its marker):
* datacomp: a DataComp pool folder, `NAME.parquet` (uid, url, text, ...) beside `NAME.npz`
  whose arrays `b32_img`, `b32_txt`, `l14_img`, `l14_txt` hold OpenAI CLIP embeddings row for
  row in the Parquet's order (`--embeddings l14|b32` picks the pair);
* clip-retrieval: its `inference` output, `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`
  and `metadata/metadata_N.parquet`, row for row.

Embeddings are L2-normalised and stored as float16; clip_score and ref_loss are computed from
the stored values exactly as `score` computes them, with the unit's own valid rows as the
negatives (so ref_loss depends on which rows share a unit, as it depends on the shard for
`score`). The logit scale, bias and loss kind come from the named model, or are given
(`--logit-scale`, `--logit-bias`, `--loss`) for embeddings whose weights are not at hand. Rows
are not tied to WebDataset shards: the set is for selection, dedup and DataComp uids; commands
that need the images say so (meta.json `images: false`).
"""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.shards import for_task, resolve_task
from jestcurate.io.store import (
    DONE_DIR,
    META_NAME,
    PARTS_DIR,
    SCHEMA_VERSION,
    check_meta,
    create_meta,
    part_table,
    read_json,
    read_markers,
    remove_stale_temps,
    write_json_atomic,
    write_part,
)
from jestcurate.math.scoring import LOSS_KINDS, clip_scores, example_losses

FORMATS = ("datacomp", "clip-retrieval")
DATACOMP_EMBEDDINGS = ("l14", "b32")
# Where a caption may sit in each source's metadata, first match wins.
CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class ImportConfig:
    source: Path
    out: Path
    format: str
    model: str
    pretrained: str | None = None
    embeddings: str = "l14"  # datacomp: which of its embedding pairs
    role: str = "reference"
    logit_scale: float | None = None  # given: no model is loaded
    logit_bias: float | None = None
    loss: str | None = None  # default: sigmoid with a logit bias, else softmax
    task_index: int | None = None
    num_tasks: int | None = None


@dataclass(frozen=True)
class Unit:
    """One source file's rows and embeddings: the unit of a part, a marker and a resume."""

    name: str
    metadata: Path
    img: Path
    txt: Path
    img_key: str | None = None  # the array names inside an .npz
    txt_key: str | None = None


@dataclass
class ImportReport:
    out: Path
    units: int
    skipped: int
    rows: int = 0
    errors: int = 0
    failed: list[str] | None = None
    seconds: float = 0.0


def list_units(cfg: ImportConfig) -> list[Unit]:
    """The source's units in name order; a missing counterpart file is a one-line error."""
    if not cfg.source.is_dir() or not os.access(cfg.source, os.R_OK | os.X_OK):
        raise JCError(f"{cfg.source} is not a readable folder")
    if cfg.format == "datacomp":
        units = []
        for meta in sorted(cfg.source.glob("*.parquet")):
            npz = meta.with_suffix(".npz")
            if not npz.is_file():
                raise JCError(f"{meta} has no {npz.name} beside it (DataComp's embeddings)")
            e = cfg.embeddings
            units.append(Unit(meta.stem, meta, npz, npz, f"{e}_img", f"{e}_txt"))
    else:
        units = []
        for meta in sorted((cfg.source / "metadata").glob("metadata_*.parquet")):
            n = meta.stem.removeprefix("metadata_")
            img = cfg.source / "img_emb" / f"img_emb_{n}.npy"
            txt = cfg.source / "text_emb" / f"text_emb_{n}.npy"
            for path in (img, txt):
                if not path.is_file():
                    raise JCError(f"{meta} has no {path.relative_to(cfg.source)} beside it")
            units.append(Unit(meta.stem, meta, img, txt))
    if not units:
        want = "NAME.parquet + NAME.npz"
        if cfg.format == "clip-retrieval":
            want = "metadata/metadata_N.parquet"
        raise JCError(f"{cfg.source} holds no {cfg.format} files ({want})")
    return units


# What numpy raises for a file that is not what it should be: truncated or empty (EOFError,
# BadZipFile, zlib.error), an .npy where an .npz belongs (TypeError), unreadable (OSError).
_BAD_ARRAY_FILE = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    TypeError,
    zipfile.BadZipFile,
    zlib.error,
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _arrays(unit: Unit) -> tuple[np.ndarray, np.ndarray]:
    try:
        if unit.img_key is None:
            return np.load(unit.img, mmap_mode="r"), np.load(unit.txt, mmap_mode="r")
        with np.load(unit.img) as npz:
            missing = [k for k in (unit.img_key, unit.txt_key) if k not in npz.files]
            if missing:
                raise ValueError(f"no array {', '.join(missing)} (it has {', '.join(npz.files)})")
            return npz[unit.img_key], npz[unit.txt_key]
    except _BAD_ARRAY_FILE as exc:
        raise ValueError(f"{unit.img.name}: {_first_line(exc)}") from None


def _normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as float32, and which rows were usable (finite, non-zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norm[ok, None]
    return out, ok


def _column(table: pa.Table, names: tuple[str, ...]) -> list[Any]:
    for name in names:
        if name in table.column_names:
            return table.column(name).to_pylist()
    return [None] * table.num_rows


def import_unit(unit: Unit, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write one unit's part and marker; returns the marker. A bad unit raises ValueError."""
    began = time.time()
    dim = params["embed_dim"]
    try:
        table = pq.read_table(unit.metadata)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{unit.metadata.name}: {_first_line(exc)}") from None
    img, txt = _arrays(unit)
    n = table.num_rows
    for what, array in (("image", img), ("text", txt)):
        if array.ndim != 2 or len(array) != n:
            raise ValueError(
                f"{unit.metadata.name} has {n} rows but its {what} embeddings are shaped "
                f"{tuple(array.shape)}: the files do not line up"
            )
        if array.shape[1] != dim:
            raise ValueError(
                f"{what} embeddings of {unit.metadata.name} are {array.shape[1]} wide but the "
                f"model's are {dim}"
            )
    img, img_ok = _normalised(img)
    txt, txt_ok = _normalised(txt)
    ok = img_ok & txt_ok
    # clip-retrieval names the WebDataset key `image_path` (or `key`, from the sample's json)
    uids, keys = _column(table, ("uid",)), _column(table, ("key", "image_path"))
    urls, captions = _column(table, ("url",)), _column(table, CAPTION_COLUMNS)
    rows = [
        {
            # The key: the source's own, else the uid, else the row's position.
            "key": str(next(k for k in (keys[i], uids[i], i) if k is not None)),
            "index": i,
            "uid": None if uids[i] is None else str(uids[i]),
            "url": urls[i],
            "caption": captions[i],
            "sha256": None,
            "status": "ok" if ok[i] else "error",
            "error": None if ok[i] else "missing embedding: zero or not finite",
        }
        for i in range(n)
    ]
    img16 = torch.from_numpy(img[ok]).half()
    txt16 = torch.from_numpy(txt[ok]).half()
    clip = clip_scores(img16, txt16)
    loss = example_losses(img16, txt16, params["logit_scale"], params["logit_bias"], params["loss"])
    part = part_table(
        str(unit.metadata.resolve()),
        rows,
        img16.numpy(),
        txt16.numpy(),
        clip.numpy(),
        loss.numpy(),
        dim,
    )
    write_part(out / PARTS_DIR / f"{unit.name}.parquet", part)
    errors = int((~ok).sum())
    marker = {
        "shard": str(unit.metadata.resolve()),
        "name": unit.name,
        "status": "ok",
        "error": None,
        "counts": {"samples": n, "ok": n - errors, "errors": errors},
        "error_reasons": {"missing embedding": errors} if errors else {},
        "seconds": round(time.time() - began, 3),
        "input_bytes": unit.metadata.stat().st_size,
        "tool_version": __version__,
    }
    write_json_atomic(out / DONE_DIR / f"{unit.name}.json", marker)  # last: the part is whole
    return marker


def _model_params(cfg: ImportConfig) -> dict[str, Any]:
    """What meta.json says about the embeddings' model: given, or read from the model."""
    if cfg.loss is not None and cfg.loss not in LOSS_KINDS:
        raise JCError(f"unknown --loss {cfg.loss!r}; use one of {', '.join(LOSS_KINDS)}")
    if cfg.logit_scale is None and (cfg.logit_bias is not None or cfg.loss is not None):
        raise JCError("--logit-bias and --loss go with --logit-scale (else the model gives them)")
    if cfg.logit_scale is not None:
        if cfg.logit_scale <= 0:
            raise JCError("--logit-scale is α = exp(logit_scale), a positive number (CLIP: 100)")
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


def _width(units: list[Unit]) -> int:
    """The embedding width, from the first source file that can be read (a bad one fails on
    its own later, with its marker)."""
    for unit in units:
        try:
            img, _ = _arrays(unit)
        except ValueError:
            continue
        if img.ndim == 2:
            return int(img.shape[1])
    raise JCError("no source file has readable 2-d embeddings; see the files' own errors")


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


def run(cfg: ImportConfig, on_unit: Any = None) -> ImportReport:
    """Import every unit of this task that has no ok marker yet; safe to rerun."""
    if cfg.format not in FORMATS:
        raise JCError(f"unknown --format {cfg.format!r}; use one of {', '.join(FORMATS)}")
    if cfg.format == "datacomp" and cfg.embeddings not in DATACOMP_EMBEDDINGS:
        raise JCError(f"--embeddings is one of {', '.join(DATACOMP_EMBEDDINGS)}")
    if cfg.role not in ("reference", "learner"):
        raise JCError(f"--role is reference or learner, got {cfg.role!r}")
    began = time.time()
    units = list_units(cfg)
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    mine = for_task(units, index, count)  # type: ignore[arg-type]
    params = _model_params(cfg)
    if params["embed_dim"] is None:
        params["embed_dim"] = _width(mine or units)
    identity = {
        "schema_version": SCHEMA_VERSION,
        "role": cfg.role,
        "model": params["model"],
        "model_config_sha256": params.get("model_config_sha256"),
        "pretrained_sha256": params.get("pretrained_sha256"),
        "init_seed": params.get("init_seed"),
        "precision": "imported",
        "decode": "imported",
    }
    check_meta(cfg.out, identity)
    meta = {
        **identity,
        **{k: params[k] for k in ("pretrained", "logit_scale", "logit_bias", "loss", "embed_dim")},
        "images": False,
        "imported": {
            "format": cfg.format,
            "source": str(cfg.source.resolve()),
            "embeddings": cfg.embeddings if cfg.format == "datacomp" else None,
            "model_parameters": params["model_source"],
        },
        "ref_loss": f"{params['loss']}, other valid rows of the source file as negatives, "
        "size-normalised (docs/scores.md)",
        "tool": "jestcurate",
        "tool_version": __version__,
    }
    _check_import(cfg.out, meta)
    for sub in (PARTS_DIR, DONE_DIR):
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.out / sub)
    create_meta(cfg.out, meta)
    _check_import(cfg.out, meta)  # a concurrent task may have created it first
    markers = read_markers(cfg.out)
    todo = [u for u in mine if markers.get(u.name, {}).get("status") != "ok"]
    report = ImportReport(cfg.out, len(mine), len(mine) - len(todo), failed=[])
    reasons: Counter[str] = Counter()
    for unit in todo:
        try:
            marker = import_unit(unit, meta, cfg.out)
            report.rows += marker["counts"]["samples"]
            report.errors += marker["counts"]["errors"]
            reasons.update(marker["error_reasons"])
        except ValueError as exc:
            write_json_atomic(
                cfg.out / DONE_DIR / f"{unit.name}.json",
                {"shard": str(unit.metadata.resolve()), "name": unit.name, "status": "failed",
                 "error": str(exc), "counts": None, "tool_version": __version__},
            )  # fmt: skip
            report.failed.append(f"{unit.name}: {exc}")
        if on_unit:
            on_unit()
    report.seconds = time.time() - began
    return report


def print_summary(report: ImportReport, console: Console = ui.stdout) -> None:
    table = ui.facts("jestcurate import")
    table.add_row("source files in this task", f"{report.units:,}")
    table.add_row("  already imported (skipped)", f"{report.skipped:,}")
    table.add_row("  failed", f"{len(report.failed or []):,}")
    table.add_row("rows imported", f"{report.rows:,}")
    table.add_row("  without usable embeddings", f"{report.errors:,}")
    table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"score set: {report.out}", highlight=False, soft_wrap=True)
    for line in report.failed or []:
        console.print(f"[red]failed[/red] {line}", highlight=False, soft_wrap=True)
