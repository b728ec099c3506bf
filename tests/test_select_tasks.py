"""Partitioned select: array tasks each choose from a hash partition, then one merge."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli, run_subprocess

from jestcurate.io.eligible import identities
from jestcurate.math.partition import interleave, row_hash, task_of
from jestcurate.pipelines.synth import write_score_set

ARGS = ("-b", 32, "--ratio", 0.25)


# --- the pure parts -------------------------------------------------------------------------


def test_row_hash_depends_on_the_identity_only() -> None:
    names = [b"a", b"00042/000000017", b"x" * 8, b"x" * 9, b"0123456789abcdef0123456789abcdef"]
    alone = [int(row_hash(np.array([n]))[0]) for n in names]
    together = row_hash(np.array(names, dtype="S64"))  # wider array, same rows
    assert together.tolist() == alone
    assert len(set(alone)) == len(alone)
    assert alone == [_scalar_hash(n) for n in names]
    # pinned: a row's partition must never change between releases
    pinned = row_hash(np.array([b"abc", b"00042/000000017"])).tolist()
    assert pinned == [13386033031426528139, 8171014474248577334]


def _scalar_hash(data: bytes) -> int:
    """The documented function, one row at a time in plain integers."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = 0x9E3779B97F4A7C15
    padded = data + b"\0" * (-len(data) % 8)
    for j in range(0, len(padded), 8):
        h = mix(h ^ int.from_bytes(padded[j : j + 8], "little"))
    return mix(h ^ len(data))


def test_tasks_are_uniform_and_stable() -> None:
    rng = np.random.default_rng(0)
    uids = np.array([rng.bytes(16).hex().encode() for _ in range(80_000)])
    tasks = task_of(uids, 8)
    counts = np.bincount(tasks, minlength=8)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000
    assert (task_of(uids[::-1], 8)[::-1] == tasks).all()  # order does not matter
    # sequential keys (one shard's rows) spread as evenly as random ones
    keys = np.array([f"00000/{i:09d}".encode() for i in range(40_000)])
    counts = np.bincount(task_of(keys, 4), minlength=4)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000


