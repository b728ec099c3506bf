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
(`--logit-scale`, `--logit-bias`, `--loss`) for embeddings whose weights are not at hand.

Without `--shards` rows are not tied to WebDataset shards: the set is for selection, dedup and
DataComp uids; commands that need the images say so (meta.json `images: false`). With
`--shards` the parts are the downloaded tars instead: a row per sample found in the tar (keys
and order from its headers, uids from img2dataset's sidecar SHARD.parquet, else from the
samples' json), its embeddings looked up by uid in a sorted index of the source's uids (about
8 bytes plus the uid's length per source row, in every task), ref_loss with the tar's rows as
negatives exactly as `score` would. A sample whose uid the source lacks is an error row;
source rows that no tar holds are counted as never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.errors import JCError, first_line
from jestcurate.io.reader import ShardReadError, iter_raw_samples, split_member
from jestcurate.io.shards import (
    Shard,
    assign_names,
    expand_inputs,
    for_task,
    is_url,
    open_shard,
    resolve_task,
    shard_size,
)
from jestcurate.io.store import (
    DONE_DIR,
    META_NAME,
    PARTS_DIR,
    SCHEMA_VERSION,
    check_meta,
    create_meta,
    forget_unmatched,
    part_table,
    read_json,
    read_markers,
    remove_stale_temps,
    write_json_atomic,
    write_part,
)
from jestcurate.math.scoring import LOSS_KINDS, clip_scores, example_losses

log = logging.getLogger(__name__)

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
    shards: tuple[str, ...] = ()  # the downloaded WebDataset shards: one part per shard


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
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tied: bool = False  # --shards: parts are WebDataset shards, rows found by uid
    source_rows: int = 0
    matched: int = 0  # over every finished shard so far, not only this run's


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
        raise ValueError(f"{unit.img.name}: {first_line(exc)}") from None


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


def _checked_arrays(unit: Unit, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit's embeddings, checked against its metadata's row count and the model's width."""
    img, txt = _arrays(unit)
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
    return img, txt


def _read_metadata(unit: Unit, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(unit.metadata, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{unit.metadata.name}: {first_line(exc)}") from None


def _write_part(
    name: str,
    shard: str,
    rows: list[dict[str, Any]],
    img: np.ndarray,
    txt: np.ndarray,
    params: dict[str, Any],
    out: Path,
    began: float,
    input_bytes: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Normalise, score and write one part and, last, its marker. Rows whose status is still
    "ok" need usable embeddings (`img`, `txt` hold one row per entry of `rows`)."""
    img, img_ok = _normalised(img)
    txt, txt_ok = _normalised(txt)
    for i, row in enumerate(rows):
        if row["status"] == "ok" and not (img_ok[i] and txt_ok[i]):
            row.update(status="error", error="missing embedding: zero or not finite")
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)
    img16 = torch.from_numpy(img[ok]).half()
    txt16 = torch.from_numpy(txt[ok]).half()
    clip = clip_scores(img16, txt16)
    loss = example_losses(img16, txt16, params["logit_scale"], params["logit_bias"], params["loss"])
    dim = params["embed_dim"]
    part = part_table(shard, rows, img16.numpy(), txt16.numpy(), clip.numpy(), loss.numpy(), dim)
    digest = write_part(out / PARTS_DIR / f"{name}.parquet", part)
    reasons = Counter(r["error"].split(":")[0] for r in rows if r["status"] != "ok")
    errors = int((~ok).sum())
    marker = {
        "shard": shard,
        "name": name,
        "status": "ok",
        "error": None,
        "counts": {"samples": len(rows), "ok": len(rows) - errors, "errors": errors},
        "error_reasons": dict(sorted(reasons.items())),
        "seconds": round(time.time() - began, 3),
        "input_bytes": input_bytes,
        **digest,
        **(extra or {}),
        "tool_version": __version__,
    }
    write_json_atomic(out / DONE_DIR / f"{name}.json", marker)  # last: the part is whole
    return marker


def import_unit(unit: Unit, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write one unit's part and marker; returns the marker. A bad unit raises ValueError."""
    began = time.time()
    table = _read_metadata(unit)
    n = table.num_rows
    img, txt = _checked_arrays(unit, n, params["embed_dim"])
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
            "status": "ok",
            "error": None,
        }
        for i in range(n)
    ]
    shard = str(unit.metadata.resolve())
    return _write_part(unit.name, shard, rows, img, txt, params, out, began,
                       unit.metadata.stat().st_size)  # fmt: skip


# --- tied to the downloaded WebDataset shards (--shards) -------------------------------------


class SourceIndex:
    """Where each uid's embeddings are in the source: a sorted array of the uids (bytes) and
    each one's row, about len(uid) + 8 bytes per source row once built (about twice that while
    building), searched per shard."""

    def __init__(self, units: list[Unit], dim: int) -> None:
        self.units, self.dim = units, dim
        uids, starts, skipped = [], [0], []
        with ui.step_progress("indexing the source's uids", len(units), "files") as tick:
            for unit in units:
                try:
                    names = pq.ParquetFile(unit.metadata).schema_arrow.names
                except (OSError, pa.ArrowInvalid) as exc:  # its rows cannot be found
                    skipped.append(f"{unit.metadata.name} ({first_line(exc)})")
                    names = ["uid"]
                if "uid" not in names:
                    raise JCError(
                        f"--shards ties rows by uid, but {unit.metadata} has no uid column"
                    )
                try:
                    column = _read_metadata(unit, ["uid"]).column("uid").to_pylist()
                except ValueError:
                    column = []
                values = [b"" if v is None else str(v).encode() for v in column]
                uids.append(np.array(values, dtype=bytes) if values else np.zeros(0, "S1"))
                starts.append(starts[-1] + len(values))
                tick()
        for line in skipped:
            log.warning("source file skipped for --shards: %s", line)
        width = max([1, *(a.dtype.itemsize for a in uids)])
        flat = np.concatenate([a.astype(f"S{width}") for a in uids])
        del uids
        if not len(flat):
            raise JCError(
                f"--shards: the source's files hold no readable uids ({len(units)} files)"
            )
        order = np.argsort(flat, kind="stable")  # duplicates: the first in source order wins
        self.uids = flat[order]
        del flat
        self.where = order  # the global source row of each sorted uid
        self.starts = np.array(starts, dtype=np.int64)  # unit u holds rows starts[u]..starts[u+1]
        self.rows = int(self.starts[-1])
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def find(self, uids: list[str | None]) -> np.ndarray:
        """(unit, row) per uid; (-1, -1) where the source has no such uid."""
        raw = np.array([(u or "").encode() for u in uids], dtype=bytes)
        if raw.dtype.itemsize == 0 or not len(raw):
            raw = np.zeros(len(uids), dtype="S1")
        # a uid longer than every source uid matches none (never compare it truncated)
        fits = np.char.str_len(raw) <= self.uids.dtype.itemsize
        wanted = np.where(fits, raw, b"").astype(self.uids.dtype)
        at = np.minimum(np.searchsorted(self.uids, wanted), len(self.uids) - 1)
        hit = (self.uids[at] == wanted) & (np.char.str_len(wanted) > 0) & fits
        out = np.full((len(uids), 2), -1, dtype=np.int64)
        rows = self.where[at[hit]]
        unit = np.searchsorted(self.starts, rows, side="right") - 1
        out[hit] = np.stack([unit, rows - self.starts[unit]], 1)
        return out

    def arrays(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """One source file's checked embeddings; the last two stay loaded, since consecutive
        shards usually draw on the same file."""
        if u not in self._loaded:
            unit = self.units[u]
            n = pq.ParquetFile(unit.metadata).metadata.num_rows
            if len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[u] = _checked_arrays(unit, n, self.dim)
        return self._loaded[u]


def _sidecar(shard: Shard) -> Path | None:
    """img2dataset's SHARD.parquet beside a local SHARD.tar, when there is one."""
    if is_url(shard.url) or not shard.url.endswith(".tar"):
        return None
    path = Path(shard.url).with_suffix(".parquet")
    return path if path.is_file() else None


def _tar_keys(path: str) -> list[str]:
    """The sample keys of a local tar in order, from its headers alone (seeks past the data)."""
    keys: list[str] = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                split = split_member(member)
                if split is not None and (not keys or keys[-1] != split[0]):
                    keys.append(split[0])
            # tarfile ends quietly at a truncated header: the end-of-archive block must follow
            f.seek(tar.offset)
            end = f.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"not a readable tar: {first_line(exc)}") from None
    if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise ValueError(f"tar damaged after {len(keys)} samples: no end-of-archive marker")
    return keys


def shard_samples(shard: Shard) -> list[dict[str, Any]]:
    """Each sample of a shard in order: key, uid, url, caption. From the tar's headers and
    img2dataset's sidecar Parquet when both are at hand, else from the samples' own json."""
    sidecar = _sidecar(shard)
    if sidecar is not None:
        table = pq.read_table(sidecar)
        if "key" in table.column_names and "uid" in table.column_names:
            by_key = {r["key"]: r for r in table.to_pylist()}
            empty: dict[str, Any] = {}
            return [
                {
                    "key": key,
                    "uid": by_key.get(key, empty).get("uid"),
                    "url": by_key.get(key, empty).get("url"),
                    "caption": by_key.get(key, empty).get("caption"),
                }
                for key in _tar_keys(shard.url)
            ]
    samples = []
    try:
        with open_shard(shard.url) as f:
            for raw in iter_raw_samples(f):
                try:
                    meta = json.loads(raw.files.get("json") or b"{}")
                except ValueError:
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                caption = meta.get("caption")
                if caption is None and "txt" in raw.files:
                    caption = raw.files["txt"].decode("utf-8", "replace")
                samples.append({"key": raw.key, "uid": meta.get("uid"), "url": meta.get("url"),
                                "caption": caption})  # fmt: skip
    except ShardReadError as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"cannot read: {first_line(exc)}") from None
    return samples


def import_shard(
    shard: Shard, source: SourceIndex, params: dict[str, Any], out: Path
) -> dict[str, Any]:
    """One WebDataset shard's part: a row per sample, its embeddings found by uid in the
    source. A sample without a uid, or whose uid the source lacks, is an error row."""
    began = time.time()
    samples = shard_samples(shard)
    found = source.find([s["uid"] for s in samples])
    dim = params["embed_dim"]
    img = np.zeros((len(samples), dim), dtype=np.float32)
    txt = np.zeros((len(samples), dim), dtype=np.float32)
    for u in np.unique(found[found[:, 0] >= 0, 0]).tolist():
        here = found[:, 0] == u
        unit_img, unit_txt = source.arrays(u)
        img[here] = unit_img[found[here, 1]]
        txt[here] = unit_txt[found[here, 1]]
    rows = []
    for i, sample in enumerate(samples):
        error = None
        if not sample["uid"]:
            error = "no uid: the sample's json and sidecar have none"
        elif found[i, 0] < 0:
            error = f"no embedding: uid {sample['uid']} is not in the source"
        rows.append(
            {**sample, "index": i, "uid": sample["uid"] and str(sample["uid"]), "sha256": None,
             "status": "ok" if error is None else "error", "error": error}
        )  # fmt: skip
    matched = int((found[:, 0] >= 0).sum())
    return _write_part(shard.name, shard.url, rows, img, txt, params, out, began,
                       shard_size(shard.url), {"matched": matched})  # fmt: skip


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


def _import_one(
    cfg: ImportConfig,
    target: Any,
    source: SourceIndex | None,
    meta: dict[str, Any],
    report: ImportReport,
    reasons: Counter[str],
) -> None:
    """Import one source file (or, with --shards, one tar); a bad one gets a failed marker."""
    try:
        if source is not None:
            marker = import_shard(target, source, meta, cfg.out)
        else:
            marker = import_unit(target, meta, cfg.out)
        report.rows += marker["counts"]["samples"]
        report.errors += marker["counts"]["errors"]
        reasons.update(marker["error_reasons"])
    except ValueError as exc:
        where = target.url if cfg.shards else str(target.metadata.resolve())
        write_json_atomic(
            cfg.out / DONE_DIR / f"{target.name}.json",
            {"shard": where, "name": target.name, "status": "failed",
             "error": str(exc), "counts": None, "tool_version": __version__},
        )  # fmt: skip
        report.failed.append(f"{target.name}: {exc}")


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
    targets: list[Any] = units
    if cfg.shards:  # names as `score` gives them, keeping those earlier runs' markers hold
        owners = {name: m.get("shard") for name, m in read_markers(cfg.out).items()}
        targets = assign_names(expand_inputs(cfg.shards), owners)
    mine = for_task(targets, index, count)
    params = _model_params(cfg)
    if params["embed_dim"] is None:
        params["embed_dim"] = _width(units)
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
    _check_import(cfg.out, meta)
    for sub in (PARTS_DIR, DONE_DIR):
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.out / sub)
    create_meta(cfg.out, meta)
    _check_import(cfg.out, meta)  # a concurrent task may have created it first
    markers = read_markers(cfg.out)
    # a part that no longer matches its marker is not done
    for name, problem in forget_unmatched(cfg.out, markers, [t.name for t in mine]):
        log.warning("part %s is %s: importing it again", name, problem)
    todo = [u for u in mine if markers.get(u.name, {}).get("status") != "ok"]
    report = ImportReport(cfg.out, len(mine), len(mine) - len(todo))
    report.tied = bool(cfg.shards)
    source = SourceIndex(units, meta["embed_dim"]) if cfg.shards and todo else None
    reasons: Counter[str] = Counter()
    label, unit = ("importing shards", "shards") if cfg.shards else ("importing files", "files")
    with ui.step_progress(label, len(todo), unit) as tick:
        for target in todo:
            _import_one(cfg, target, source, meta, report, reasons)
            tick()
            if on_unit:
                on_unit()
    if cfg.shards:
        done = read_markers(cfg.out).values()
        report.matched = sum(m.get("matched", 0) for m in done if m.get("status") == "ok")
        report.source_rows = source.rows if source else _source_rows(units)
    report.seconds = time.time() - began
    return report


def _source_rows(units: list[Unit]) -> int:
    rows = 0
    for unit in units:
        with contextlib.suppress(OSError, pa.ArrowInvalid):
            rows += pq.ParquetFile(unit.metadata).metadata.num_rows
    return rows


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
