"""select --ledger as array tasks with --spread-ledger: the merge leaves the ledger pending and
the tasks, run again after it, write its parts (pipelines/select/ledger_round.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import select_summary

from jestcurate.errors import JCError
from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines.report.why import find
from jestcurate.pipelines.select import ledger_round
from jestcurate.pipelines.synth import write_score_set


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 parts of 120 rows, 5 % errors: 3 tasks write 2, 2 and 1 of them."""
    root = tmp_path_factory.mktemp("ledger-spread")
    write_score_set(root / "ref", shards=5, rows_per_shard=120, dim=16, seed=2,
                    error_fraction=0.05)  # fmt: skip
    return root / "ref"


def select(ref: Path, out: Path, **kw) -> dict:
    return select_summary(ref, out, ledger=True, **kw)


def tasks(ref: Path, out: Path, count: int, **kw) -> dict:
    """Every array task twice (round 1 scatters, round 2 selects); the last one merges."""
    for i in [*range(count), *range(count - 1)]:
        summary = select(ref, out, task_index=i, num_tasks=count, **kw)
    return summary


def parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "ledger").glob("*.parquet"))}


@pytest.mark.parametrize("method", ["random", "jest"])
def test_spread_parts_equal_the_merge_written(ref: Path, tmp_path: Path, method: str) -> None:
    """The parts written by tasks 2, 0, 1 separately, after the merge, are the bytes the merge
    writes itself, and the summary ends the same; before that, it is pending."""
    whole = tasks(ref, tmp_path / "merge", 3, method=method)
    assert "status" not in whole["ledger"] and whole["fates"]
    out = tmp_path / "spread"
    summary = tasks(ref, out, 3, method=method, spread_ledger=True)
    assert summary["ledger"] == {"folder": "ledger", "parts": 5, "status": "pending"}
    assert "fates" not in summary and not parts(out)
    with pytest.raises(JCError, match=r"still being written \(0 of 5 parts\)"):
        find(out, "x")
    select(ref, out, method=method, task_index=2, num_tasks=3)
    assert len(parts(out)) == 1
    with pytest.raises(JCError, match=r"still being written \(1 of 5 parts\)"):
        find(out, "x")
    select(ref, out, method=method, task_index=0, num_tasks=3)
    done = select(ref, out, method=method, task_index=1, num_tasks=3)
    assert parts(out) == parts(tmp_path / "merge")
    assert done == whole
    key = pq.read_table(sorted((out / "ledger").glob("*.parquet"))[0]).column("key")[0]
    assert find(out, key.as_py())  # `info --why` reads it


