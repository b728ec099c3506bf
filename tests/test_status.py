"""Unit tests of scale/status.py: where a score set stands from its markers, parts and claims,
and which array tasks still have work. Tiny sets built here; no scoring runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DIM, TINY_META, flip_byte, write_marked_part
from rich.console import Console

from jestcurate.errors import JCError
from jestcurate.io.store import part_table, write_json_atomic
from jestcurate.pipelines.status import export_status, print_status, read_status
from jestcurate.scale.status import score_status
from jestcurate.scale.tasks import unfinished_tasks

DIM, META = TINY_DIM, TINY_META


def inputs(tmp_path: Path, count: int) -> list[str]:
    """`count` input tars (empty: status never opens them), as expand_inputs names them."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        (folder / f"{i:05d}.tar").write_bytes(b"")
    return [str((folder / f"{i:05d}.tar").resolve()) for i in range(count)]


def write_ok(out: Path, name: str, shard: str, n: int = 2) -> None:
    """A part and its ok marker, as score leaves them."""
    rows = [
        {
            "key": f"{name}{i}",
            "index": i,
            "uid": None,
            "url": None,
            "caption": None,
            "sha256": None,
            "status": "ok",
            "error": None,
        }
        for i in range(n)
    ]
    emb = np.ones((n, DIM), dtype=np.float16)
    table = part_table(shard, rows, emb, emb, np.zeros(n), np.zeros(n), DIM)
    write_marked_part(out, name, table, shard)


def write_failed(out: Path, name: str, shard: str, error: str) -> None:
    (out / "done").mkdir(parents=True, exist_ok=True)
    marker = {"shard": shard, "name": name, "status": "failed", "error": error}
    write_json_atomic(out / "done" / f"{name}.json", marker)


def new_set(tmp_path: Path) -> Path:
    out = tmp_path / "scores"
    out.mkdir()
    write_json_atomic(out / "meta.json", META)
    return out


def claim(out: Path, name: str, expires_in: float, host: str = "elsewhere.invalid") -> None:
    """A claim by a run on another host: live until its lease runs out."""
    (out / "claims").mkdir(exist_ok=True)
    now = time.time()
    (out / "claims" / f"{name}.json").write_text(
        json.dumps(
            {
                "host": host,
                "pid": 4242,
                "pid_start": None,
                "token": "another-run",
                "job": None,
                "claimed": now,
                "expires": now + expires_in,
            }
        )
    )


def test_not_a_score_set(tmp_path: Path) -> None:
    with pytest.raises(JCError) as caught:
        score_status(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path} is not a score set, a selection or an export (no meta.json, no shards/)"
    )


def test_done_failed_and_damaged_without_inputs(tmp_path: Path) -> None:
    out = new_set(tmp_path)
    write_ok(out, "00000", "/d/00000.tar")
    write_ok(out, "00001", "/d/00001.tar")
    write_failed(out, "00002", "/d/00002.tar", "truncated tar")
    part = out / "parts" / "00001.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[:-7])
    (out / "parts" / "stray.parquet").write_bytes((out / "parts" / "00000.parquet").read_bytes())
    status = score_status(out)
    assert status.done == ["/d/00000.tar"]
    assert status.failed == [("/d/00002.tar", "truncated tar")]
    assert status.damaged == [
        ("/d/00001.tar", f"damaged ({size - 7:,} bytes; its marker says {size:,})"),
        ("stray", "orphaned (a part with no marker in done/)"),
    ]
    assert status.pending is None and status.running == [] and status.outside == 0
    assert not status.complete
    assert status.as_dict() == {
        "kind": "score set",
        "out": str(out),
        "done": 1,
        "failed": [{"shard": "/d/00002.tar", "error": "truncated tar"}],
        "damaged": [{"shard": s, "problem": p} for s, p in status.damaged],
        "running": [],
        "pending": None,
        "outside_inputs": 0,
    }


def test_pending_and_outside_with_inputs(tmp_path: Path) -> None:
    urls = inputs(tmp_path, 4)
    out = new_set(tmp_path)
    write_ok(out, "00000", urls[0])
    write_failed(out, "00001", urls[1], "decode error")
    write_ok(out, "other", "/elsewhere/other.tar")  # from a run over other INPUTS
    (out / "parts" / "unrelated.parquet").write_bytes(b"x")  # not an input's: not shown
    (out / "parts" / "00003.parquet").write_bytes(b"x")  # an input's part with no marker
    status = score_status(out, [str(tmp_path / "in")])
    assert status.done == [urls[0]] and status.failed == [(urls[1], "decode error")]
    assert status.pending == [urls[2], urls[3]]
    assert status.outside == 1
    assert status.damaged == [("00003", "orphaned (a part with no marker in done/)")]
    assert not status.complete


