"""Unit tests of pipelines/verify.py: every file of a score set, a selection (with its export)
or a dedup output against what its markers or summary recorded. Tiny outputs built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_DIM, TINY_META, flip_byte, write_marked_part
from rich.console import Console

from jestcurate.errors import JCError
from jestcurate.io.store import file_digests, part_table, write_json_atomic
from jestcurate.pipelines.verify import print_report, verify

DIM, META = TINY_DIM, TINY_META


def make_set(out: Path, names: list[str], n: int = 3, meta: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "meta.json", meta or META)
    for name in names:
        rows = [
            {
                "key": f"{name}{i}",
                "index": i,
                "uid": None,
                "url": None,
                "caption": f"caption {i} " * 5,
                "sha256": None,
                "status": "ok",
                "error": None,
            }
            for i in range(n)
        ]
        emb = np.ones((n, DIM), dtype=np.float16)
        table = part_table(f"/d/{name}.tar", rows, emb, emb, np.zeros(n), np.zeros(n), DIM)
        write_marked_part(out, name, table, f"/d/{name}.tar")
    return out


def flip_in_page(path: Path, column: str) -> None:
    """Flip the last byte of a column's data: its page checksum no longer matches."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column
    )
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    flip_byte(path, start + chunk.total_compressed_size - 1)


def problems(found: dict) -> dict[str, str]:
    return {p["file"]: p["problem"] for p in found["problems"]}


# --- score sets --------------------------------------------------------------------------


