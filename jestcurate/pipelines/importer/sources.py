"""The source's files, each a unit (one part, one marker): a DataComp pool's NAME.parquet
beside NAME.npz, or clip-retrieval's metadata_N.parquet beside img_emb_N.npy and
text_emb_N.npy; their rows and embeddings, checked against each other."""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import JCError, first_line
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.pipelines.importer.config import ImportConfig
from jestcurate.pipelines.importer.scoring import score_and_write

# Where a caption may sit in each source's metadata, first match wins.
CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class Unit:
    """One source file's rows and embeddings: the unit of a part, a marker and a resume."""

    name: str
    metadata: Path
    img: Path
    txt: Path
    img_key: str | None = None  # the array names inside an .npz
    txt_key: str | None = None


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


def _column(table: pa.Table, names: tuple[str, ...]) -> list[Any]:
    for name in names:
        if name in table.column_names:
            return table.column(name).to_pylist()
    return [None] * table.num_rows


def checked_arrays(unit: Unit, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
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


def read_metadata(unit: Unit, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(unit.metadata, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{unit.metadata.name}: {first_line(exc)}") from None


def import_unit(unit: Unit, params: dict[str, Any], writer: ScoreSetWriter) -> dict[str, Any]:
    """Write one unit's part and marker; returns the marker. A bad unit raises ValueError."""
    began = time.time()
    table = read_metadata(unit)
    n = table.num_rows
    img, txt = checked_arrays(unit, n, params["embed_dim"])
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
    return score_and_write(writer, unit.name, shard, rows, img, txt, params, began,
                       unit.metadata.stat().st_size)  # fmt: skip


def width(units: list[Unit]) -> int:
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


def source_rows(units: list[Unit]) -> int:
    rows = 0
    for unit in units:
        with contextlib.suppress(OSError, pa.ArrowInvalid):
            rows += pq.ParquetFile(unit.metadata).metadata.num_rows
    return rows
