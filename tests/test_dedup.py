"""`jestcurate dedup` and `select --dedup/--balance-clusters` on score sets with planted
exact and near duplicates."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli

from jestcurate.io.store import embedding_column
from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import dedup
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines.synth import plant_duplicates, write_score_set

SHARDS, ROWS = 6, 200


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[set[tuple[str, str]]]]:
    """1,200 rows (5% errors); 5% of the ok rows exact copies and 5% near copies (cosine 0.98)
    of other rows, across shards."""
    root = tmp_path_factory.mktemp("planted")
    write_score_set(
        root / "ref", shards=SHARDS, rows_per_shard=ROWS, dim=32, seed=1, error_fraction=0.05
    )
    groups = plant_duplicates(root / "ref", exact=0.05, near=0.05, similarity=0.98, seed=3)
    return root / "ref", groups


def run(scores: Path, out: Path, **kw) -> dict:
    kw.setdefault("device", "cpu")
    return dedup.run(dedup.DedupConfig(scores, out, **kw))


def rows_of(scores: Path) -> dict[tuple[str, str], dict]:
    table = pq.read_table(
        scores / "parts", columns=["shard", "key", "index", "status", "clip_score", "sha256"]
    )
    return {(r["shard"], r["key"]): r for r in table.to_pylist()}


def result(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["shard"], r["key"]): r for r in pq.read_table(out / dedup.OUTPUT).to_pylist()}


def manifest_keys(out: Path) -> set[tuple[str, str]]:
    return {(r["shard"], r["key"]) for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def best(group: set[tuple[str, str]], rows: dict) -> tuple[str, str]:
    """The member dedup must keep: highest clip_score, then first in (shard, index) order."""
    return min(group, key=lambda m: (-rows[m]["clip_score"], m[0], rows[m]["index"]))


def test_planted_duplicates_are_found_and_the_best_of_each_group_kept(planted, tmp_path) -> None:
    scores, groups = planted
    summary = run(scores, tmp_path / "d")
    rows = rows_of(scores)
    found = result(tmp_path / "d")
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert set(found) == ok  # one row per ok row, no more
    want_dropped = {m for g in groups for m in g if m != best(g, rows)}
    dropped = {k for k, r in found.items() if not r["kept"]}
    true = len(dropped & want_dropped)
    precision, recall = true / len(dropped), true / len(want_dropped)
    assert precision >= 0.98 and recall >= 0.95, (precision, recall, len(want_dropped))
    assert summary["kept"] + summary["dropped_exact"] + summary["dropped_semantic"] == len(ok)
    assert summary["kept"] == sum(r["kept"] for r in found.values())
    for group in groups:
        keeper = best(group, rows)
        for member in group - {keeper}:
            r = found[member]
            if r["kept"]:
                continue  # a miss, counted by recall above
            # Every dropped row points at a kept row of its own group.
            assert (r["duplicate_of_shard"], r["duplicate_of"]) == keeper, (member, r)
            assert found[keeper]["kept"]
            if r["reason"] == "exact":
                assert r["similarity"] == 1.0
            else:
                assert r["reason"] == "semantic" and r["similarity"] > 0.95
    for r in found.values():
        assert (r["duplicate_of"] is None) == r["kept"] == (r["reason"] is None)
    # A healthy space: nothing to warn about, and the neighbours are far from 1 - eps.
    assert summary["warning"] is None and summary["suggested_eps"] is None, summary["warning"]
    assert summary["nn_cosine"]["sample"] == len(ok) and summary["nn_cosine"]["median"] < 0.9


def test_exact_duplicates_tie_to_the_first_in_shard_order(planted, tmp_path) -> None:
    scores, _ = planted
    run(scores, tmp_path / "d")
    rows = rows_of(scores)
    found = result(tmp_path / "d")
    exact = [k for k, r in found.items() if r["reason"] == "exact"]
    assert len(exact) > 20
    ties = 0
    for key in exact:
        target = (found[key]["duplicate_of_shard"], found[key]["duplicate_of"])
        if rows[target]["clip_score"] == rows[key]["clip_score"]:  # copies score alike
            ties += 1
            assert (target[0], rows[target]["index"]) < (key[0], rows[key]["index"]), key
    assert ties > 20


def test_eps_sweep_drops_nested_growing_sets(planted, tmp_path) -> None:
    scores, _ = planted
    previous: set = set()
    sizes = []
    for eps in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0):
        found = (
            result(tmp_path / f"eps{eps}") if run(scores, tmp_path / f"eps{eps}", eps=eps) else {}
        )
        dropped = {k for k, r in found.items() if not r["kept"]}
        assert previous <= dropped, eps
        previous = dropped
        sizes.append(len(dropped))
    assert sizes[0] > 0 and sizes[-1] > 5 * sizes[2], sizes  # eps 0 still drops exact copies


def test_deterministic_for_a_seed_and_rerun_reuses(planted, tmp_path) -> None:
    scores, _ = planted
    a = run(scores, tmp_path / "a", seed=5)
    b = run(scores, tmp_path / "b", seed=5)
    assert pq.read_table(tmp_path / "a" / dedup.OUTPUT).equals(
        pq.read_table(tmp_path / "b" / dedup.OUTPUT)
    )
    assert a["kept"] == b["kept"] and not a["reused"]
    before = (tmp_path / "a" / dedup.OUTPUT).stat().st_mtime_ns
    again = run(scores, tmp_path / "a", seed=5)
    assert again["reused"] and (tmp_path / "a" / dedup.OUTPUT).stat().st_mtime_ns == before
    assert not (tmp_path / "a" / ".cache").exists()
    code, output = run_cli("dedup", scores, "--out", tmp_path / "a", "--seed", "6")
    assert code == 2 and "holds a different dedup (params.seed: 5 there, 6 now)" in output, output


@pytest.mark.parametrize("by", ["text", "both"])
def test_by_text_and_both(planted, tmp_path, by: str) -> None:
    """Near copies share only the image, so --by text finds the exact copies (hash) and no
    near ones; --by both sees the near copies at a mean cosine below 0.95 and keeps them."""
    scores, _ = planted
    summary = run(scores, tmp_path / by, by=by)
    hashes = Counter(r["sha256"] for r in rows_of(scores).values() if r["status"] == "ok")
    assert summary["dropped_exact"] == sum(c - 1 for c in hashes.values()) > 20
    assert summary["dropped_semantic"] <= 2, summary


def test_cli_dedup_and_bad_inputs(planted, tmp_path) -> None:
    scores, _ = planted
    code, output = run_cli("dedup", scores, "--out", tmp_path / "c", "--clusters", "8")
    assert code == 0, output
    assert "clusters: kept" in output and "exact" in output
    summary = json.loads((tmp_path / "c" / dedup.SUMMARY).read_text())
    assert summary["clusters_used"] == 8 and summary["params"]["clusters"] == 8
    code, output = run_cli("info", tmp_path / "c")
    assert code == 0 and "(dedup)" in output, output
    assert f"{summary['dropped_exact']:,} exact" in output and "clusters" in output
    cases = [
        (["--eps", "-0.1"], "--eps must be in [0, 2)"),
        (["--by", "caption"], "--by must be one of image, text, both"),
        (["--clusters", "0"], "--clusters must be at least 1"),
        (["--device", "cuda"], "faiss sees no CUDA device"),
        (["--device", "tpu"], "unknown device"),
    ]
    for args, message in cases:
        code, output = run_cli("dedup", scores, "--out", tmp_path / "bad", *args)
        assert code == 2 and message in output and output.count("\n") == 1, (args, output)
    code, output = run_cli("dedup", tmp_path / "none", "--out", tmp_path / "bad")
    assert code == 2 and "is not a score set" in output, output


def test_select_dedup_excludes_dropped_rows(planted, tmp_path) -> None:
    scores, _ = planted
    run(scores, tmp_path / "d")
    found = result(tmp_path / "d")
    dropped = {k for k, r in found.items() if not r["kept"]}
    cfg = select_mod.SelectConfig(
        reference=scores,
        out=tmp_path / "s",
        method="clip-score",
        sampling=SamplerOptions(10, 0.9),
        dedup=tmp_path / "d",
    )
    report = select_mod.run(cfg)
    counts = report.summary["counts"]
    kept = {
        (r["shard"], r["key"])
        for r in pq.read_table(tmp_path / "s" / "manifest.parquet").to_pylist()
    }
    assert not kept & dropped
    assert counts["duplicates"] == len(dropped)
    assert counts["eligible"] == len(found) - len(dropped)
    # Without --dedup some duplicates do get selected: the filter is doing the work.
    plain = select_mod.SelectConfig(
        reference=scores, out=tmp_path / "p", method="clip-score", sampling=SamplerOptions(10, 0.9)
    )
    select_mod.run(plain)
    everything = {
        (r["shard"], r["key"])
        for r in pq.read_table(tmp_path / "p" / "manifest.parquet").to_pylist()
    }
    assert everything & dropped


def test_select_dedup_refuses_another_score_set(planted, tmp_path) -> None:
    scores, _ = planted
    run(scores, tmp_path / "d")
    other = tmp_path / "other"
    write_score_set(other, shards=SHARDS, rows_per_shard=ROWS - 1, dim=32)
    code, output = run_cli(
        "select", other, "--out", tmp_path / "s", "-b", "10", "--dedup", tmp_path / "d"
    )
    assert code == 2 and "was made from another score set" in output, output
    code, output = run_cli("select", scores, "--out", tmp_path / "s", "--balance-clusters")
    assert code == 2 and "--balance-clusters needs --dedup" in output, output
    code, output = run_cli("select", scores, "--out", tmp_path / "s", "--dedup", tmp_path)
    assert code == 2 and "not a finished dedup output" in output, output


def skew_clusters(dedup_dir: Path, scores: Path) -> dict[tuple[str, str], int]:
    """Rewrite a dedup output's clusters: the 60% of rows with the best clip_score form cluster
    0, the rest spread over 1..7. Every method then leans on cluster 0 unless capped."""
    rows = rows_of(scores)
    table = pq.read_table(dedup_dir / dedup.OUTPUT)
    shards, names = table.column("shard").to_pylist(), table.column("key").to_pylist()
    keys = list(zip(shards, names, strict=True))
    clip = np.array([rows[k]["clip_score"] for k in keys])
    rank = np.argsort(np.argsort(-clip))
    cluster = np.where(rank < 0.6 * len(keys), 0, 1 + np.arange(len(keys)) % 7).astype(np.int32)
    table = table.set_column(
        table.schema.get_field_index("cluster"), "cluster", pa.array(cluster, pa.int32())
    )
    pq.write_table(table, dedup_dir / dedup.OUTPUT)
    return dict(zip(keys, cluster.tolist(), strict=True))


@pytest.mark.parametrize("method", ["random", "clip-score", "jest"])
def test_balance_clusters_caps_each_clusters_share(planted, tmp_path, method: str) -> None:
    """With 8 clusters no cluster may take more than a quarter (twice its even share) of the
    kept set (random, clip-score) or of any batch (jest), and batches stay full; without the
    cap, the dominant cluster takes more."""
    scores, _ = planted
    run(scores, tmp_path / "d", clusters=8)
    cluster = skew_clusters(tmp_path / "d", scores)
    largest = {}
    for balance in (False, True):
        out = tmp_path / f"{method}-{balance}"
        cfg = select_mod.SelectConfig(
            reference=scores,
            out=out,
            method=method,
            sampling=SamplerOptions(40, 0.25),
            dedup=tmp_path / "d",
            balance_clusters=balance,
        )
        counts = select_mod.run(cfg).summary["counts"]
        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        assert len(rows) == counts["steps"] * 40 > 0
        groups: dict[int, Counter] = {}
        for r in rows:
            step = r["step"] if method == "jest" else 0
            groups.setdefault(step, Counter())[cluster[(r["shard"], r["key"])]] += 1
        largest[balance] = max(max(c.values()) / sum(c.values()) for c in groups.values())
    assert largest[True] <= 0.25 < largest[False], largest


def test_neighbors_find_pairs_that_kmeans_split(tmp_path) -> None:
    """In 256 dimensions with ~10 rows per cluster some planted pairs straddle a k-means
    boundary and the single-cluster pass misses them; comparing each row with its two nearest
    clusters finds them, and nothing it adds is a false duplicate."""
    write_score_set(tmp_path / "ref", shards=4, rows_per_shard=250, dim=256, seed=1)
    groups = plant_duplicates(tmp_path / "ref", exact=0.0, near=0.1, similarity=0.97, seed=3)
    rows = rows_of(tmp_path / "ref")
    want = {m for g in groups for m in g if m != best(g, rows)}
    found = {}
    for neighbors in (1, 2):
        out = tmp_path / f"n{neighbors}"
        run(tmp_path / "ref", out, clusters=100, neighbors=neighbors)
        found[neighbors] = {k for k, r in result(out).items() if not r["kept"]}
    assert found[1] <= found[2] and found[2] <= want
    assert len(found[1]) < len(found[2]), (len(found[1]), len(found[2]), len(want))
    code, output = run_cli("dedup", tmp_path / "ref", "--out", tmp_path / "x", "--neighbors", "9")
    assert code == 2 and "--neighbors must be between 1 and 8" in output


def collapse(scores: Path, spread: float, seed: int = 0) -> None:
    """Rewrite a score set's image embeddings as one direction plus a little noise: the
    collapsed space of an untrained or tiny model, where every row is a near duplicate."""
    rng = np.random.default_rng(seed)
    for part in sorted((scores / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
        dim = table.column("img_emb").type.list_size
        emb = np.eye(dim, dtype=np.float32)[0] + spread * rng.standard_normal((int(ok.sum()), dim))
        index = table.schema.get_field_index("img_emb")
        rewrite_part(part, table.set_column(index, "img_emb", embedding_column(emb, ok, dim)))


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 rows (5 % errors), their image embeddings within about 0.01 of one direction."""
    root = tmp_path_factory.mktemp("collapsed")
    write_score_set(root / "ref", shards=4, rows_per_shard=250, dim=32, seed=2, error_fraction=0.05)
    collapse(root / "ref", spread=0.01)
    return root / "ref"


