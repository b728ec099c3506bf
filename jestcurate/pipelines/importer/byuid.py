"""--shards: parts that are the downloaded WebDataset shards, each sample's embeddings found by
its uid in a sorted index of the source's uids."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate import ui
from jestcurate.errors import JCError, first_line
from jestcurate.io.reader import ShardReadError, iter_raw_samples, split_member
from jestcurate.io.shards import Shard, is_url, open_shard, shard_size
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.pipelines.importer.scoring import score_and_write
from jestcurate.pipelines.importer.sources import Unit, checked_arrays, read_metadata

log = logging.getLogger(__name__)


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
                    column = read_metadata(unit, ["uid"]).column("uid").to_pylist()
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
            self._loaded[u] = checked_arrays(unit, n, self.dim)
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
    shard: Shard, source: SourceIndex, params: dict[str, Any], writer: ScoreSetWriter
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
    return score_and_write(writer, shard.name, shard.url, rows, img, txt, params, began,
                       shard_size(shard.url), {"matched": matched})  # fmt: skip
