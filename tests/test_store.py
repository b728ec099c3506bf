"""Unit tests of io/store.py: atomic writes, parts and markers, meta identity, opening a score
set. Tiny sets built here from pyarrow tables; no model, no CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import flip_byte, write_marked_part
from hypothesis import given, settings
from hypothesis import strategies as st

from jestcurate.errors import JCError
from jestcurate.io.store import (
    PartFiles,
    ScoreSet,
    atomic_write,
    check_meta,
    create_meta,
    dead_local_writer,
    digest_problem,
    embedding_matrix,
    file_digest,
    file_digests,
    fingerprint,
    finished_output,
    forget_unmatched,
    identity_mismatches,
    marker_settles,
    open_score_set,
    part_problem,
    part_table,
    read_json,
    read_markers,
    read_output,
    remove_stale_temps,
    repair_hint,
    set_aside_strays,
    value_differences,
    write_json_atomic,
    write_part,
)

DIM = 4
META = {
    "schema_version": 1,
    "role": "reference",
    "model": "jc-tiny",
    "model_config_sha256": None,
    "pretrained": None,
    "pretrained_sha256": None,
    "init_seed": 0,
    "embed_dim": DIM,
    "logit_scale": 10.0,
    "logit_bias": None,
    "loss": "softmax",
    "precision": "fp32",
    "decode": "cpu",
}


def rows_of(name: str, n: int, errors: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "key": f"{name}{i:04d}",
            "index": i,
            "uid": f"u{i}",
            "url": None,
            "caption": f"caption {i}",
            "sha256": None,
            "status": "error" if i in errors else "ok",
            "error": "image decode failed" if i in errors else None,
        }
        for i in range(n)
    ]


def tiny_table(name: str, n: int = 3, errors: tuple[int, ...] = (), dim: int = DIM) -> pa.Table:
    rows = rows_of(name, n, errors)
    ok = n - len(errors)
    emb = np.arange(ok * dim, dtype=np.float16).reshape(ok, dim)
    scores = np.arange(ok, dtype=np.float32)
    return part_table(f"/data/{name}.tar", rows, emb, -emb, scores, -scores, dim)


def make_set(out: Path, names: list[str], n: int = 3, meta: dict | None = None) -> Path:
    """A score set as `score` leaves it: meta.json, one part and one ok marker per name."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "meta.json", meta or META)
    for name in names:
        write_marked_part(out, name, tiny_table(name, n), f"/data/{name}.tar")
    return out


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- atomic writes ------------------------------------------------------------------------


def test_atomic_write_writes_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write(target, lambda tmp: tmp.write_text("hello"))
    assert target.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_error_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise ValueError("writer died")

    with pytest.raises(ValueError, match="writer died"):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert temps(tmp_path) == []
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.txt", half)
    assert not (tmp_path / "new.txt").exists() and temps(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "said"),
    [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "quota exhausted")],
)
def test_atomic_write_full_disk_is_one_line(tmp_path: Path, code: int, said: str) -> None:
    target = tmp_path / "a.parquet"

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 10)
        raise OSError(code, os.strerror(code))

    with pytest.raises(JCError) as caught:
        atomic_write(target, full)
    message = str(caught.value)
    assert message.startswith(f"{said} writing {target}:"), message
    assert "nothing partial is left" in message and "\n" not in message
    assert temps(tmp_path) == [] and not target.exists()


def test_atomic_write_other_error_on_a_nearly_full_disk_is_no_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")

    def fails(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise RuntimeError("write failed")  # what torch.save says on a full disk

    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 4096))
    with pytest.raises(JCError, match=r"^no space left on the device writing .*a\.pt"):
        atomic_write(tmp_path / "a.pt", fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 0, 1 << 30))
    with pytest.raises(RuntimeError, match="write failed"):
        atomic_write(tmp_path / "a.pt", fails)
    assert temps(tmp_path) == []


def test_write_json_atomic_sorts_keys_and_read_json_wants_an_object(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [1, 2], "b": 1}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_json(path)


