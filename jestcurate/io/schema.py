"""A score set's layout on disk and the schema of its parts.

Layout (the contract in docs/scores.md):
    DIR/meta.json              what made the scores
    DIR/parts/NAME.parquet     one per input shard, rows in shard order
    DIR/done/NAME.json         completion marker, status "ok" or "failed"
    DIR/orphaned/NAME.parquet  a part with no marker and no input shard, set aside by score
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.io.files import atomic_write, file_digest

SCHEMA_VERSION = 1
META_NAME = "meta.json"
PARTS_DIR = "parts"
DONE_DIR = "done"
ORPHANED_DIR = "orphaned"  # parts with no marker, set aside by score


def score_schema(dim: int) -> pa.Schema:
    emb = pa.list_(pa.float16(), dim)
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("uid", pa.string()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("img_emb", emb),
            pa.field("txt_emb", emb),
            pa.field("clip_score", pa.float32()),
            pa.field("ref_loss", pa.float32()),
        ],
        metadata={"jestcurate.schema_version": str(SCHEMA_VERSION)},
    )


def embedding_column(values: np.ndarray, ok: np.ndarray, dim: int) -> pa.Array:
    full = np.zeros((ok.shape[0], dim), dtype=np.float16)
    full[ok] = values
    return pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1), type=pa.float16()),
        type=pa.list_(pa.float16(), dim),
        mask=pa.array(~ok),
    )


def score_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    full = np.zeros(ok.shape[0], dtype=np.float32)
    full[ok] = values
    return pa.array(full, type=pa.float32(), mask=~ok)


def part_table(
    shard: str,
    rows: list[dict[str, Any]],
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    clip_score: np.ndarray,
    ref_loss: np.ndarray,
    dim: int,
) -> pa.Table:
    """One shard's rows as a table. The arrays hold the rows whose status is "ok", in row order."""
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)
    if int(ok.sum()) != len(img_emb):
        raise ValueError(f"{int(ok.sum())} ok rows but {len(img_emb)} embeddings")
    schema = score_schema(dim)
    columns = {
        name: pa.array([r[name] for r in rows], type=schema.field(name).type)
        for name in ("key", "index", "uid", "url", "caption", "sha256", "status", "error")
    }
    columns["shard"] = pa.array([shard] * len(rows), type=pa.string())
    columns["img_emb"] = embedding_column(img_emb, ok, dim)
    columns["txt_emb"] = embedding_column(txt_emb, ok, dim)
    columns["clip_score"] = score_column(clip_score, ok)
    columns["ref_loss"] = score_column(ref_loss, ok)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float16> column as an (n, D) float32 array; null rows become NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    start = column.offset * dim
    values = column.values[start : start + len(column) * dim]
    out = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    out[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def write_part(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write a part atomically, with Parquet page checksums (verified on every read); returns
    the fields its marker records to find damage later: byte size and sha256."""
    digest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
        found = file_digest(tmp)
        digest.update(part_bytes=found["bytes"], part_sha256=found["sha256"])

    atomic_write(path, write)
    return digest


# A selection's ledger (docs/select.md, "Ledger"): one row per row of the score set, one file
# per part, saying what became of it and why. Declared once, here; fate and the repeated text
# columns are dictionary-encoded (fate's dictionary is LEDGER_FATES, in this order, in every file).
LEDGER_FATES = ("kept", "not_chosen", "tail", "error", "filtered", "duplicate", "excluded")
_TEXT = pa.dictionary(pa.int32(), pa.string())


LEDGER_VERSION_KEY = b"jestcurate.ledger_schema_version"
LEDGER_VERSION = "1"


def ledger_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("shard", _TEXT, nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("uid", pa.string()),
            pa.field("fate", pa.dictionary(pa.int8(), pa.string()), nullable=False),
            pa.field("reason", _TEXT),  # which filter, error text, how it lost: per fate
            pa.field("detail", _TEXT),  # the filter's: which bound, which language, which kind
            pa.field("value", pa.float32()),  # the row's value the reason compared
            pa.field("threshold", pa.float32()),  # ... and what it was compared with
            pa.field("other_shard", _TEXT),  # the duplicate's (or evaluation item's) shard
            pa.field("other_key", pa.string()),  # ... and key
            pa.field("other_set", _TEXT),  # the evaluation set an exclusion matched
            pa.field("super_batch", pa.int64()),  # super-batch methods: the one it was drawn in
            pa.field("step", pa.int64()),  # kept: the training batch
            pa.field("position", pa.int32()),  # kept: its place in the batch
            pa.field("task", pa.int32()),  # array task whose partition held it (null: one run)
        ],
        metadata={LEDGER_VERSION_KEY.decode(): LEDGER_VERSION},
    )