def test_a_collapsed_space_is_named_and_an_eps_suggested(collapsed, tmp_path) -> None:
    """The default eps drops nearly everything; dedup says the space looks collapsed, with the
    median neighbour cosine, and suggests an eps that, rerun, drops the ~5 % it promised."""
    code, output = run_cli("dedup", collapsed, "--out", tmp_path / "d", "--device", "cpu")
    assert code == 0, output
    summary = json.loads((tmp_path / "d" / dedup.SUMMARY).read_text())
    ok = summary["ok_rows"]
    assert summary["dropped_semantic"] > 0.9 * ok  # the failure the warning is for
    nn, suggested = summary["nn_cosine"], summary["suggested_eps"]
    assert nn["sample"] == ok and 1 - 0.05 < nn["p1"] <= nn["median"] <= nn["p90"] <= 1.0001
    assert 0 < suggested["eps"] < 0.05 and suggested["of"] == ok
    assert 0.03 * ok <= suggested["drops"] <= 0.05 * ok, suggested
    warning = summary["warning"]
    assert warning and "\n" not in warning
    for part in (
        f"dropped {summary['dropped_semantic']:,} of {ok:,} ok rows",
        "the embedding space looks collapsed",
        f"median nearest-neighbour cosine {nn['median']:.6g}, above 1 - eps",
        "an untrained or tiny model's embeddings do this",
        f"Try --eps {suggested['eps']:g}, which drops {suggested['drops']:,}",
    ):
        assert part in warning, (part, warning)
    assert f"WARNING {warning}" in output  # printed (logged to stderr), not only stored
    code, output = run_cli("dedup", collapsed, "--out", tmp_path / "d", "--device", "cpu")
    assert code == 0 and "already done, reused" in output and warning in output, output
    # The suggestion's count is exact for the same clusters, and the rerun does not warn.
    code, output = run_cli(
        "dedup", collapsed, "--out", tmp_path / "s", "--device", "cpu", "--eps", suggested["eps"]
    )
    assert code == 0 and "WARNING" not in output, output
    again = json.loads((tmp_path / "s" / dedup.SUMMARY).read_text())
    assert again["dropped_semantic"] == suggested["drops"] and again["warning"] is None
    assert again["nn_cosine"] == nn  # the neighbours do not depend on eps