def test_remove_stale_temps_removes_only_dead_writers_of_this_host(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = tmp_path / f".00000.parquet.{host}.{dead_pid()}.tmp"
    mine = tmp_path / f".00001.parquet.{host}.{os.getpid()}.tmp"
    other_host = tmp_path / f".00002.parquet.elsewhere-{host}.{dead_pid()}.tmp"
    odd = tmp_path / ".notes.tmp"
    for path in (dead, mine, other_host, odd):
        path.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == 1
    assert not dead.exists() and mine.exists() and other_host.exists() and odd.exists()
    assert dead_local_writer(host, dead_pid()) and not dead_local_writer(host, os.getpid())
    assert not dead_local_writer(f"elsewhere-{host}", dead_pid())  # unknowable: not dead


# --- parts, digests and markers ----------------------------------------------------------


def test_write_part_records_size_and_sha256_of_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "00000.parquet"
    table = tiny_table("00000", 5, errors=(1,))
    digest = write_part(path, table)
    data = path.read_bytes()
    assert digest == {"part_bytes": len(data), "part_sha256": hashlib.sha256(data).hexdigest()}
    assert file_digest(path) == {"bytes": len(data), "sha256": digest["part_sha256"]}
    back = pq.read_table(path, page_checksum_verification=True)
    assert back.equals(table)
    assert back.schema.metadata[b"jestcurate.schema_version"] == b"1"
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]


def test_part_table_and_embedding_matrix_round_trip_with_null_rows() -> None:
    rows = rows_of("s", 4, errors=(1,))
    emb = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float16)
    table = part_table(
        "/d/s.tar", rows, emb, emb * 2, np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]), 2
    )
    assert table.column("shard").to_pylist() == ["/d/s.tar"] * 4
    assert table.column("clip_score").to_pylist()[1] is None
    assert table.column("ref_loss").to_pylist() == [1.0, None, 2.0, 3.0]
    matrix = embedding_matrix(table.column("img_emb"))
    assert matrix.dtype == np.float32 and matrix.shape == (4, 2)
    np.testing.assert_array_equal(matrix[[0, 2, 3]], emb.astype(np.float32))
    assert np.isnan(matrix[1]).all()
    # a slice starts at an offset into the values: rows 2 and 3 only
    tail = embedding_matrix(table.column("txt_emb").slice(2))
    np.testing.assert_array_equal(tail, [[6, 8], [10, 12]])
    with pytest.raises(ValueError, match="3 ok rows but 2 embeddings"):
        part_table("/d/s.tar", rows, emb[:2], emb[:2], np.zeros(2), np.zeros(2), 2)


def test_digest_problem(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 2000)
    recorded = file_digest(path)
    assert digest_problem(path, recorded) is None
    assert digest_problem(tmp_path / "gone.bin", recorded) == "missing"
    path.write_bytes(b"a" * 1999)
    assert digest_problem(path, recorded).startswith("damaged (1,999 bytes; 2")
    path.write_bytes(b"b" * 2000)
    assert digest_problem(path, recorded, full=False) is None
    assert digest_problem(path, recorded) == "damaged (its sha256 differs from the recorded one)"
    assert file_digests(tmp_path, ["f.bin", "gone.bin"]) == {"f.bin": file_digest(path)}


