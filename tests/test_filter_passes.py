"""How select's filters run over the score set: once per row (the scan keeps each part's
eligible rows for the copy), the target's own reader and first pass, the k-means device, the
one-line refusals; and through the CLI as array tasks, which agree with single runs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli
from test_filters import plant, target_set

from jestcurate.errors import JCError
from jestcurate.io.eligible import Filters, Verdict, fill_cache, identities, scan
from jestcurate.io.store import open_score_set
from jestcurate.math.partition import task_of
from jestcurate.pipelines.select import filters as filters_mod
from jestcurate.pipelines.select.filters import target as target_mod

TARGET = ("--target-filter", "normsim2", "--target-threshold", "3.0")  # keeps blob 0


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("passes")
    return {"pool": plant(root / "pool"), "target": target_set(root / "target")}


class Counting:
    """A RowFilter that removes odd rows and counts the rows it was asked about."""

    name, fate, columns = "odd", "filtered", ("caption",)

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        self.seen += int(candidate.sum())
        return Verdict(np.arange(len(candidate)) % 2 == 1)


def test_filters_run_once_per_row_and_the_copy_reuses_the_scan(sets, tmp_path):
    pool = open_score_set(sets["pool"])
    odd = Counting()
    filters = Filters(rows=(odd,))
    found = scan(pool, None, filters)
    ok = found.counts.rows - found.counts.errors
    assert odd.seen == ok and found.counts.filtered["odd"] > 0
    cache = fill_cache(pool, None, found, tmp_path / "cache", filters, embeddings=False)
    assert odd.seen == ok  # not run again
    assert cache.size == found.counts.eligible
    assert (cache.read_range("index", 0, cache.size) % 2 == 0).all()
    # a cache that would not hold what the scan counted is refused, never written wrong
    found.counts.eligible += 1
    with pytest.raises(JCError, match="were counted eligible") as caught:
        fill_cache(pool, None, found, tmp_path / "bad", filters, embeddings=False)
    assert "\n" not in str(caught.value)


def test_bottom_k_keeps_the_smallest_keys_and_scores_few_rows():
    rng = np.random.default_rng(0)
    sample, scored, every = target_mod.BottomK(50), 0, []
    for _ in range(200):
        keys = rng.random(100)
        every.append(keys)
        entering = keys < sample.bound
        scored += int(entering.sum())
        sample.add(keys[entering], keys[entering] * 10)
    smallest = np.sort(np.concatenate(every))[:50]
    assert np.array_equal(np.sort(sample.values), smallest * 10)
    assert scored < 2_000  # of 20,000 rows: once full, only keys that can enter are scored


def test_the_target_is_read_on_its_own(sets, tmp_path):
    pool = open_score_set(sets["pool"])
    images = target_mod.read_target(sets["target"], pool)
    assert images.dtype == np.float32 and images.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-5)
    empty = tmp_path / "empty"
    shutil.copytree(sets["target"], empty)
    part = next((empty / "parts").glob("*.parquet"))
    table = pq.read_table(part)
    status = pa.array(["error"] * table.num_rows)
    rewrite_part(part, table.set_column(table.schema.get_field_index("status"), "status", status))
    with pytest.raises(JCError, match=r"^--target .* has no ok rows"):
        target_mod.read_target(empty, pool)


def test_too_many_target_clusters_are_refused_before_the_pass(sets, monkeypatch):
    pool = open_score_set(sets["pool"])

    def no_pass(*args, **kwargs):
        raise AssertionError("the sampling pass ran")

    monkeypatch.setattr(target_mod, "sample_pool", no_pass)
    images = target_mod.read_target(sets["target"], pool)
    with pytest.raises(JCError, match="--target-clusters 401 is more than the pool's 400 rows"):
        target_mod.build_clusters(pool, images, 401, seed=0, gpu=False)


@pytest.mark.parametrize(
    "device, gpus, wanted",
    [("cpu", 1, False), ("mps", 1, False), ("auto", 0, False), ("auto", 1, True),
     ("cuda", 1, True), ("cuda:0", 1, True), ("cuda:1", 0, False), ("cuda", 0, False)],
)  # fmt: skip
def test_kmeans_device_follows_select_device(monkeypatch, device, gpus, wanted):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus, raising=False)
    assert filters_mod.kmeans_on_gpu(device) is wanted


def test_threshold_must_be_finite():
    for value in (float("nan"), float("inf")):
        opts = filters_mod.FilterOptions(target=Path("t"), target_filter="normsim2",
                                         target_threshold=value)  # fmt: skip
        with pytest.raises(JCError, match="--target-threshold must be a finite number"):
            filters_mod.check(opts)


def test_filters_apply_cheap_first(sets):
    pytest.importorskip("lingua")
    pool = open_score_set(sets["pool"])
    opts = filters_mod.FilterOptions(min_caption_words=2, language=("en",), target=sets["target"],
                                     target_filter="normsim2", target_threshold=3.0)  # fmt: skip
    made = filters_mod.build(opts, pool, seed=0, device="cpu")
    assert [f.name for f in made] == ["caption_length", "target", "language"]


# --- through the CLI ---------------------------------------------------------------------------


def select_cli(sets, out: Path, *args: object) -> tuple[int, str]:
    return run_cli("select", sets["pool"], "--out", out, "--batch-size", "4", "--ratio", "0.5",
                   "--device", "cpu", "--method", "random", *args)  # fmt: skip


def test_language_without_lingua_is_one_line(sets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lingua", None)  # as if not installed
    code, output = select_cli(sets, tmp_path / "out", "--language", "en")
    assert code == 2 and "needs the lingua-language-detector package" in output, output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_threshold_nan_is_one_line(sets, tmp_path):
    args = ("--target", sets["target"], "--target-filter", "normsim2", "--target-threshold")
    code, output = select_cli(sets, tmp_path / "out", *args, "nan")
    assert code == 2 and "finite" in output and len(output.strip().splitlines()) == 1, output


def _tasks(sets, out: Path, count: int, *args: object) -> list[tuple[int, str]]:
    """Every task, twice, as two array jobs would: round 1 scatters, round 2 selects."""
    runs = []
    for i in [*range(count), *range(count - 1)]:
        runs.append(select_cli(sets, out, "--task-index", i, "--num-tasks", count, *args))
    return runs


def _partition_only(source: Path, dest: Path, index: int, count: int) -> None:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.parquet"))
    for part in sorted((source / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        mine = task_of(identities(part.stem, table), count) == index
        rewrite_part(dest / "parts" / part.name, table.filter(mine))


@pytest.mark.slow
def test_array_tasks_with_filters_agree_with_single_runs(sets, tmp_path):
    args = ("--min-caption-words", "6", "--target", sets["target"], *TARGET)
    for out in ("a", "b"):
        assert all(code == 0 for code, _ in _tasks(sets, tmp_path / out, 2, *args))
    for name in ("manifest.parquet", "uids.npy"):  # a rerun: the same bytes
        if (tmp_path / "a" / name).exists():
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    code, output = select_cli(sets, tmp_path / "single", *args)
    assert code == 0, output
    merged, single = (json.loads((tmp_path / d / "summary.json").read_text())["counts"]
                      for d in ("a", "single"))  # fmt: skip
    for name in ("rows", "errors", "caption_length", "target", "eligible"):
        assert merged[name] == single[name], name
    for i in range(2):  # each task: a single run over its partition alone
        _partition_only(sets["pool"], tmp_path / f"pool-{i}", i, 2)
        alone = tmp_path / f"alone-{i}"
        code, output = select_cli({"pool": tmp_path / f"pool-{i}"}, alone, *args)
        assert code == 0, output
        task = tmp_path / "a" / "tasks" / f"{i:05d}-of-00002" / "manifest.parquet"
        assert pq.read_table(task).equals(pq.read_table(alone / "manifest.parquet"))


@pytest.mark.slow
def test_filters_removing_every_row_in_array_tasks_is_one_line(sets, tmp_path):
    out = tmp_path / "out"
    runs = _tasks(sets, out, 2, "--min-caption-chars", "500")
    assert runs[0][0] == 0  # task 0 scattered and waits for task 1
    for code, output in runs[1:]:
        assert code == 2 and "no row passes the filters" in output, output
        (error,) = [line for line in output.splitlines() if "error" in line]  # one line
        assert "removed by the caption_length filter" in error, output
    assert not list((out / "tasks").glob("0000?-of-00002"))  # no task wrote a selection


@pytest.mark.slow
def test_a_target_filter_reruns_to_the_same_bytes(sets, tmp_path):
    args = ("--target", sets["target"], "--target-filter", "normsiminf", "--target-keep", "0.3")
    for out in ("one", "two"):
        code, output = select_cli(sets, tmp_path / out, *args)
        assert code == 0, output
    for name in ("manifest.parquet", "uids.npy"):
        if (tmp_path / "one" / name).exists():
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.slow
def test_the_merge_names_the_filters_when_no_row_passes(sets, tmp_path, monkeypatch):
    """Tasks from before the tasks' own check (or any that got past it) finish with no row;
    the merge then says what the filters took, not "use fewer tasks"."""
    from jestcurate.pipelines.select import runner

    monkeypatch.setattr(runner, "refuse_when_nothing_passes", lambda *args: None)
    runs = _tasks(sets, tmp_path / "out", 2, "--min-caption-chars", "500")
    code, output = runs[2]  # task 0's round 2: the last to finish, it merges
    assert code == 2 and "no row passes the filters" in output, output
    assert "removed by the caption_length filter" in output and "fewer tasks" not in output