def test_an_intact_score_set(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    assert verify(out) == {
        "path": str(out),
        "kind": "score set",
        "checked": 2,
        "problems": [],
        "repair": f"To repair: rerun the `jestcurate score` that wrote {out} to redo it "
        "(parts that do not match are redone).",
    }
    assert verify(f"file://{out}")["problems"] == []


def test_a_flipped_byte_is_found_by_its_sha256(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    part = out / "parts" / "00001.parquet"
    size = part.stat().st_size
    flip_byte(part)
    assert part.stat().st_size == size
    assert problems(verify(out)) == {str(part): "damaged (its sha256 differs from its marker's)"}


def test_missing_and_orphaned_parts(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    (out / "parts" / "00000.parquet").rename(out / "parts" / "zz.parquet")
    found = verify(out)
    assert found["checked"] == 3
    assert problems(found) == {
        f"{out}/parts/00000.parquet": "missing (its marker says it was written)",
        f"{out}/parts/zz.parquet": "orphaned (a part with no marker in done/)",
    }


def test_a_truncated_part_and_an_unreadable_marker(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    part = out / "parts" / "00000.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[:1000])
    (out / "done" / "00001.json").write_text('{"status": "ok", ')
    assert problems(verify(out)) == {
        str(part): f"damaged (1,000 bytes; its marker says {size:,})",
        f"{out}/done/00001.json": "unreadable",
        # with its marker unreadable, its part has none
        f"{out}/parts/00001.parquet": "orphaned (a part with no marker in done/)",
    }


def test_meta_json_problems_and_the_repair_hint(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    (out / "meta.json").unlink()
    found = verify(out)
    assert problems(found) == {f"{out}/meta.json": "missing"}
    assert "`jestcurate score`" in found["repair"]
    (out / "meta.json").write_text("{")
    (problem,) = verify(out)["problems"]
    assert problem["file"] == f"{out}/meta.json" and problem["problem"].startswith("unreadable (")
    write_json_atomic(out / "meta.json", {**META, "imported": True})
    found = verify(out)
    assert found["problems"] == [] and "rerun the `jestcurate import` that wrote" in found["repair"]


def test_parts_under_old_markers_are_read_in_full(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001", "00002"])
    for name in ("00000", "00001", "00002"):  # markers from before sizes and hashes
        write_json_atomic(
            out / "done" / f"{name}.json",
            {"shard": f"/d/{name}.tar", "status": "ok", "counts": {"samples": 3}},
        )
    assert verify(out)["problems"] == []
    flip_in_page(out / "parts" / "00000.parquet", "key")
    write_json_atomic(out / "done" / "00001.json", {"status": "ok", "counts": {"samples": 4}})
    found = problems(verify(out))
    assert found[f"{out}/parts/00000.parquet"].startswith("unreadable (")
    assert "CRC" in found[f"{out}/parts/00000.parquet"]
    assert found[f"{out}/parts/00001.parquet"] == "damaged (3 rows; its marker says 4)"
    assert len(found) == 2


@pytest.mark.parametrize("column", ["caption", "img_emb.list.element"])
def test_parts_under_old_markers_have_every_columns_pages_checked(
    tmp_path: Path, column: str
) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    write_json_atomic(out / "done" / "00000.json", {"status": "ok", "counts": {"samples": 3}})
    part = out / "parts" / "00000.parquet"
    flip_in_page(part, column)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(part, page_checksum_verification=True)  # the damage is detectable
    assert list(problems(verify(out))) == [str(part)]


def test_a_flipped_byte_is_found_in_every_position(tmp_path: Path) -> None:
    """Whatever byte of a part changes, verify reports that part and nothing else."""
    out = make_set(tmp_path / "s", ["00000", "00001"])
    part = out / "parts" / "00000.parquet"
    original = part.read_bytes()
    for at in range(0, len(original), max(1, len(original) // 25)):
        flip_byte(part, at)
        assert list(problems(verify(out))) == [str(part)], at
        part.write_bytes(original)


# --- selections and dedup outputs --------------------------------------------------------


def make_selection(out: Path, files: bool = True) -> Path:
    out.mkdir(parents=True)
    table = pa.table({"step": [0, 0, 1, 1], "uid": ["a", "b", "c", "d"]})
    pq.write_table(table, out / "manifest.parquet", write_page_checksum=True)
    np.save(out / "uids.npy", np.arange(4))
    summary: dict = {"rows": 4}
    if files:
        summary["files"] = file_digests(out, ["manifest.parquet", "uids.npy"])
    write_json_atomic(out / "summary.json", summary)
    return out


def test_an_intact_selection(tmp_path: Path) -> None:
    sel = make_selection(tmp_path / "sel")
    assert verify(sel) == {"path": str(sel), "kind": "selection", "checked": 2, "problems": []}


def test_a_selections_damaged_manifest_and_uids(tmp_path: Path) -> None:
    sel = make_selection(tmp_path / "sel")
    flip_byte(sel / "manifest.parquet")
    size = (sel / "uids.npy").stat().st_size
    (sel / "uids.npy").write_bytes(b"garbage")
    assert problems(verify(sel)) == {
        str(sel / "manifest.parquet"): "damaged (its sha256 differs from the recorded one)",
        str(sel / "uids.npy"): f"damaged (7 bytes; {size} recorded)",
    }
    (sel / "manifest.parquet").unlink()
    assert problems(verify(sel))[str(sel / "manifest.parquet")] == "missing"


def test_an_old_selection_has_its_manifest_read(tmp_path: Path) -> None:
    sel = make_selection(tmp_path / "sel", files=False)
    assert verify(sel) == {"path": str(sel), "kind": "selection", "checked": 1, "problems": []}
    manifest = sel / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    (problem,) = verify(sel)["problems"]
    assert problem["file"] == str(manifest) and problem["problem"].startswith("unreadable (")
    manifest.unlink()
    assert verify(sel)["problems"] == [{"file": str(manifest), "problem": "missing"}]


def test_an_unreadable_summary(tmp_path: Path) -> None:
    sel = make_selection(tmp_path / "sel")
    (sel / "summary.json").write_text("[1, 2]")
    found = verify(sel)
    assert found["checked"] == 1
    assert found["problems"] == [
        {"file": str(sel / "summary.json"), "problem": "unreadable (not a JSON object)"}
    ]


def test_an_exports_shards(tmp_path: Path) -> None:
    sel = make_selection(tmp_path / "sel")
    shards = sel / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"{k:05d}.tar").write_bytes(bytes([k]) * 1024)
    export = {"shards": 3, "pattern": "{00000..00002}.tar"}
    write_json_atomic(
        shards / "export.json",
        {**export, "files": file_digests(shards, ["00000.tar", "00001.tar", "00002.tar"])},
    )
    assert verify(sel)["checked"] == 5 and verify(sel)["problems"] == []
    (shards / "00001.tar").write_bytes(bytes([1]) * 512)
    assert problems(verify(sel)) == {
        str(shards / "00001.tar"): "damaged (512 bytes; 1024 recorded)"
    }
    # an export from before recorded files: only presence is checked
    write_json_atomic(shards / "export.json", export)
    (shards / "00002.tar").unlink()
    found = verify(sel)
    assert found["checked"] == 5
    assert found["problems"] == [{"file": str(shards / "00002.tar"), "problem": "missing"}]


def test_a_dedup_output(tmp_path: Path) -> None:
    out = tmp_path / "dd"
    out.mkdir()
    pq.write_table(pa.table({"uid": ["a"], "cluster": [0]}), out / "dedup.parquet")
    write_json_atomic(out / "summary.json", {"files": file_digests(out, ["dedup.parquet"])})
    assert verify(out) == {"path": str(out), "kind": "dedup", "checked": 1, "problems": []}
    flip_byte(out / "dedup.parquet")
    assert problems(verify(out)) == {
        str(out / "dedup.parquet"): "damaged (its sha256 differs from the recorded one)"
    }


def test_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(JCError) as caught:
        verify(tmp_path)
    assert str(caught.value) == f"{tmp_path} is not a score set, a selection or a dedup output"


def test_print_report(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    console = Console(record=True, width=40)
    print_report(verify(out), console=console)
    assert console.export_text() == f"{out} (score set): 2 files checked, intact\n"
    flip_byte(out / "parts" / "00001.parquet")
    console = Console(record=True, width=40)
    print_report(verify(out), console=console)
    lines = console.export_text().splitlines()
    assert lines[0] == f"{out} (score set): 2 files checked, 1 problems"
    assert lines[1] == (
        f"damaged {out}/parts/00001.parquet: damaged (its sha256 differs from its marker's)"
    )
    assert lines[2].startswith("To repair: rerun the `jestcurate score`")