def test_inputs_sharing_a_stem_keep_the_names_their_markers_hold(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00000.tar").write_bytes(b"")
    first, second = (str((tmp_path / f / "00000.tar").resolve()) for f in ("a", "b"))
    out = new_set(tmp_path)
    write_ok(out, "00000", first)  # scored before b/00000.tar was among the inputs
    status = score_status(out, [first, second])
    assert status.done == [first] and status.pending == [second] and status.outside == 0


def test_a_live_claim_is_running_not_pending(tmp_path: Path) -> None:
    urls = inputs(tmp_path, 3)
    out = new_set(tmp_path)
    write_ok(out, "00000", urls[0])
    claim(out, "00001", expires_in=3600)
    claim(out, "00002", expires_in=-10)  # its lease ran out: stale, so still pending
    status = score_status(out, urls)
    assert status.running == [(urls[1], "elsewhere.invalid:4242")]
    assert status.pending == [urls[2]]
    # without INPUTS a claim is named by its shard name
    assert score_status(out).running == [("00001", "elsewhere.invalid:4242")]


def test_a_same_size_change_needs_full(tmp_path: Path) -> None:
    urls = inputs(tmp_path, 1)
    out = new_set(tmp_path)
    write_ok(out, "00000", urls[0])
    assert score_status(out, urls).complete
    flip_byte(out / "parts" / "00000.parquet")
    quick = score_status(out, urls)
    assert quick.done == urls and quick.complete
    full = score_status(out, urls, full=True)
    assert full.done == [] and not full.complete
    assert full.damaged == [(urls[0], "damaged (its sha256 differs from its marker's)")]


def test_missing_meta_is_damage(tmp_path: Path) -> None:
    out = new_set(tmp_path)
    write_ok(out, "00000", "/d/00000.tar")
    (out / "meta.json").unlink()
    status = score_status(out)
    assert status.done == ["/d/00000.tar"]
    assert status.damaged == [("meta.json", "missing (a score rerun writes it again)")]


def test_unfinished_tasks(tmp_path: Path) -> None:
    urls = inputs(tmp_path, 4)  # 2 tasks: task 0 has 00000 and 00002, task 1 00001 and 00003
    out = new_set(tmp_path)
    assert unfinished_tasks(out, urls, 2) == ([0, 1], 0)
    write_ok(out, "00000", urls[0])
    write_ok(out, "00002", urls[2])
    assert unfinished_tasks(out, urls, 2) == ([1], 0)
    assert unfinished_tasks(out, urls, 3) == ([0, 1], 0)  # 3 tasks: [0, 3], [1], [2] (done)
    write_ok(out, "00001", urls[1])
    write_ok(out, "00003", urls[3])
    assert unfinished_tasks(out, urls, 2) == ([], 0)
    part = out / "parts" / "00001.parquet"
    part.write_bytes(part.read_bytes()[:-3])  # a damaged part is work again
    assert unfinished_tasks(out, urls, 2) == ([1], 0)
    write_ok(out, "00001", urls[1])
    write_failed(out, "00003", urls[3], "timeout")  # a failed shard is work again ...
    assert unfinished_tasks(out, urls, 2) == ([1], 0)
    claim(out, "00003", expires_in=3600)  # ... unless a live run is on it now
    assert unfinished_tasks(out, urls, 2) == ([], 1)
    claim(out, "00003", expires_in=-1)
    assert unfinished_tasks(out, urls, 2) == ([1], 0)


def test_export_status(tmp_path: Path) -> None:
    with pytest.raises(JCError, match=r"has no export \(no shards/export\.json\); run select"):
        export_status(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    meta = {"samples": 10, "samples_per_shard": 4, "shards": 3,
            "pattern": "shards/{00000..00002}.tar"}  # fmt: skip
    write_json_atomic(shards / "export.json", meta)
    (shards / "00000.tar").write_bytes(b"")
    (shards / "00002.tar").write_bytes(b"")
    found = export_status(tmp_path)
    assert (found["shards"], found["written"], found["missing"]) == (3, 2, ["00001.tar"])
    assert not found["finished"]
    (shards / "00001.tar").write_bytes(b"")
    assert export_status(tmp_path)["finished"]
    del meta["pattern"], meta["shards"]  # written when it finishes: an export under way
    write_json_atomic(shards / "export.json", meta)
    assert not export_status(tmp_path)["finished"]


def test_print_status_lists_shards_unwrapped(tmp_path: Path) -> None:
    urls = inputs(tmp_path, 5)
    out = new_set(tmp_path)
    long_error = "a decoding error " * 10
    write_failed(out, "00000", urls[0], long_error.strip())
    console = Console(record=True, width=60)
    print_status(score_status(out, urls).as_dict(), console=console, listed=2)
    lines = console.export_text().splitlines()
    assert lines[0] == f"{out} (score set)"
    assert f"failed {urls[0]}: {long_error.strip()}" in lines  # one line, wider than 60
    assert f"pending {urls[1]}" in lines and f"pending {urls[2]}" in lines
    assert f"pending {urls[3]}" not in lines and "pending ... and 2 more" in lines


def test_a_select_tasks_slurm_log_is_found_across_split_arrays(tmp_path: Path) -> None:
    """Tasks 0-2 in array job 100, tasks 3-4 in 101 (MaxArraySize 3), retried as job 102."""
    from jestcurate.scale.slurm_select import task_log

    chains = [{"arrays": {"round 1": [["100", 0], ["101", 3]]}},
              {"arrays": {"round 1": [["102", 0]], "merge": [["103", 0]]}}]  # fmt: skip
    logs = tmp_path / "slurm" / "logs"
    logs.mkdir(parents=True)
    write_json_atomic(tmp_path / "slurm" / "select-jobs.json", {"chains": chains})
    for name in ("select-100_2.out", "select-101_1.out", "select-102_0.out"):
        (logs / name).write_text("...\n")
    assert task_log(tmp_path, "round 1", 4) == logs / "select-101_1.out"
    assert task_log(tmp_path, "round 1", 2) == logs / "select-100_2.out"
    assert task_log(tmp_path, "round 1", 0) == logs / "select-102_0.out"  # the newest run
    assert task_log(tmp_path, "round 1", 3) is None  # no log: never started
    assert task_log(tmp_path, "round 2", 0) is None


def test_a_pending_ledger_shows_its_parts_and_tasks_left(tmp_path: Path) -> None:
    """select --ledger --spread-ledger as 3 tasks, merged, task 2's share written: 1 of 5 parts,
    tasks 0 and 1 with parts left; unfinished until the last part is written."""
    from jestcurate.math.sampling import SamplerOptions
    from jestcurate.pipelines import select as select_mod
    from jestcurate.pipelines.status import selection_status
    from jestcurate.pipelines.synth import write_score_set

    write_score_set(tmp_path / "ref", shards=5, rows_per_shard=60, dim=8, seed=2)
    out = tmp_path / "sel"

    def task(index: int, spread: bool = True) -> None:
        cfg = select_mod.SelectConfig(
            reference=tmp_path / "ref", out=out, sampling=SamplerOptions(8, ratio=0.25),
            device="cpu", min_clip_score=0.0, ledger=True, spread_ledger=spread,
            task_index=index, num_tasks=3,
        )  # fmt: skip
        select_mod.run(cfg)

    for index in (0, 1, 2, 0, 1, 2):  # task 2's second run writes its share
        task(index)
    found = selection_status(out)
    assert found["merged"] and not found["finished"] and not found["unfinished"]
    ledger = found["ledger"]
    assert (ledger["status"], ledger["parts"], ledger["written"]) == ("pending", 5, 1)
    assert [u["task"] for u in ledger["unfinished"]] == [0, 1]
    console = Console(record=True, width=200)
    print_status(found, console=console)
    text = console.export_text()
    assert "1 of 5 parts written (2 tasks with parts left: task 0, 1)" in text, text
    assert "ledger unfinished task 0 (no log found)" in text, text
    _an_export_beside_a_pending_ledger(out)
    for index in (0, 1):
        task(index, spread=False)
    found, complete = read_status(str(out))
    assert complete and found["kind"] == "export"
    found = selection_status(out)
    assert found["finished"] and found["ledger"] is None  # no ledger round planned on file
    (out / "slurm").mkdir()
    (out / "slurm" / "select-ledger.sbatch").write_text("#!/bin/bash\n")  # `slurm select`'s
    assert selection_status(out)["ledger"]["status"] == "written"


def _an_export_beside_a_pending_ledger(out: Path) -> None:
    """shards/export.json (a finished export) does not hide the pending ledger: not finished
    (`status --check` exits 1), and both are shown."""
    shards = out / "shards"
    shards.mkdir()
    meta = {"samples": 4, "samples_per_shard": 4, "shards": 1, "pattern": "shards/00000.tar"}
    write_json_atomic(shards / "export.json", meta)
    (shards / "00000.tar").write_bytes(b"")
    found, complete = read_status(str(out))
    assert not complete and found["kind"] == "export"
    assert (found["ledger"]["status"], found["ledger"]["written"]) == ("pending", 1)
    console = Console(record=True, width=200)
    print_status(found, console=console)
    text = console.export_text()
    assert "shards written" in text and "1 of 5 parts written" in text, text
    assert "ledger unfinished task 0" in text, text
