"""`select --export`: rewrite the selected samples, original bytes, into new WebDataset shards
in manifest order (step by step; each shard holds whole batches).

Two phases, both resumable:
1. Gather: read each source shard that holds selected samples once, sequentially (local, remote
   or gzipped alike), and append those samples to a spill file of the output shard they belong
   to. Only output shards not yet written are gathered.
2. Write: for each output shard, load its spill (one shard's worth of samples), order by
   position, write the tar under a temporary name and rename it; then drop the spill.
A finished output shard is never rewritten; an interrupted run leaves finished shards and
redoes the rest.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.reader import ShardReadError, iter_raw_samples
from jestcurate.io.shards import open_shard
from jestcurate.io.store import (
    atomic_write,
    file_digests,
    read_json,
    read_output,
    require_selection_images,
    write_json_atomic,
)
from jestcurate.trainer.loader import sample_key

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
SHARD_LIST = "shards.txt"
EXPORT_META = "export.json"
# 2: each sample's json "key" is the exported key (1, recorded as no "format": the source key)
EXPORT_FORMAT = 2
DEFAULT_SAMPLES_PER_SHARD = 10_000
_SCORE_COLUMNS = ("clip_score", "ref_loss", "learner_loss", "score")


@dataclass(frozen=True)
class ExportPlan:
    batch_size: int
    samples_per_shard: int  # a multiple of batch_size
    samples: int

    @property
    def shards(self) -> int:
        return -(-self.samples // self.samples_per_shard)

    def shard_name(self, k: int) -> str:
        return f"{k:05d}.tar"


def plan(batch_size: int, samples: int, samples_per_shard: int | None) -> ExportPlan:
    wanted = samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    if wanted < 1:
        raise JCError("--samples-per-shard must be at least 1")
    # Whole batches per shard, so a loader reading shard by shard never splits a step.
    per_shard = max(1, round(wanted / batch_size)) * batch_size
    if samples_per_shard and per_shard != samples_per_shard:
        log.info("samples per shard rounded to %d, a multiple of the batch size", per_shard)
    return ExportPlan(batch_size, per_shard, samples)


def _spill_record(position: int, files: dict[str, bytes]) -> bytes:
    header = json.dumps({"p": position, "f": {k: len(v) for k, v in files.items()}}).encode()
    return struct.pack("<I", len(header)) + header + b"".join(files.values())


def _read_spill(path: Path) -> list[tuple[int, dict[str, bytes]]]:
    records = []
    data = path.read_bytes()
    at = 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        header = json.loads(data[at + 4 : at + 4 + size])
        at += 4 + size
        files = {}
        for ext, length in header["f"].items():
            files[ext] = data[at : at + length]
            at += length
        records.append((header["p"], files))
    return records


def _extended_json(raw: bytes | None, key: str, extra: dict[str, Any]) -> bytes:
    """The sample's json with the jestcurate object; its "key" is the exported sample's, as
    img2dataset keeps them equal (the source key is jestcurate.source_key)."""
    meta = json.loads(raw) if raw else {}
    if not isinstance(meta, dict):
        meta = {"original": meta}
    meta["key"] = key
    meta["jestcurate"] = extra
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def export(
    out: Path, samples_per_shard: int | None, share: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Export the selection in `out` (manifest.parquet) to out/shards/. Returns export.json.

    With `share` (index, count), write only output shards k with k % count == index, so array
    tasks split the export; whichever finds every shard written also writes the shard list."""
    summary = read_json(out / "summary.json")
    require_selection_images(summary, "select --export")
    manifest = read_output(out / "manifest.parquet")
    batch = int(summary["parameters"]["batch_size"])
    chosen = plan(batch, manifest.num_rows, samples_per_shard)
    shards_dir = out / SHARDS_DIR
    shards_dir.mkdir(exist_ok=True)
    wanted_meta = _export_meta(shards_dir, chosen)
    index, count = share or (0, 1)
    pending = [
        k
        for k in range(index, chosen.shards, count)
        if not (shards_dir / chosen.shard_name(k)).exists()
    ]
    if pending:
        spill_dir = shards_dir / (".spill" if count == 1 else f".spill-{index}-of-{count}")
        _write_shards(manifest, chosen, pending, shards_dir, spill_dir)
    missing = [k for k in range(chosen.shards) if not (shards_dir / chosen.shard_name(k)).exists()]
    if missing:  # other tasks' shares: they write the list when they finish
        return {
            **wanted_meta,
            "shards": chosen.shards,
            "written": len(pending),
            "missing": len(missing),
        }
    return _finish(out, shards_dir, chosen, wanted_meta)


def _export_meta(shards_dir: Path, chosen: ExportPlan) -> dict[str, Any]:
    """export.json's plan: written by the first run, and a later run's must agree with it."""
    meta_path = shards_dir / EXPORT_META
    wanted_meta = {
        "samples_per_shard": chosen.samples_per_shard,
        "samples": chosen.samples,
        "format": EXPORT_FORMAT,
    }
    if not meta_path.exists():
        write_json_atomic(meta_path, wanted_meta)
        return wanted_meta
    existing = read_json(meta_path)
    if existing.get("format", 1) != EXPORT_FORMAT:
        raise JCError(
            f'{shards_dir} was begun by an older jestcurate, whose samples\' json "key" '
            "held the source key (now the exported key, as img2dataset keeps them); remove "
            "that folder to export again"
        )
    if {k: existing.get(k) for k in wanted_meta} != wanted_meta:
        raise JCError(
            f"{shards_dir} was exported with {existing.get('samples_per_shard')} samples per "
            "shard; use the same --samples-per-shard or remove that folder"
        )
    return wanted_meta