def test_part_problem_against_markers(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"])
    files = PartFiles(out)
    markers = read_markers(out)
    assert files.names() == {"00000", "00001"}
    assert part_problem(files, "00000", markers["00000"], full=True) is None

    size = files.size("00000")
    assert size is not None
    path = files.path("00000")
    path.write_bytes(path.read_bytes() + b"\0" * 1000)
    wanted = f"damaged ({size + 1000:,} bytes; its marker says {size:,})"
    assert part_problem(files, "00000", markers["00000"]) == wanted

    flip_byte(files.path("00001"))
    assert part_problem(files, "00001", markers["00001"]) is None  # the size alone matches
    assert part_problem(files, "00001", markers["00001"], full=True) == (
        "damaged (its sha256 differs from its marker's)"
    )

    files.path("00001").unlink()
    assert part_problem(files, "00001", markers["00001"]) == (
        "missing (its marker says it was written)"
    )
    # a failed shard that wrote nothing is not missing a part; one that recorded a part is
    assert part_problem(files, "00001", {"status": "failed"}) is None
    assert part_problem(files, "00001", {"status": "failed", "part_bytes": 10}) == (
        "missing (its marker says it was written)"
    )
    # markers from before sizes were recorded are taken on trust
    assert part_problem(files, "00000", {"status": "ok"}, full=True) is None


def test_part_problem_orphaned_and_claimed(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    files = PartFiles(out)
    assert part_problem(files, "nothing", None) is None
    shutil.copy(files.path("00000"), files.path("stray"))
    assert part_problem(files, "stray", None) == "orphaned (a part with no marker in done/)"
    (out / "claims").mkdir()
    (out / "claims" / "stray.json").write_text("{}")
    assert files.claimed("stray")
    assert part_problem(files, "stray", None) == (
        "orphaned, or still being written (no marker yet, and a score run claims it)"
    )


def test_read_markers_skips_unreadable_ones(tmp_path: Path) -> None:
    assert read_markers(tmp_path) == {}  # no done/ at all
    out = make_set(tmp_path / "s", ["00000", "00001"])
    (out / "done" / "00001.json").write_text("{cut sh")
    (out / "done" / "00002.json").write_text('"a string"')
    assert set(read_markers(out)) == {"00000"}


def test_forget_unmatched_drops_markers_of_changed_parts(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001", "00002"])
    files = PartFiles(out)
    path = files.path("00000")
    path.write_bytes(path.read_bytes()[:-10])
    flip_byte(files.path("00001"))
    markers = read_markers(out)
    forgotten = forget_unmatched(out, markers, ["00000", "00001", "00002"])
    assert [name for name, _ in forgotten] == ["00000"]
    assert forgotten[0][1].startswith("damaged (")
    assert set(markers) == {"00001", "00002"}
    assert not (out / "done" / "00000.json").exists()
    forgotten = forget_unmatched(out, markers, ["00001", "00002"], full=True)
    assert forgotten == [("00001", "damaged (its sha256 differs from its marker's)")]
    assert set(read_markers(out)) == {"00002"}


def test_forget_unmatched_full_adds_hashes_to_old_markers(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    old = {"shard": "/data/00000.tar", "status": "ok", "counts": {"samples": 3}}
    write_json_atomic(out / "done" / "00000.json", old)
    assert forget_unmatched(out, read_markers(out), ["00000"], full=True) == []
    marker = read_json(out / "done" / "00000.json")
    assert marker["part_bytes"] == PartFiles(out).size("00000")
    assert marker["part_sha256"] == PartFiles(out).sha256("00000")
    # an old marker whose part holds another row count is forgotten
    write_json_atomic(out / "done" / "00000.json", {**old, "counts": {"samples": 7}})
    forgotten = forget_unmatched(out, read_markers(out), ["00000"], full=True)
    assert forgotten == [("00000", "damaged (3 rows; its marker says 7)")]


def test_forget_unmatched_full_does_not_bless_a_damaged_old_part(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    old = {"shard": "/data/00000.tar", "status": "ok", "counts": {"samples": 3}}
    write_json_atomic(out / "done" / "00000.json", old)
    part = out / "parts" / "00000.parquet"
    chunk = pq.ParquetFile(part).metadata.row_group(0).column(9)  # img_emb's values
    assert chunk.path_in_schema == "img_emb.list.element"
    flip_byte(part, at=chunk.data_page_offset + chunk.total_compressed_size - 1)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(part, page_checksum_verification=True)
    forgotten = forget_unmatched(out, read_markers(out), ["00000"], full=True)
    assert [name for name, _ in forgotten] == ["00000"]
    assert not (out / "done" / "00000.json").exists()  # forgotten: the next run redoes it


def test_set_aside_strays_moves_unclaimed_parts_no_input_redoes(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    parts = out / "parts"
    for name in ("stray", "input", "live"):
        shutil.copy(parts / "00000.parquet", parts / f"{name}.parquet")
    moved = set_aside_strays(out, read_markers(out), {"input"}, live=lambda n: n == "live")
    assert moved == ["stray"]
    assert (out / "orphaned" / "stray.parquet").is_file()
    assert sorted(p.stem for p in parts.iterdir()) == ["00000", "input", "live"]


def test_marker_settles(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    write_json_atomic(out / "done" / "00001.json", {"status": "failed", "error": "x"})
    now = time.time()
    assert marker_settles(out, "00000", now + 3600)  # done, whenever
    assert marker_settles(out, "00001", now - 3600)  # failed during this run
    assert not marker_settles(out, "00001", now + 3600)  # failed in an earlier run
    assert not marker_settles(out, "00002", now - 3600)


# --- meta identity -----------------------------------------------------------------------


def test_identity_mismatches_names_fields_with_both_values() -> None:
    assert identity_mismatches(META, dict(META)) == []
    wanted = {**META, "role": "learner", "precision": "bf16", "logit_scale": 99.0}
    assert identity_mismatches(META, wanted) == [
        "role: 'reference' there, 'learner' now",
        "precision: 'fp32' there, 'bf16' now",
    ]


def test_identity_mismatches_names_the_pretrained_files() -> None:
    sha = "0123456789abcdef" * 4
    there = {**META, "pretrained": "/ckpt/a.pt", "pretrained_sha256": sha, "init_seed": None}
    # the same file at another path is the same weights
    assert identity_mismatches(there, {**there, "pretrained": "/elsewhere/a.pt"}) == []
    assert identity_mismatches(there, META) == [
        "pretrained: /ckpt/a.pt (sha256 0123456789ab) there, random weights now",
        "init_seed: None there, 0 now",
    ]
    other = {**there, "pretrained": "/ckpt/b.pt", "pretrained_sha256": "f" * 64}
    assert identity_mismatches(there, other) == [
        "pretrained: /ckpt/a.pt (sha256 0123456789ab) there, /ckpt/b.pt (sha256 ffffffffffff) now"
    ]


def test_identity_mismatches_identifies_a_config_by_content() -> None:
    there = {**META, "model": "my-config", "model_config_sha256": "c" * 64}
    assert identity_mismatches(there, {**there, "model": None}) == []
    assert identity_mismatches(there, {**there, "model_config_sha256": "d" * 64}) == [
        f"model_config_sha256: {'c' * 64!r} there, {'d' * 64!r} now"
    ]


def test_check_meta_refuses_a_set_made_differently(tmp_path: Path) -> None:
    check_meta(tmp_path, META)  # nothing there yet
    write_json_atomic(tmp_path / "meta.json", META)
    check_meta(tmp_path, {**META, "logit_scale": 1.0})  # not an identity field
    with pytest.raises(JCError) as caught:
        check_meta(tmp_path, {**META, "precision": "fp16"})
    assert str(caught.value) == (
        f"{tmp_path} holds scores made differently (precision: 'fp32' there, 'fp16' now); "
        "use another --out, or the options it was made with"
    )
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(JCError, match=r"meta\.json is unreadable \(.*\); remove it or use"):
        check_meta(tmp_path, META)


def test_create_meta_creates_once_then_checks(tmp_path: Path) -> None:
    out = tmp_path / "new" / "set"
    create_meta(out, META)
    assert read_json(out / "meta.json") == META
    create_meta(out, {**META, "tool_version": "later"})  # agrees: kept as it was
    assert read_json(out / "meta.json") == META
    with pytest.raises(JCError, match="role: 'reference' there, 'learner' now"):
        create_meta(out, {**META, "role": "learner"})
    assert temps(out) == []


# --- value_differences and finished_output ----------------------------------------------


def test_value_differences_by_dotted_path() -> None:
    existing = {"parameters": {"ratio": 0.2, "batch": 4, "deep": {"x": "a"}}, "only_there": 1}
    wanted = {"parameters": {"ratio": 0.25, "batch": 4, "deep": {"x": "b"}}, "new": [1, 2]}
    assert value_differences(existing, wanted) == [
        "parameters.ratio: 0.2 there, 0.25 now",
        'parameters.deep.x: "a" there, "b" now',
        "new: null there, [1, 2] now",
    ]
    # a mapping against a scalar is one difference, shown whole
    assert value_differences({"a": 3}, {"a": {"b": 1}}) == ['a: 3 there, {"b": 1} now']
    assert value_differences({"a": {"b": 1}}, {"a": None}) == ['a: {"b": 1} there, null now']


def test_value_differences_shortens_long_values() -> None:
    (line,) = value_differences({"k": "x" * 200}, {"k": "y"})
    shown = line.removeprefix("k: ").removesuffix(' there, "y" now')
    assert len(shown) == 80 and shown.endswith("...") and shown.startswith('"xxx')


keys = st.text("abcxyz_", min_size=1, max_size=4)
leaves = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5)
trees = st.recursive(
    st.dictionaries(keys, leaves, max_size=3),
    lambda inner: st.dictionaries(keys, inner | leaves, max_size=3),
    max_leaves=12,
)


def _leaf_paths(tree: dict, at: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            found += _leaf_paths(v, (*at, k))
        else:
            found.append((*at, k))
    return found


@settings(max_examples=60, deadline=None)
@given(tree=trees, extra=trees)
def test_value_differences_none_for_equal_or_superset(tree: dict, extra: dict) -> None:
    assert value_differences(tree, tree) == []
    assert value_differences({**extra, **tree}, tree) == []  # keys only there are not compared


@settings(max_examples=60, deadline=None)
@given(tree=trees, data=st.data())
def test_value_differences_one_changed_leaf_is_one_line(tree: dict, data: st.DataObject) -> None:
    paths = _leaf_paths(tree)
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    changed = json.loads(json.dumps(tree))
    node = changed
    for k in path[:-1]:
        node = node[k]
    old = node[path[-1]]
    node[path[-1]] = "__changed__"
    assert value_differences(tree, changed) == [
        f'{".".join(path)}: {json.dumps(old, sort_keys=True)} there, "__changed__" now'
    ]


def test_finished_output(tmp_path: Path) -> None:
    identity = {"inputs": {"ref": "/r"}, "parameters": {"ratio": 0.5, "b": 4, "c": 1, "d": 2}}
    assert finished_output(tmp_path, "summary.json", "manifest.parquet", identity, "x") is None
    write_json_atomic(tmp_path / "summary.json", {**identity, "rows": 10})
    # a summary without its product: not finished, but no refusal either
    assert finished_output(tmp_path, "summary.json", "manifest.parquet", identity, "x") is None
    (tmp_path / "manifest.parquet").write_bytes(b"")
    found = finished_output(tmp_path, "summary.json", "manifest.parquet", identity, "x")
    assert found is not None and found["rows"] == 10
    other = {"parameters": {"ratio": 0.25, "b": 8, "c": 2, "d": 3}}
    with pytest.raises(JCError) as caught:
        finished_output(tmp_path, "summary.json", "manifest.parquet", other, "selection")
    assert str(caught.value) == (
        f"{tmp_path} holds a different selection (parameters.ratio: 0.5 there, 0.25 now; "
        "parameters.b: 4 there, 8 now; parameters.c: 1 there, 2 now; and 1 more); "
        "use another --out"
    )
    (tmp_path / "summary.json").write_text("nope")
    with pytest.raises(JCError, match=r"summary\.json is unreadable"):
        finished_output(tmp_path, "summary.json", "manifest.parquet", identity, "x")


# --- opening and reading a score set -----------------------------------------------------


def test_open_score_set_reads_a_set(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00001", "00000"])
    s = open_score_set(out, role="reference")
    assert s.part_names() == ["00000", "00001"]
    assert (s.role, s.dim, s.scale, s.bias, s.kind) == ("reference", DIM, 10.0, None, "softmax")
    assert s.has_images and s.problems(full=True) == [] and s.failed_shards() == []
    table = s.read_part("00000", ["key", "img_emb"])
    assert table.column("key").to_pylist() == ["000000000", "000000001", "000000002"]


@pytest.mark.parametrize(
    ("setup", "role", "message"),
    [
        ("absent", None, r"^{p} is not a score set \(does not exist\); make one with `jestcurate"),
        ("empty", None, r"^{p} is not a score set \(has no meta\.json\); make one with"),
        ("bad json", None, r"^{p}/meta\.json is unreadable: "),
        (
            "version 2",
            None,
            r"^{p} has score-set schema version 2; this jestcurate reads version 1$",
        ),
        ("no version", None, r"^{p} has score-set schema version None; this jestcurate reads"),
        ("lacks", None, r"^{p}/meta\.json lacks embed_dim, loss$"),
        ("ok", "learner", r"^{p} was scored with role 'reference', but a learner score set is"),
        ("no parts", None, r"^{p} has no parts yet; run `jestcurate score` into it first$"),
    ],
)
def test_open_score_set_errors(tmp_path: Path, setup: str, role: str | None, message: str) -> None:
    out = tmp_path / "s"
    if setup != "absent":
        out.mkdir()
    meta = dict(META)
    if setup == "version 2":
        meta["schema_version"] = 2
    elif setup == "no version":
        del meta["schema_version"]
    elif setup == "lacks":
        del meta["embed_dim"], meta["loss"]
    if setup not in ("absent", "empty"):
        make_set(out, [] if setup == "no parts" else ["00000"], meta=meta)
    if setup == "bad json":
        (out / "meta.json").write_text("{not json")
    with pytest.raises(JCError, match=message.format(p=out)):
        open_score_set(out, role=role)


def test_open_score_set_checks_parts_against_markers(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001", "00002"])
    part = out / "parts" / "00000.parquet"
    part.write_bytes(part.read_bytes()[:-5])
    (out / "parts" / "00002.parquet").unlink()
    with pytest.raises(JCError) as caught:
        open_score_set(out)
    message = str(caught.value)
    assert message.startswith(f"{out}: part 00000 is damaged (")
    assert message.endswith(
        f" and 1 more; rerun the `jestcurate score` that wrote {out} to redo it, or see "
        f"`jestcurate verify {out}`"
    )
    s = open_score_set(out, check=False)
    assert [name for name, _ in s.problems()] == ["00000", "00002"]


def test_read_part_refusals(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"], meta={**META, "embed_dim": 8})
    s = open_score_set(out)
    with pytest.raises(JCError) as caught:
        s.read_part("00000", ["img_emb"])
    assert str(caught.value) == (
        f"{out}/parts/00000.parquet has 4-wide embeddings but {out}/meta.json says embed_dim 8"
    )
    assert s.read_part("00000", ["key"]).num_rows == 3  # no embeddings read: no refusal
    (out / "parts" / "00000.parquet").write_bytes(b"PAR1garbagePAR1")
    with pytest.raises(JCError, match=r"^part .*00000\.parquet is unreadable \(.*\); rerun the"):
        s.read_part("00000", ["key"])
    with pytest.raises(JCError, match=r"is unreadable .*; rerun the command that wrote it"):
        read_output(out / "parts" / "00000.parquet")


def test_failed_shards_lines(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    write_json_atomic(
        out / "done" / "00002.json",
        {"status": "failed", "error": "truncated tar", "counts": {"samples": 5}},
    )
    write_json_atomic(out / "done" / "00001.json", {"status": "failed", "error": None})
    s = ScoreSet(out, META, [])
    assert s.failed_shards() == [
        "00001: failed, no reason recorded",
        "00002: truncated tar",
    ]


def test_fingerprint_is_stable_and_follows_content(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000", "00001"], n=3)
    first = fingerprint(open_score_set(out))
    assert first == fingerprint(open_score_set(out))
    assert first["rows"] == 6 and first["parts"] == 2 and first["path"] == str(out.resolve())
    assert first["role"] == "reference" and first["precision"] == "fp32"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    moved = fingerprint(open_score_set(copy))
    assert moved["parts_sha256"] == first["parts_sha256"] and moved["path"] != first["path"]
    make_set(out, ["00002"], n=2)
    more = fingerprint(open_score_set(out))
    assert more["rows"] == 8 and more["parts_sha256"] != first["parts_sha256"]
    # another row count in one part, same part names: another fingerprint
    shutil.rmtree(copy)
    make_set(copy, ["00000", "00001", "00002"], n=4)
    assert fingerprint(open_score_set(copy))["parts_sha256"] != more["parts_sha256"]


def test_fingerprint_of_an_unreadable_part_is_one_line(tmp_path: Path) -> None:
    out = make_set(tmp_path / "s", ["00000"])
    s = open_score_set(out)
    (out / "parts" / "00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(JCError, match=r"^part .*00000\.parquet is unreadable .*; rerun"):
        fingerprint(s)


def test_repair_hint_and_images(tmp_path: Path) -> None:
    assert repair_hint("/x", {}) == "rerun the `jestcurate score` that wrote /x to redo it"
    assert repair_hint("/x", {"imported": True}).startswith("rerun the `jestcurate import`")
    s = ScoreSet(tmp_path, {**META, "images": False}, [])
    assert not s.has_images
    with pytest.raises(
        JCError,
        match=r"imported from embeddings, not scored from WebDataset .*"
        r"so export cannot read them",
    ):
        s.require_images("export")
    ScoreSet(tmp_path, META, []).require_images("export")
