"""Flat on-disk columns of rows, written front to back and read back by row id.

select and dedup both need rows scattered across a whole score set (a super-batch, a cluster);
Parquet has no cheap random row access, so they copy the columns they need here first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa


def column_file(directory: Path, column: str) -> Path:
    return directory / f"{column}.npy"


class RowCache:
    """Rows as fixed-width .npy columns, addressed by row id 0..N-1 in part order.

    Rows are read with positioned reads, not through a memory map: a scattered read through a
    map faults in the neighbouring pages too, and those stay resident while the map is open.
    """

    def __init__(self, directory: Path, shards: list[str], size: int) -> None:
        self.dir = directory
        self.shards = shards  # part id -> the shard path or URL
        self.size = size
        self._layout: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}

    def path(self, column: str) -> Path:
        return column_file(self.dir, column)

    def _column(self, column: str) -> tuple[int, np.dtype, tuple[int, ...]]:
        if column not in self._layout:
            data = np.load(self.path(column), mmap_mode="r")
            self._layout[column] = (data.offset, data.dtype, data.shape[1:])
            del data
        return self._layout[column]

    def read_range(self, column: str, start: int, stop: int) -> np.ndarray:
        offset, dtype, tail = self._column(column)
        row = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
        with open(self.path(column), "rb") as f:
            f.seek(offset + start * row)
            data = f.read((stop - start) * row)
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, *tail)

    def read(self, column: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a column, in the order given."""
        offset, dtype, tail = self._column(column)
        row = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
        order = np.argsort(ids, kind="stable")
        buffer = bytearray(len(ids) * row)
        view = memoryview(buffer)
        with open(self.path(column), "rb", buffering=0) as f:
            fd = f.fileno()
            for j, i in enumerate(ids[order].tolist()):  # ascending: the disk reads forwards
                os.preadv(fd, [view[j * row : (j + 1) * row]], offset + i * row)
        out = np.empty((len(ids), *tail), dtype=dtype)
        out[order] = np.frombuffer(buffer, dtype=dtype).reshape(len(ids), *tail)
        return out


class ColumnWriter:
    """Fills a preallocated .npy file front to back with plain writes. (Writing through a
    memory map would keep every written page resident until the map closes: the whole cache.)"""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]) -> None:
        self.path = path
        header = np.lib.format.open_memmap(path, "w+", dtype, shape)
        self.offset = header.offset
        self.dtype = np.dtype(dtype)
        del header
        self.file = open(path, "r+b")  # noqa: SIM115 (closed in close())
        self.file.seek(self.offset)

    def append(self, values: np.ndarray) -> None:
        try:
            self.file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        except OSError as exc:  # name the file: a full disk is reported with its path
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        self.file.close()


def column_writers(directory: Path, record: np.dtype, rows: int) -> dict[str, ColumnWriter]:
    """One ColumnWriter per field of a record dtype, for `rows` rows: a RowCache in the making."""
    return {
        name: ColumnWriter(
            column_file(directory, name), record[name].base.str, (rows, *record[name].shape)
        )
        for name in record.names or ()
    }


def fixed_bytes(column: pa.ChunkedArray, width: int) -> np.ndarray:
    values = [b"" if v is None else v.encode("utf-8") for v in column.to_pylist()]
    return np.array(values, dtype=f"S{width}")


def embedding_rows(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    dim = array.type.list_size
    flat = array.values[array.offset * dim : (array.offset + len(array)) * dim]
    return flat.to_numpy(zero_copy_only=False).reshape(len(array), dim)
