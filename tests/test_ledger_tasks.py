"""select --ledger as array tasks: the merge's edge cases (tasks with no step, refusals,
stale and partial ledgers, consistency checks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import select_summary as select

from jestcurate.errors import JCError
from jestcurate.pipelines.synth import write_score_set


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 rows, 5 % errors."""
    root = tmp_path_factory.mktemp("ledger-tasks")
    write_score_set(root / "ref", shards=4, rows_per_shard=150, dim=16, seed=1,
                    error_fraction=0.05)  # fmt: skip
    return root / "ref"


def tasks(ref: Path, out: Path, count: int, **kw) -> dict:
    """Every array task twice (round 1 scatters, round 2 selects); the last one merges."""
    for i in [*range(count), *range(count - 1)]:
        summary = select(ref, out, task_index=i, num_tasks=count, **kw)
    return summary


def ledger(out: Path) -> list[dict]:
    files = sorted((out / "ledger").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.mark.parametrize("method", ["random", "jest"])
def test_a_task_with_no_step(ref: Path, tmp_path: Path, method: str) -> None:
    """8 tasks of about 53 eligible rows and super-batches of 50: some tasks choose nothing
    (their rows are tail), and the merge still writes the ledger."""
    out = tmp_path / "s"
    summary = tasks(ref, out, 8, method=method, ledger=True)
    assert 0 in [t["steps"] for t in summary["tasks"]]
    rows = ledger(out)
    fates = Counter(r["fate"] for r in rows)
    counts = summary["counts"]
    assert len(rows) == counts["rows"] and fates["kept"] == counts["kept"]
    assert fates["kept"] + fates["not_chosen"] + fates["tail"] == counts["eligible"]
    assert fates["tail"] == counts["tail_dropped"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    kept = {(r["shard"], r["key"]): (r["step"], r["position"]) for r in rows
            if r["fate"] == "kept"}  # fmt: skip
    assert kept == {(m["shard"], m["key"]): (m["step"], m["position"]) for m in manifest}
    idle = {t["task"] for t in summary["tasks"] if t["steps"] == 0}
    assert not any(r["task"] in idle for r in rows if r["fate"] == "kept")


def test_ledger_on_a_merged_selection_without_one(ref: Path, tmp_path: Path) -> None:
    """--overwrite is refused for array tasks: the advice is to start again."""
    out = tmp_path / "s"
    tasks(ref, out, 2, method="random")
    with pytest.raises(JCError, match=r"remove .* and rerun every task with --ledger"):
        select(ref, out, method="random", task_index=0, num_tasks=2, ledger=True)
    with pytest.raises(JCError, match=r"remove .* and rerun every task with --ledger"):
        select(ref, out, method="random", merge=True, num_tasks=2, ledger=True)


def test_a_merge_without_ledger_removes_a_stale_one(ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    tasks(ref, out, 2, method="random", ledger=True)
    assert (out / "ledger").is_dir()
    (out / "summary.json").unlink()  # as if the merge were to be made again, without it
    summary = select(ref, out, method="random", merge=True, num_tasks=2)
    assert "ledger" not in summary and not (out / "ledger").exists()


def test_a_crash_leaves_no_partial_ledger(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jestcurate.pipelines.select import ledger as ledger_mod

    out = tmp_path / "s"
    written = []
    real = ledger_mod.pq.write_table

    def crash_on_the_second(table: pa.Table, path: Path, **kw) -> None:
        if written:
            raise OSError("disk gone")
        written.append(path)
        real(table, path, **kw)

    monkeypatch.setattr(ledger_mod.pq, "write_table", crash_on_the_second)
    with pytest.raises(OSError, match="disk gone"):
        select(ref, out, method="random", ledger=True)
    assert written and not (out / "ledger").exists() and not (out / "summary.json").exists()
    monkeypatch.undo()
    summary = select(ref, out, method="random", ledger=True)
    assert len(ledger(out)) == summary["counts"]["rows"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_another_ledger_version_is_refused(ref: Path, tmp_path: Path) -> None:
    from jestcurate.pipelines.report.why import find

    out = tmp_path / "s"
    select(ref, out, method="random", ledger=True)
    key = ledger(out)[0]["key"]
    assert find(out, key)
    part = sorted((out / "ledger").glob("*.parquet"))[-1]
    table = pq.read_table(part)
    meta = {**table.schema.metadata, b"jestcurate.ledger_schema_version": b"0"}
    pq.write_table(table.replace_schema_metadata(meta), part)
    with pytest.raises(JCError, match="schema version 0, not 1: rerun select"):
        find(out, key)


def test_the_advice_for_tasks_without_ledger_works(ref: Path, tmp_path: Path) -> None:
    """A --ledger merge of tasks that selected without it: following the advice (remove
    OUT/tasks, rerun every task with --ledger) gives the ledger, and no bucket stays behind."""
    import re
    import shutil

    out = tmp_path / "s"
    tasks(ref, out, 2, method="random")
    (out / "summary.json").unlink()
    with pytest.raises(JCError, match="selected without --ledger") as refused:
        select(ref, out, method="random", merge=True, num_tasks=2, ledger=True)
    found = re.search(r"remove (\S+) and rerun every task with --ledger", str(refused.value))
    assert found and Path(found.group(1)) == out / "tasks"
    shutil.rmtree(found.group(1))
    summary = tasks(ref, out, 2, method="random", ledger=True)
    assert len(ledger(out)) == summary["counts"]["rows"]
    assert not list((out / "tasks" / "scatter").glob("*/to-*.rec"))
    assert sorted(p.name for p in (out / "tasks" / "scatter" / "00000-of-00002").iterdir()) == [
        "counts.npy", "done.json", "index.npy", "notes-code.npy", "notes-value.npy",
    ]  # fmt: skip


def test_a_scatter_made_again_leaves_no_bucket(ref: Path, tmp_path: Path) -> None:
    """Task 0 scatters again after task 1 finished (its done.json lost): the bucket it fills
    for task 1 is the merge's to delete."""
    out = tmp_path / "s"
    for i in (0, 1):  # task 0 scatters; task 1 scatters and selects
        select(ref, out, method="random", task_index=i, num_tasks=2, ledger=True)
    (out / "tasks" / "scatter" / "00000-of-00002" / "done.json").unlink()
    summary = select(ref, out, method="random", task_index=0, num_tasks=2, ledger=True)
    assert "ledger" in summary
    assert not list((out / "tasks" / "scatter").glob("*/to-*.rec"))


def test_notes_of_a_part_select_never_read() -> None:
    from jestcurate.io.notes import Notes

    notes = Notes()
    notes.start(3)
    assert len(notes.part(0)[0]) == 3
    with pytest.raises(JCError, match="more parts than the 1 select noted"):
        notes.part(1)


@pytest.mark.parametrize(("change", "said"), [(-1, "more eligible rows than"),
                                              (1, "chose from")])  # fmt: skip
def test_eligible_rows_that_changed(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: int, said: str
) -> None:
    """Fewer or more eligible rows when the ledger is written than choosing saw: one line."""
    import dataclasses

    import numpy as np

    from jestcurate.pipelines.select import runner

    real = runner.settle

    def settle(*args):
        choice = real(*args)
        n = len(choice.drawn) + change
        drawn, slot = np.resize(choice.drawn, n), np.resize(choice.slot, n)
        return dataclasses.replace(choice, drawn=drawn, slot=slot)

    monkeypatch.setattr(runner, "settle", settle)
    out = tmp_path / "s"
    with pytest.raises(JCError, match=f"{said}.*it changed meanwhile; rerun"):
        select(ref, out, method="random", ledger=True)
    assert not (out / "ledger").exists() and not (out / ".ledger.partial").exists()


def test_a_task_whose_saved_choice_does_not_match(ref: Path, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "s"
    tasks(ref, out, 2, method="random", ledger=True)
    (out / "summary.json").unlink()
    path = out / "tasks" / "00001-of-00002" / "ledger-drawn.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(JCError, match=r"task 1 of .* but saved"):
        select(ref, out, method="random", merge=True, num_tasks=2, ledger=True)


def test_info_on_an_empty_ledger_and_report_ids(ref: Path, tmp_path: Path) -> None:
    import json

    from conftest import run_cli

    from jestcurate.pipelines.report.page import slug

    out = tmp_path / "s"
    select(ref, out, method="random", ledger=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text())
    summary["ledger"].update(rows=0, bytes=0, bytes_per_row=None)  # as for an empty score set
    path.write_text(json.dumps(summary))
    code, output = run_cli("info", out)
    assert code == 0, output
    assert "no rows" in output and "None" not in output
    assert slug("image decode failed") == "image-decode-failed"
    assert slug("learner: <bad> 'x'") == "learner-bad-x" and slug("") == "-"
