"""Thumbnails and captions of the few rows a report shows, read back from their shards: by
position in a local tar (a header scan), or by streaming a remote or compressed one."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from jestcurate.errors import JCError
from jestcurate.io.reader import IMAGE_EXTS, ShardReadError, iter_raw_samples, load_image
from jestcurate.io.remote import is_url
from jestcurate.io.shards import open_shard
from jestcurate.pipelines.report.stats import Stats
from jestcurate.trainer.loader import TarIndex


def _thumbnail(data: bytes, size: int = 112) -> str:
    image = load_image(data)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fetch_samples(stats: Stats, rows: np.ndarray) -> dict[int, dict[str, Any]]:
    """Caption, key and thumbnail of the given rows (global row numbers)."""
    wanted: dict[int, dict[int, int]] = {}  # part -> row in part -> global row
    for g in rows.tolist():
        wanted.setdefault(int(stats.part[g]), {})[int(stats.row[g])] = g
    out: dict[int, dict[str, Any]] = {}
    names = stats.scores.part_names()
    for part, need in wanted.items():
        table = stats.scores.read_part(names[part], ["key", "caption", "uid"])
        meta = table.take(sorted(need)).to_pylist()
        for (_row, g), info in zip(sorted(need.items()), meta, strict=True):
            out[g] = {**info, "thumbnail": None}
        shard = stats.shards[part]
        if not is_url(shard) and not shard.endswith((".gz", ".tgz")):
            try:
                index = TarIndex(shard)
            except JCError:
                continue
            for row, g in need.items():
                if row < len(index.samples):
                    sample = index.read(row)
                    out[g]["thumbnail"] = _image_of(sample)
            continue
        try:
            with open_shard(shard) as f:
                for raw in iter_raw_samples(f):
                    if raw.index in need:
                        out[need[raw.index]]["thumbnail"] = _image_of(raw.files)
        except (ShardReadError, OSError):  # a shard gone or damaged since scoring
            continue
    return out


def _image_of(files: dict[str, Any]) -> str | None:
    data = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if data is None:
        return None
    try:
        return _thumbnail(data)
    except Exception:  # the report shows a placeholder rather than failing
        return None