def test_collapse_warning_conditions() -> None:
    """Most rows dropped, or the median neighbour above 1 - eps, each warn; neither, nothing."""
    near, far = {"median": 0.97}, {"median": 0.8}
    assert dedup.collapse_warning(0.05, 1000, 100, far, None) is None
    assert dedup.collapse_warning(0.05, 1000, 500, far, None) is None  # half is not most
    most = dedup.collapse_warning(0.05, 1000, 501, far, None)
    assert most and "median nearest-neighbour cosine 0.8)" in most
    close = dedup.collapse_warning(0.05, 1000, 100, near, {"eps": 0.01, "drops": 48, "of": 1000})
    assert (
        close
        and "0.97, above 1 - eps" in close
        and "Try --eps 0.01, which drops 48 (4.8%)" in close
    )
    # A suggestion no smaller than the eps used is no suggestion.
    same = dedup.collapse_warning(0.05, 1000, 600, far, {"eps": 0.05, "drops": 50, "of": 1000})
    assert same and "--eps" in same and "Try" not in same and "score with a trained model" in same
    from jestcurate.pipelines.dedup.collapse import _round_down

    assert _round_down(0.0001599) == 0.00015 and _round_down(0.0999) == 0.099


def test_select_says_when_the_dedup_took_the_rows(collapsed, tmp_path) -> None:
    """Too few rows for one super-batch: the error counts what each filter removed and, when
    the dedup took most, points at dedup --eps rather than only at --batch-size."""
    dedup.run(dedup.DedupConfig(collapsed, tmp_path / "d", device="cpu"))
    summary = json.loads((tmp_path / "d" / dedup.SUMMARY).read_text())
    dropped = summary["dropped_exact"] + summary["dropped_semantic"]
    rows, ok = summary["rows"], summary["ok_rows"]
    base = ["select", collapsed, "--out", tmp_path / "s", "--method", "clip-score"]
    code, output = run_cli(*base, "-b", 64, "--dedup", tmp_path / "d")
    assert code == 2 and output.count("\n") == 1, output
    assert f"{summary['kept']:,} eligible rows (of {rows:,}: {rows - ok:,} are errors, " in output
    assert f"{dropped:,} were dropped by --dedup {tmp_path / 'd'})" in output, output
    assert f"the dedup dropped most rows ({dropped:,} of {ok:,})" in output, output
    assert "`jestcurate dedup` with a smaller --eps" in output and "--batch-size" in output
    # Another filter that took most rows is named as the one to change.
    code, output = run_cli(*base, "-b", 600, "--min-clip-score", 0.5)
    assert code == 2 and "are below --min-clip-score)" in output, output
    assert "lower --min-clip-score, or pass --batch-size 92 or less" in output
    assert "dedup" not in output
