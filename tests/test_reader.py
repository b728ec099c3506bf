from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from jestcurate.io.reader import (
    ShardReadError,
    error_reason,
    iter_raw_samples,
    load_image,
    parse_sample,
)
from jestcurate.pipelines.synth import CorpusSpec, shard_samples, write_tar, write_truncated_tar


def read_all(path: Path) -> tuple[list[dict], str | None]:
    rows, seen, failure = [], set(), None
    with open(path, "rb") as f:
        try:
            for raw in iter_raw_samples(f):
                rows.append(parse_sample(raw, seen)[0])
        except ShardReadError as exc:
            failure = str(exc)
    return rows, failure


def test_every_hostile_case_gives_its_row(hostile: tuple[Path, dict[str, str]]) -> None:
    path, expected = hostile
    rows, failure = read_all(path)
    assert failure is None
    # One row per sample, in order, failures included (the duplicate key adds one).
    assert [r["index"] for r in rows] == list(range(len(expected) + 1))
    for row in rows[:-1]:
        want = expected[row["key"]]
        got = "ok" if row["status"] == "ok" else error_reason(row["error"])
        assert got == want, (row["key"], row["error"])
    assert rows[-1]["key"] == "h0000"
    assert error_reason(rows[-1]["error"]) == "duplicate key"
    assert all(r["error"] is None for r in rows if r["status"] == "ok")
    # The bytes of broken images are still hashed, so duplicates of garbage can be found.
    undecodable = [r for r in rows if error_reason(r["error"]) == "image decode failed"]
    assert undecodable and all(len(r["sha256"]) == 64 for r in undecodable)
    assert next(r for r in rows if r["key"] == "h0015")["caption"] == "caption only in the json"


def test_keys_match_webdataset(tmp_path: Path) -> None:
    samples = shard_samples(CorpusSpec(samples_per_shard=6, image_size=16), 0)
    samples.append({"__key__": "sub/dir/x.y", "jpg": samples[0]["jpg"], "txt": "dotted"})
    write_tar(tmp_path / "s.tar", samples)
    ours = [r["key"] for r in read_all(tmp_path / "s.tar")[0]]
    theirs = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)]
    assert ours == theirs


def _cut_points(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    return {
        "in a header": middle.offset + 100,
        "in member data": middle.offset_data + middle.size // 2,
        "at a member boundary": middle.offset,
    }


@pytest.mark.parametrize("where", ["in a header", "in member data", "at a member boundary"])
def test_truncated_tar_keeps_rows_before_damage(tmp_path: Path, where: str) -> None:
    samples = shard_samples(CorpusSpec(samples_per_shard=20, image_size=32), 0)
    path = tmp_path / "t.tar"
    write_tar(path, samples)
    path.write_bytes(path.read_bytes()[: _cut_points(path)[where]])
    rows, failure = read_all(path)
    assert failure is not None and "damaged" in failure
    assert 0 < len(rows) < len(samples)
    assert [r["key"] for r in rows] == [s["__key__"] for s in samples[: len(rows)]]
    # All complete samples are fine; the one in progress is an error row, never dropped.
    assert all(r["status"] == "ok" for r in rows[:-1])
    assert error_reason(rows[-1]["error"]) == "incomplete sample"


def test_cut_in_trailing_padding_loses_nothing(tmp_path: Path) -> None:
    samples = shard_samples(CorpusSpec(samples_per_shard=20, image_size=32), 0)
    write_truncated_tar(tmp_path / "t.tar", samples, keep=0.995)
    rows, failure = read_all(tmp_path / "t.tar")
    assert failure is None and len(rows) == 20


def test_empty_tar_is_zero_samples(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert read_all(tmp_path / "empty.tar") == ([], None)


@pytest.mark.parametrize("data", [b"", b"this is not a tar file at all" * 40])
def test_unreadable_file_fails_shard(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "bad.tar").write_bytes(data)
    rows, failure = read_all(tmp_path / "bad.tar")
    assert rows == []
    assert failure is not None and "not a readable tar" in failure


def test_gzipped_tar_is_read(tmp_path: Path) -> None:
    samples = shard_samples(CorpusSpec(samples_per_shard=3, image_size=16), 0)
    write_tar(tmp_path / "s.tar", samples)
    import gzip

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    rows, failure = read_all(tmp_path / "s.tar.gz")
    assert failure is None and [r["status"] for r in rows] == ["ok"] * 3


def test_load_image_checks_header_before_decoding() -> None:
    from jestcurate.io.reader import SampleError
    from jestcurate.pipelines.synth import png_with_header

    with pytest.raises(SampleError, match="image too large: 5000x5000"):
        load_image(png_with_header(5000, 5000), max_pixels=1_000_000)
    buf = io.BytesIO()
    from PIL import Image

    Image.new("L", (3, 2)).save(buf, format="PNG")
    image = load_image(buf.getvalue())
    assert image.mode == "RGB" and image.size == (3, 2)