def _write_shards(
    manifest: Any, chosen: ExportPlan, pending: list[int], shards_dir: Path, spill_dir: Path
) -> None:
    """Gather the pending shards' samples into spills (each source shard read once), then write
    each output shard atomically."""
    shutil.rmtree(spill_dir, ignore_errors=True)
    spill_dir.mkdir()
    _gather(manifest, chosen, set(pending), spill_dir)
    for k in pending:
        records = sorted(_read_spill(spill_dir / f"{k}.spill"), key=lambda r: r[0])
        start = k * chosen.samples_per_shard
        rows = manifest.slice(start, chosen.samples_per_shard).to_pylist()
        if len(records) != len(rows):
            raise JCError(f"export shard {k}: gathered {len(records)} of {len(rows)} samples")
        atomic_write(
            shards_dir / chosen.shard_name(k),
            lambda tmp, records=records, rows=rows, start=start: _write_tar(
                tmp, records, rows, start
            ),
        )
        (spill_dir / f"{k}.spill").unlink()
    shutil.rmtree(spill_dir, ignore_errors=True)


def _write_tar(tmp: Path, records: list, rows: list[dict[str, Any]], start: int) -> None:
    """One output shard: each sample's original files, keyed by its position, its json
    extended with where it came from and its scores."""
    import webdataset as wds

    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0)  # fixed mtime: reproducible tars
        for p, files in records:
            row = rows[p - start]
            extra = {
                "step": row["step"],
                "position": row["position"],
                "source_shard": row["shard"],
                "source_key": row["key"],
                "source_index": row["index"],
                **{c: row[c] for c in _SCORE_COLUMNS if c in row},
            }
            sample = {"__key__": sample_key(p), **files}
            sample["json"] = _extended_json(files.get("json"), sample_key(p), extra)
            writer.write(sample)
        writer.close()


def _finish(
    out: Path, shards_dir: Path, chosen: ExportPlan, wanted_meta: dict[str, Any]
) -> dict[str, Any]:
    """Every shard is written: the shard list, then export.json with the pattern and hashes."""
    paths = [str((shards_dir / chosen.shard_name(k)).resolve()) for k in range(chosen.shards)]
    atomic_write(out / SHARD_LIST, lambda tmp: tmp.write_text("\n".join(paths) + "\n"))
    last = f"{chosen.shards - 1:05d}"
    names = [chosen.shard_name(k) for k in range(chosen.shards)]
    done = {
        **wanted_meta,
        "shards": chosen.shards,
        "pattern": str(shards_dir.resolve() / f"{{00000..{last}}}.tar"),
        "list": SHARD_LIST,
        "files": file_digests(shards_dir, names),  # what `jestcurate verify` checks
    }
    write_json_atomic(shards_dir / EXPORT_META, done)
    return done


def _gather(manifest: Any, chosen: ExportPlan, pending: set[int], spill_dir: Path) -> None:
    """Stream each source shard once and spill the samples the pending output shards need."""
    shard_col = manifest.column("shard").to_pylist()
    index_col = np.asarray(manifest.column("index").to_numpy())
    key_col = manifest.column("key").to_pylist()
    wanted: dict[str, dict[int, int]] = defaultdict(dict)  # source shard -> index -> position
    for p, shard in enumerate(shard_col):
        if p // chosen.samples_per_shard in pending:
            wanted[shard][int(index_col[p])] = p
    with ui.step_progress("export: reading source shards", len(wanted), "shards") as tick:
        for shard in sorted(wanted):
            _gather_shard(shard, wanted[shard], key_col, chosen, spill_dir)
            tick()


def _gather_shard(
    shard: str, need: dict[int, int], key_col: list[str], chosen: ExportPlan, spill_dir: Path
) -> None:
    """Stream one source shard and spill the samples in `need` (index -> position)."""
    found = 0
    try:
        with open_shard(shard) as f:
            for raw in iter_raw_samples(f):
                p = need.get(raw.index)
                if p is None:
                    continue
                if raw.key != key_col[p]:
                    raise JCError(
                        f"{shard} changed since it was scored: sample {raw.index} has key "
                        f"{raw.key!r}, the manifest says {key_col[p]!r}"
                    )
                k = p // chosen.samples_per_shard
                with open(spill_dir / f"{k}.spill", "ab") as spill:
                    spill.write(_spill_record(p, raw.files))
                found += 1
                if found == len(need):
                    break
    except ShardReadError as exc:
        if found < len(need):
            raise JCError(f"cannot export from {shard}: {exc}") from None
    except OSError as exc:
        raise JCError(f"cannot read {shard} for export: {exc}") from None
    if found < len(need):
        raise JCError(f"{shard} holds {found} of the {len(need)} samples selected from it")