def test_a_task_rerun_skips_and_a_crash_leaves_no_half_part(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    tasks(ref, out, 3, method="random", spread_ledger=True)
    real = ledger_round.pq.write_table

    def crash(table, path, **kw) -> None:
        real(table, path, **kw)
        raise KeyboardInterrupt  # after writing the temporary file, before its rename

    monkeypatch.setattr(ledger_round.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        select(ref, out, method="random", task_index=0, num_tasks=3)
    assert not parts(out) and not [p for p in (out / "ledger").iterdir() if p.is_file()]
    monkeypatch.setattr(ledger_round.pq, "write_table", real)
    select(ref, out, method="random", task_index=0, num_tasks=3)
    assert len(parts(out)) == 2

    def never(*args, **kw) -> None:
        raise AssertionError("a written part written again")

    monkeypatch.setattr(ledger_round, "_write_part", never)
    summary = select(ref, out, method="random", task_index=0, num_tasks=3)  # skips both
    assert summary["ledger"]["status"] == "pending"
    monkeypatch.undo()
    select(ref, out, method="random", merge=True, num_tasks=3)  # the rest, in one run
    summary = select(ref, out, method="random", task_index=1, num_tasks=3)
    assert "status" not in summary["ledger"] and summary["fates"]
    assert summary["ledger"]["rows"] == summary["counts"]["rows"]


def test_every_part_written_but_not_finished_leaves_one_task(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the last part's rename and finish(): --retry still has a task to run,
    and rerunning it (nothing left to write) finishes the summary."""
    from jestcurate.pipelines.select.tasks import unfinished_rounds

    out = tmp_path / "out"
    tasks(ref, out, 3, method="random", spread_ledger=True)
    monkeypatch.setattr(ledger_round, "finish", lambda out, names: None)  # killed before it
    for i in range(3):
        select(ref, out, method="random", task_index=i, num_tasks=3)
    monkeypatch.undo()
    assert len(parts(out)) == 5
    assert ledger_round.progress(out) == 5
    assert unfinished_rounds(out, 3, export=False, ledger=True).ledger == [0]
    summary = select(ref, out, method="random", task_index=0, num_tasks=3)
    assert "status" not in summary["ledger"] and summary["fates"]
    assert unfinished_rounds(out, 3, export=False, ledger=True).ledger == []


def test_an_export_task_never_writes_the_ledger(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """select-export.sbatch carries --ledger --spread-ledger: its tasks leave the parts alone."""
    from jestcurate.pipelines.select import runner

    out = tmp_path / "out"
    tasks(ref, out, 3, method="random", spread_ledger=True)
    select(ref, out, method="random", task_index=2, num_tasks=3)
    before = parts(out)
    files = sorted(p.relative_to(out) for p in (out / "ledger").rglob("*"))
    monkeypatch.setattr(runner, "_export", lambda cfg, report, task: report)
    for i in range(3):
        summary = select(ref, out, method="random", task_index=i, num_tasks=3,
                         spread_ledger=True, export=True)  # fmt: skip
        assert summary["ledger"]["status"] == "pending"
    assert parts(out) == before
    assert sorted(p.relative_to(out) for p in (out / "ledger").rglob("*")) == files


def test_a_training_plan_made_while_pending_resumes_after_the_ledger(
    ref: Path, tmp_path: Path
) -> None:
    """finish() rewrites summary.json (fates, the ledger's facts): a run planned on the pending
    summary still resumes; so does one whose plan recorded the whole file's sha256."""
    import argparse

    from jestcurate.io.files import write_json_atomic
    from jestcurate.trainer.openclip.plan import PLAN_FILE, Plan, check_run_folder, identity

    out = tmp_path / "out"
    tasks(ref, out, 3, method="random", spread_ledger=True)
    plan = Plan((out,), ("original",), 10, (3,), 3, 1, 1, 1, 10, None)
    theirs = argparse.Namespace(resume="latest", name="run", logs=str(tmp_path / "logs"))
    check_run_folder(plan, theirs, write=True)
    old = tmp_path / "old" / "run"
    old.mkdir(parents=True)
    write_json_atomic(old / PLAN_FILE, identity(plan, whole_file=True))
    for i in range(3):
        summary = select(ref, out, method="random", task_index=i, num_tasks=3)
    assert "status" not in summary["ledger"]
    check_run_folder(plan, theirs, write=False)  # the same plan
    older = argparse.Namespace(resume="latest", name="run", logs=str(tmp_path / "old"))
    with pytest.raises(JCError, match="another plan"):  # the whole pending file's hash
        check_run_folder(plan, older, write=False)
    write_json_atomic(old / PLAN_FILE, identity(plan, whole_file=True))
    check_run_folder(plan, older, write=False)


def test_a_missing_scatter_or_unreadable_summary_is_one_line(ref: Path, tmp_path: Path) -> None:
    import shutil

    from jestcurate.pipelines.select.tasks import unfinished_rounds
    from jestcurate.pipelines.status import ledger_status

    out = tmp_path / "out"
    tasks(ref, out, 3, method="random", spread_ledger=True)
    shutil.rmtree(out / "tasks" / "scatter")
    with pytest.raises(JCError):  # scatter_notes' refusal, not index.npy's FileNotFoundError
        select(ref, out, method="random", task_index=0, num_tasks=3)
    (out / "summary.json").write_text("{not json")
    with pytest.raises(JCError, match=r"summary\.json is unreadable"):
        unfinished_rounds(out, 3, export=False, ledger=True)
    with pytest.raises(JCError, match=r"summary\.json is unreadable"):
        ledger_status(out, 3, True)


def test_spread_ledger_without_ledger_is_refused(ref: Path, tmp_path: Path) -> None:
    cfg = select_mod.SelectConfig(reference=ref, out=tmp_path / "out", sampling=SamplerOptions(
        10, ratio=0.2), device="cpu", spread_ledger=True)  # fmt: skip
    with pytest.raises(JCError, match=r"--spread-ledger .* pass --ledger"):
        select_mod.run(cfg)