def test_interleave_spreads_every_task_over_the_run() -> None:
    order = interleave([3, 5, 0, 4])
    assert sorted(order) == sorted([(t, s) for t, n in enumerate([3, 5, 0, 4]) for s in range(n)])
    for task in (0, 1, 3):
        assert [s for t, s in order if t == task] == sorted(s for t, s in order if t == task)
    first_half = order[: len(order) // 2]
    assert {t for t, _ in first_half} == {0, 1, 3}


# --- select as array tasks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_score_set(root / "ref", shards=6, rows_per_shard=400, dim=16, seed=1)
    write_score_set(root / "lrn", shards=6, rows_per_shard=400, dim=16, seed=2, role="learner")
    return root


def _select(root: Path, out: Path, *extra: object) -> str:
    code, output = run_cli("select", root / "ref", "--learner", root / "lrn", *ARGS, "--out", out,
                           *extra)  # fmt: skip
    assert code == 0, output
    return output


def _rows(path: Path) -> list[tuple]:
    table = pq.read_table(path, columns=["step", "position", "shard", "key"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def _partition_only(source: Path, dest: Path, index: int, count: int) -> None:
    """A copy of a score set holding only one task's rows (same parts, same order)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.parquet"))
    for part in sorted((source / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        mine = task_of(identities(part.stem, table), count) == index
        rewrite_part(dest / "parts" / part.name, table.filter(mine))


def _all_tasks(root: Path, out: Path, count: int, *extra: object) -> None:
    """Every task, twice, as two array jobs would: round 1 scatters, round 2 selects."""
    for i in range(count):
        output = _select(root, out, "--task-index", i, "--num-tasks", count, *extra)
        assert ("second round" in output) == (i < count - 1), output
    for i in range(count - 1):
        output = _select(root, out, "--task-index", i, "--num-tasks", count, *extra)
        assert (f"{count}, merged" in output) == (i == count - 2), output


@pytest.fixture(scope="module")
def merged(sets: Path) -> Path:
    out = sets / "three"
    _all_tasks(sets, out, 3)
    assert not (out / "tasks" / "scatter").exists()  # the merge frees the buckets
    return out


def test_each_task_reads_only_its_share_of_the_parts(
    sets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jestcurate.io.store import ScoreSet

    read: list[tuple[str, str]] = []
    original = ScoreSet.read_part

    def spy(self: ScoreSet, name: str, columns: list[str]):
        read.append((self.meta["role"], name))
        return original(self, name, columns)

    monkeypatch.setattr(ScoreSet, "read_part", spy)
    names = sorted(p.stem for p in (sets / "ref" / "parts").glob("*.parquet"))
    out = tmp_path / "spied"
    for i in range(3):
        read.clear()
        _select(sets, out, "--task-index", i, "--num-tasks", 3)
        assert {name for _, name in read} == set(names[i::3]), i
    read.clear()
    _select(sets, out, "--task-index", 0, "--num-tasks", 3)
    assert read == []  # round 2 reads the buckets only


def test_tasks_merge_into_one_selection(sets: Path, merged: Path) -> None:
    summary = json.loads((merged / "summary.json").read_text())
    single = sets / "single"
    _select(sets, single)
    whole = json.loads((single / "summary.json").read_text())
    assert summary["partition"]["num_tasks"] == 3
    assert summary["counts"]["rows"] == whole["counts"]["rows"] == 2400
    assert summary["counts"]["eligible"] == whole["counts"]["eligible"]
    task_steps = [t["steps"] for t in summary["tasks"]]
    assert sum(task_steps) == summary["counts"]["steps"]
    assert all(600 < t["eligible"] < 1000 for t in summary["tasks"])  # each about a third

    rows = _rows(merged / "manifest.parquet")
    assert len(rows) == summary["counts"]["kept"] == 32 * summary["counts"]["steps"]
    assert len({(r[2], r[3]) for r in rows}) == len(rows)  # no duplicates in the union
    steps = [r[0] for r in rows]
    assert steps == sorted(steps) and set(steps) == set(range(summary["counts"]["steps"]))
    tasks = [_rows(p / "manifest.parquet") for p in sorted((merged / "tasks").iterdir())]
    assert sorted((r[2], r[3]) for t in tasks for r in t) == sorted((r[2], r[3]) for r in rows)
    uids = np.load(merged / "uids.npy")
    assert len(uids) == len(rows) and (np.sort(uids) == uids).all()
    code, output = run_cli("info", merged)
    assert code == 0 and "array tasks" in output and "3, merged" in output, output

    # kept-vs-dropped means are those of the single-machine run, within noise
    gap = whole["means"]["kept"]["learnability"] - whole["means"]["dropped"]["learnability"]
    for name in ("learnability", "clip_score"):
        for side in ("kept", "dropped"):
            assert summary["means"][side][name] == pytest.approx(
                whole["means"][side][name], abs=0.1 * abs(gap)
            )


def test_each_task_equals_a_single_run_on_its_partition(sets: Path, merged: Path) -> None:
    for i in range(3):
        _partition_only(sets / "ref", sets / f"ref-{i}", i, 3)
        _partition_only(sets / "lrn", sets / f"lrn-{i}", i, 3)
        alone = sets / f"alone-{i}"
        code, output = run_cli("select", sets / f"ref-{i}", "--learner", sets / f"lrn-{i}", *ARGS,
                               "--out", alone)  # fmt: skip
        assert code == 0, output
        task = merged / "tasks" / f"{i:05d}-of-00003" / "manifest.parquet"
        assert _rows(task) == _rows(alone / "manifest.parquet")


def test_same_inputs_give_the_same_bytes_and_a_killed_task_resumes(
    sets: Path, merged: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    for i in (1, 0):
        _select(sets, again, "--task-index", i, "--num-tasks", 3)
    # as if task 2 had been killed mid-scatter: a partial folder is left, never the real one
    scatter = again / "tasks" / "scatter"
    dead = 4_194_305  # above Linux's largest pid_max: no such process
    partial = scatter / f".00002-of-00003.{socket.gethostname()}.{dead}.partial"
    partial.mkdir()
    (partial / "to-00000.rec").write_bytes(b"\0" * 100)
    code, output = run_cli("select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out",
                           again, "--merge")  # fmt: skip
    assert code == 2 and "3 of 3 tasks have not finished (0, 1, 2)" in output, output
    _select(sets, again, "--task-index", 2, "--num-tasks", 3)  # scatters, then selects task 2
    task = again / "tasks" / "00002-of-00003"
    assert (task / "summary.json").is_file() and not partial.exists()
    assert not (scatter / "00000-of-00003" / "to-00002.rec").exists()  # its buckets are freed
    # killed in round 2: a half-built cache and a stray temporary file
    broken = again / "tasks" / "00000-of-00003"
    (broken / ".cache").mkdir(parents=True)
    (broken / ".cache" / "ref_img.npy").write_bytes(b"\0" * 100)
    (broken / "manifest.parquet.tmp").write_bytes(b"partial")
    _select(sets, again, "--task-index", 0, "--num-tasks", 3)
    mtime = (task / "manifest.parquet").stat().st_mtime_ns
    _select(sets, again, "--task-index", 1, "--num-tasks", 3)
    assert (task / "manifest.parquet").stat().st_mtime_ns == mtime  # finished task not redone
    assert not (broken / ".cache").exists()
    for name in ("manifest.parquet", "summary.json", "uids.npy"):
        assert (again / name).read_bytes() == (merged / name).read_bytes(), name
    # a rerun of any task, or of the merge, reuses the finished selection
    assert "already selected" in _select(sets, again, "--task-index", 0, "--num-tasks", 3)
    assert "already selected" in _select(sets, again, "--merge")
    # another number of tasks, or one run, is another selection
    code, output = run_cli("select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out",
                           again, "--task-index", 0, "--num-tasks", 2)  # fmt: skip
    assert code == 2 and "N = 3, not 2" in output, output
    code, output = run_cli("select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out",
                           again)  # fmt: skip
    assert code == 2 and "N = 3, not 1" in output, output
    shutil.rmtree(again / "tasks")
    code, output = run_cli("select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out",
                           again)  # fmt: skip
    assert code == 2 and "(partition: " in output, output


def test_another_task_count_is_refused_before_the_merge(sets: Path, tmp_path: Path) -> None:
    out = tmp_path / "half"
    _select(sets, out, "--task-index", 0, "--num-tasks", 3)  # scattered, not merged
    code, output = run_cli("select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out",
                           out, "--task-index", 0, "--num-tasks", 2)  # fmt: skip
    assert code == 2 and "N = 3, not 2" in output, output


def test_slurm_variables_choose_the_task(sets: Path, merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    base = ["select", sets / "ref", "--learner", sets / "lrn", *ARGS, "--out", out]
    for task in (10, 11, 12, 10, 11):  # an array 10-12 (index = id - min), run twice
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "10",
               "SLURM_ARRAY_TASK_COUNT": "3"}  # fmt: skip
        done = run_subprocess(*base, env=env)
        assert done.returncode == 0, done.stderr
    assert (out / "manifest.parquet").read_bytes() == (merged / "manifest.parquet").read_bytes()
    # --num-tasks 1 alone: one selection over every row, whatever Slurm says
    env = {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}
    base[-1] = tmp_path / "whole"
    done = run_subprocess(*base, "--num-tasks", 1, env=env)
    assert (
        done.returncode == 0
        and "partition" not in (tmp_path / "whole" / "summary.json").read_text()
    )


def test_a_partition_too_small_for_one_super_batch_says_so(sets: Path, tmp_path: Path) -> None:
    base = ["select", sets / "ref", "-b", 256, "--ratio", 0.5, "--out", tmp_path / "x"]
    codes = []
    for i in [*range(8), *range(7)]:  # every task is short of one super-batch
        code, output = run_cli(*base, "--task-index", i, "--num-tasks", 8)
        codes.append(code)
    assert codes == [0] * 14 + [2]  # each task finishes with no batch; the merge has none
    assert "no task's partition holds one super-batch" in output and "fewer tasks" in output


def test_tasks_honour_dedup_and_cluster_balance(sets: Path, tmp_path: Path) -> None:
    code, output = run_cli("dedup", sets / "ref", "--out", tmp_path / "dedup", "--eps", 0.3)
    assert code == 0, output
    extra = ("--dedup", tmp_path / "dedup", "--balance-clusters")
    _select(sets, tmp_path / "single", *extra)
    _all_tasks(sets, tmp_path / "two", 2, *extra)
    whole, parts = (json.loads((tmp_path / d / "summary.json").read_text())["counts"]
                    for d in ("single", "two"))  # fmt: skip
    assert whole["duplicates"] > 0 and parts["duplicates"] == whole["duplicates"]
    assert parts["eligible"] == whole["eligible"]


def test_scatter_counts_from_before_and_after_the_excluded_count_sum(tmp_path: Path) -> None:
    """An array select interrupted before the `excluded` count was added and resumed after it
    holds scatters of both widths; each is read as its own width."""
    import numpy as np

    from jestcurate.io.eligible import COUNTS
    from jestcurate.io.scatter import COUNTS_FILE, counts_for, scatter_directory

    width = len(COUNTS)
    old = np.arange(2 * (width - 1)).reshape(2, width - 1)  # no `excluded` column
    new = np.ones((2, width), dtype=np.int64)
    for s, rows in enumerate((old, new)):
        folder = scatter_directory(tmp_path, s, 2)
        folder.mkdir(parents=True)
        np.save(folder / COUNTS_FILE, rows)
    found = counts_for(tmp_path, 2, 1)
    expected = np.insert(old[1], COUNTS.index("excluded"), 0) + new[1]
    assert [getattr(found, name) for name in COUNTS] == expected.tolist()
