"""Damaged score sets: found by verify and status, refused in one line by readers, repaired by
a score rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "scores"
    code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", out, "--workers", 0)
    assert code == 0, output
    return out


@pytest.fixture
def damaged(scored: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "scores"
    shutil.copytree(scored, copy)
    return copy


def _score(corpus: Path, out: Path) -> str:
    code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", out, "--workers", 0)
    assert code == 0, output
    return output


def _inside_page(part: Path, column: str) -> int:
    """A file offset inside the values of a column's last data page (row group 0): the end of
    its column chunk, past every page header."""
    meta = pq.ParquetFile(part).metadata.row_group(0)
    names = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
    chunk = meta.column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return start + chunk.total_compressed_size - 8


def test_markers_record_size_and_hash_and_parts_have_page_checksums(scored: Path) -> None:
    import hashlib

    for marker_path in (scored / "done").glob("*.json"):
        marker = json.loads(marker_path.read_text())
        part = scored / "parts" / f"{marker_path.stem}.parquet"
        assert marker["part_bytes"] == part.stat().st_size
        assert marker["part_sha256"] == hashlib.sha256(part.read_bytes()).hexdigest()
    code, output = run_cli("verify", scored)
    assert code == 0 and "intact" in output, output


def check_found(path: Path, name: str, what: str, corpus: Path) -> None:
    """verify and status report it, select refuses in one line, a score rerun repairs it."""
    code, output = run_cli("verify", path, "--json")
    assert code == 1, output
    problems = json.loads(output)["problems"]
    assert any(name in p["file"] and what in p["problem"] for p in problems), problems
    code, output = run_cli("status", path, "--json")
    assert any(name in d["shard"] and what in d["problem"] for d in json.loads(output)["damaged"])
    sel = path.parent / "sel"
    code, output = run_cli("select", path, "--out", sel, "-b", 4, "--ratio", 0.5)
    assert code == 2 and name in output and "rerun the `jestcurate score`" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 2, output
    assert not (sel / "manifest.parquet").exists()
    _score(corpus, path)
    code, output = run_cli("verify", path)
    assert code == 0 and "intact" in output, output
    code, output = run_cli("select", path, "--out", sel, "-b", 4, "--ratio", 0.5)
    assert code == 0, output


def test_a_truncated_part(damaged: Path, corpus: Path) -> None:
    part = damaged / "parts" / "00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a half-finished copy
    code, output = run_cli("dedup", damaged, "--out", damaged.parent / "d")
    assert code == 2 and "00001" in output and "damaged" in output, output
    code, output = run_cli("info", damaged)
    assert code == 2 and "00001" in output, output
    check_found(damaged, "00001", "damaged", corpus)


def test_a_deleted_marker_leaves_an_orphaned_part(damaged: Path, corpus: Path) -> None:
    (damaged / "done" / "00002.json").unlink()
    check_found(damaged, "00002", "orphaned", corpus)


def test_a_deleted_part_is_missing(damaged: Path, corpus: Path) -> None:
    (damaged / "parts" / "00000.parquet").unlink()
    check_found(damaged, "00000", "missing", corpus)


def test_flipped_bytes_in_a_data_page_are_caught_by_page_checksums(
    damaged: Path, corpus: Path, tmp_path: Path
) -> None:
    part = damaged / "parts" / "00001.parquet"
    data = bytearray(part.read_bytes())
    at = _inside_page(part, "clip_score")
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    part.write_bytes(bytes(data))  # same size: the cheap check passes, the pages do not
    code, output = run_cli("select", damaged, "--out", tmp_path / "sel", "-b", 4, "--ratio", 0.5)
    assert code == 2 and "00001" in output and "unreadable" in output, output
    assert "checksum" in output.lower() or "crc" in output.lower(), output
    code, output = run_cli("verify", damaged, "--json")
    assert code == 1 and "sha256" in output, output
    code, output = run_cli("status", damaged, "--json", "--verify")
    assert any("00001" in d["shard"] for d in json.loads(output)["damaged"]), output
    _score(corpus, damaged)  # the size matches, so a plain rerun trusts the part
    assert run_cli("verify", damaged)[0] == 1
    code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", damaged, "--workers", 0,
                           "--verify")  # fmt: skip
    assert code == 0, output
    assert run_cli("verify", damaged)[0] == 0


def test_a_missing_meta_json(damaged: Path, corpus: Path, tmp_path: Path) -> None:
    (damaged / "meta.json").unlink()
    code, output = run_cli("verify", damaged, "--json")
    assert code == 1 and "meta.json" in output, output
    code, output = run_cli("status", damaged, "--json", "--check")
    assert code == 1 and json.loads(output)["damaged"][0]["shard"] == "meta.json", output
    code, output = run_cli("select", damaged, "--out", tmp_path / "sel", "-b", 4, "--ratio", 0.5)
    assert code == 2 and "no meta.json" in output, output
    _score(corpus, damaged)
    assert run_cli("verify", damaged)[0] == 0


def test_verify_checks_selections_and_exports(scored: Path, tmp_path: Path) -> None:
    sel = tmp_path / "sel"
    code, output = run_cli("select", scored, "--out", sel, "-b", 4, "--ratio", 0.5, "--export",
                           "--samples-per-shard", 8)  # fmt: skip
    assert code == 0, output
    code, output = run_cli("verify", sel)
    assert code == 0 and "intact" in output, output
    tar = sorted((sel / "shards").glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-512])
    (sel / "uids.npy").write_bytes(b"garbage")
    code, output = run_cli("verify", sel, "--json")
    found = {Path(p["file"]).name for p in json.loads(output)["problems"]}
    assert code == 1 and found == {tar.name, "uids.npy"}, output


def test_a_damaged_manifest_is_one_line_for_its_readers(scored: Path, tmp_path: Path) -> None:
    from jestcurate.errors import JCError
    from jestcurate.trainer.loader import SelectionBatches

    sel = tmp_path / "sel"
    assert run_cli("select", scored, "--out", sel, "-b", 4, "--ratio", 0.5)[0] == 0
    manifest = sel / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-100])
    code, output = run_cli("report", scored, "--selection", sel, "--out", tmp_path / "r.html")
    assert code == 2 and "manifest.parquet is unreadable" in output and "verify" in output, output
    with pytest.raises(JCError, match=r"manifest\.parquet is unreadable"):
        SelectionBatches(sel, source="original")
    code, output = run_cli("verify", sel)
    assert code == 1 and "manifest.parquet" in output, output


def test_a_part_no_input_would_redo_is_set_aside(damaged: Path, corpus: Path) -> None:
    stray = damaged / "parts" / "elsewhere.parquet"  # e.g. from a run over other INPUTS
    shutil.copy(damaged / "parts" / "00000.parquet", stray)
    output = _score(corpus, damaged)
    assert "elsewhere" in output and "orphaned" in output, output
    assert not stray.exists() and (damaged / "orphaned" / "elsewhere.parquet").exists()
    code, output = run_cli("verify", damaged)
    assert code == 0 and "intact" in output, output
    code, output = run_cli("select", damaged, "--out", damaged.parent / "sel", "-b", 4)
    assert code == 0, output


def test_old_markers_gain_their_hashes_under_score_verify(damaged: Path, corpus: Path) -> None:
    before = {}
    for path in (damaged / "done").glob("*.json"):
        marker = json.loads(path.read_text())
        before[path.stem] = (marker.pop("part_bytes"), marker.pop("part_sha256"))
        path.write_text(json.dumps(marker))  # as an earlier version wrote it
    part = damaged / "parts" / "00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", damaged, "--workers", 0,
                           "--verify")  # fmt: skip
    assert code == 0 and "00001" in output and "scoring" in output, output
    for path in (damaged / "done").glob("*.json"):
        marker = json.loads(path.read_text())
        assert marker["part_bytes"] == (damaged / "parts" / f"{path.stem}.parquet").stat().st_size
        if path.stem != "00001":  # the intact parts kept their bytes: the same hashes
            assert (marker["part_bytes"], marker["part_sha256"]) == before[path.stem]
    code, output = run_cli("verify", damaged)
    assert code == 0 and "intact" in output, output
