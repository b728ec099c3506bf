"""dedup.parquet: written from what the passes found, and read back for `select --dedup` and
`--balance-clusters`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jestcurate.errors import JCError
from jestcurate.io.derived import read_output
from jestcurate.io.files import atomic_write
from jestcurate.io.store import ScoreSet
from jestcurate.pipelines.dedup.config import REASONS, DedupConfig

OUTPUT = "dedup.parquet"
SUMMARY = "summary.json"


def roots(dup_of: np.ndarray) -> np.ndarray:
    """For each dropped row the kept row its duplicate chain ends at (-1 for kept rows)."""
    up = np.where(dup_of >= 0, dup_of, np.arange(len(dup_of)))
    while True:  # pointer jumping: chains halve each round
        nxt = up[up]
        if np.array_equal(nxt, up):
            return np.where(dup_of >= 0, up, -1)
        up = nxt


def write_output(
    cfg: DedupConfig,
    scores: ScoreSet,
    part: np.ndarray,
    index: np.ndarray,
    cluster: np.ndarray,
    roots: np.ndarray,
    reason: np.ndarray,
    similarity: np.ndarray,
) -> None:
    """Two passes over the parts' key columns: first the keys of the kept rows that others
    duplicate, then one row group per part (rows are in part order in the cache)."""
    names = scores.part_names()
    targets = np.unique(roots[roots >= 0])
    target_keys: dict[int, str] = {}
    shards: list[str] = []
    for part_id, name in enumerate(names):
        table = scores.read_part(name, ["shard", "key"])
        shards.append(table.column("shard")[0].as_py() if table.num_rows else name)
        mine = targets[part[targets] == part_id]
        if len(mine):
            found = table.column("key").take(pa.array(index[mine])).to_pylist()
            target_keys.update(zip(mine.tolist(), found, strict=True))
    starts = np.searchsorted(part, np.arange(len(names) + 1))

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for part_id, name in enumerate(names):
                lo, hi = starts[part_id], starts[part_id + 1]
                if lo == hi:
                    continue
                keys = scores.read_part(name, ["key"]).column("key")
                root = roots[lo:hi].tolist()
                columns = {
                    "shard": pa.array([shards[part_id]] * (hi - lo), pa.string()),
                    "key": keys.take(pa.array(index[lo:hi])),
                    "index": pa.array(index[lo:hi], pa.int32()),
                    "cluster": pa.array(cluster[lo:hi], pa.int32()),
                    "kept": pa.array(reason[lo:hi] == 0),
                    "duplicate_of": pa.array(
                        [target_keys[r] if r >= 0 else None for r in root], pa.string()
                    ),
                    "duplicate_of_shard": pa.array(
                        [shards[part[r]] if r >= 0 else None for r in root], pa.string()
                    ),
                    "similarity": pa.array(similarity[lo:hi], pa.float32(), from_pandas=True),
                    "reason": pa.array([REASONS.get(r) for r in reason[lo:hi].tolist()]),
                }
                writer.write_table(pa.table(columns, schema=SCHEMA))

    atomic_write(cfg.out / OUTPUT, write)


SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("index", pa.int32()),
        ("cluster", pa.int32()),
        ("kept", pa.bool_()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_shard", pa.string()),
        ("similarity", pa.float32()),
        ("reason", pa.string()),
    ]
)


def _by_shard(dedup_dir: Path, column: str, where: str | None = None) -> dict[str, np.ndarray]:
    """shard -> (indexes, values of `column`) of the rows, optionally only those where the
    boolean column `where` is false."""
    path = dedup_dir / OUTPUT
    if not path.is_file():
        raise JCError(f"{dedup_dir} is not a dedup output (no {OUTPUT}); run jestcurate dedup")
    table = read_output(path, ["shard", "index", column])
    if where is not None:
        table = table.filter(pc.invert(table.column(where)))
    encoded = table.column("shard").combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy()
    index = table.column("index").to_numpy()
    values = table.column(column).to_numpy()
    order = np.lexsort((index, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    out = {}
    for code, shard in enumerate(encoded.dictionary.to_pylist()):
        rows = order[bounds[code] : bounds[code + 1]]
        out[shard] = (index[rows], values[rows])
    return out


def load_dropped(dedup_dir: Path) -> dict[str, np.ndarray]:
    """For select --dedup: shard -> sorted indexes of the rows dedup dropped."""
    dropped = _by_shard(dedup_dir, "kept", where="kept")
    return {shard: idx.astype(np.int64) for shard, (idx, _) in dropped.items()}


def load_clusters(dedup_dir: Path) -> dict[str, np.ndarray]:
    """For select --balance-clusters: shard -> cluster id by index (-1 where unknown)."""
    out = {}
    for shard, (idx, cluster) in _by_shard(dedup_dir, "cluster").items():
        arr = np.full(int(idx.max()) + 1 if len(idx) else 0, -1, dtype=np.int32)
        arr[idx] = cluster
        out[shard] = arr
    return out
