"""Unit tests of io/rowcache.py: .npy columns written front to back, read back by row id."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jestcurate.io.rowcache import ColumnWriter, RowCache, embedding_rows, fixed_bytes


def fill(directory: Path, name: str, data: np.ndarray, chunks: list[int]) -> None:
    """Write `data` through a ColumnWriter in appends of the given sizes."""
    writer = ColumnWriter(directory / f"{name}.npy", data.dtype.str, data.shape)
    start = 0
    for size in chunks:
        writer.append(data[start : start + size])
        start += size
    assert start == len(data)
    writer.close()


def test_writer_fills_a_valid_npy_front_to_back(tmp_path: Path) -> None:
    data = np.arange(10 * 3, dtype="<f2").reshape(10, 3)
    fill(tmp_path, "emb", data, [4, 1, 0, 5])
    back = np.load(tmp_path / "emb.npy")
    assert back.dtype == np.dtype("<f2") and back.shape == (10, 3)
    np.testing.assert_array_equal(back, data)


def test_writer_converts_to_its_dtype(tmp_path: Path) -> None:
    writer = ColumnWriter(tmp_path / "i.npy", "<i4", (3,))
    writer.append(np.array([1, 2, 3], dtype=np.int64))  # cast, not written as 8-byte ints
    writer.close()
    back = np.load(tmp_path / "i.npy")
    assert back.dtype == np.dtype("<i4") and back.tolist() == [1, 2, 3]


def test_read_by_ids_in_any_order_with_repeats(tmp_path: Path) -> None:
    data = np.arange(12 * 2, dtype="<i4").reshape(12, 2) * 10
    fill(tmp_path, "part", data, [12])
    cache = RowCache(tmp_path, ["a.tar"], 12)
    ids = np.array([7, 0, 11, 3, 7, 0])
    got = cache.read("part", ids)
    assert got.tolist() == data[ids].tolist()
    assert got.tolist()[0] == [140, 150]  # row 7, hand-checked
    assert cache.read("part", np.array([5])).tolist() == [[100, 110]]
    empty = cache.read("part", np.array([], dtype=np.int64))
    assert empty.shape == (0, 2) and empty.dtype == np.dtype("<i4")


def test_an_empty_column(tmp_path: Path) -> None:
    fill(tmp_path, "emb", np.zeros((0, 3), dtype="<f2"), [0])
    cache = RowCache(tmp_path, [], 0)
    assert cache.read("emb", np.array([], dtype=np.int64)).shape == (0, 3)
    assert cache.read_range("emb", 0, 0).shape == (0, 3)


def test_read_range(tmp_path: Path) -> None:
    data = np.array([b"k0", b"key1", b"", b"k3"], dtype="S4")
    fill(tmp_path, "key", data, [2, 2])
    cache = RowCache(tmp_path, [], 4)
    assert cache.read_range("key", 1, 3).tolist() == [b"key1", b""]
    assert cache.read_range("key", 0, 4).tolist() == data.tolist()
    assert cache.read_range("key", 2, 2).shape == (0,)
    assert cache.read("key", np.array([3, 1])).tolist() == [b"k3", b"key1"]


def test_columns_of_different_layouts_in_one_cache(tmp_path: Path) -> None:
    n = 6
    rng = np.random.default_rng(0)
    columns = {
        "clip": rng.standard_normal(n).astype("<f4"),
        "sha": rng.integers(0, 2**63, n, dtype=np.uint64).astype("<u8"),
        "img": rng.standard_normal((n, 4)).astype("<f2"),
    }
    for name, data in columns.items():
        fill(tmp_path, name, data, [n])
    cache = RowCache(tmp_path, [], n)
    ids = np.array([5, 2, 4])
    for name, data in columns.items():
        got = cache.read(name, ids)
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data[ids])
        np.testing.assert_array_equal(cache.read_range(name, 1, 4), data[1:4])


DTYPES = ["<i4", "<i8", "<u8", "<f2", "<f4", "|u1", "|S1", "|S9"]


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 40),
    tail=st.sampled_from([(), (1,), (3,), (2, 3)]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_round_trip_is_bit_exact(dtype: str, n: int, tail: tuple, seed: int, data) -> None:
    dt = np.dtype(dtype)
    shape = (n, *tail)
    raw = np.random.default_rng(seed).bytes(dt.itemsize * int(np.prod(shape)))
    values = np.frombuffer(raw, dtype=dt).reshape(shape)  # any bits: NaNs, odd byte strings
    ids = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=50)), dtype=np.int64)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    cut = data.draw(st.integers(0, n))
    with tempfile.TemporaryDirectory() as tmp:
        fill(Path(tmp), "c", values, [cut, n - cut])
        cache = RowCache(Path(tmp), [], n)
        got = cache.read("c", ids)
        assert got.dtype == dt and got.shape == (len(ids), *tail)
        assert got.tobytes() == values[ids].tobytes()
        ranged = cache.read_range("c", start, stop)
        assert ranged.shape == (stop - start, *tail)
        assert ranged.tobytes() == values[start:stop].tobytes()


def test_append_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    writer = ColumnWriter(path, "<f4", (4,))

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    real, writer.file = writer.file, Full()
    with pytest.raises(OSError) as caught:
        writer.append(np.zeros(4))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    real.close()


def test_fixed_bytes() -> None:
    column = pa.chunked_array([["ab", None], ["é", "abcd"]])
    out = fixed_bytes(column, 4)
    assert out.dtype == np.dtype("S4")
    assert out.tolist() == [b"ab", b"", "é".encode(), b"abcd"]  # width in utf-8 bytes


def test_embedding_rows_of_chunked_and_sliced_columns() -> None:
    kind = pa.list_(pa.float16(), 2)
    first = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float16)), type=kind)
    second = pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(100, 104, dtype=np.float16)), type=kind
    )
    column = pa.chunked_array([first.slice(1), second])  # rows 1-2 of the first, then both
    out = embedding_rows(column)
    assert out.dtype == np.float16
    assert out.tolist() == [[2, 3], [4, 5], [100, 101], [102, 103]]
