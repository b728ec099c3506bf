"""select --cluster-quotas density (math/density.py, pipelines/select/quotas.py): quotas on
hand-made clusters whose answer is known, then through the CLI on a synthetic pool whose
three blobs differ in spread, for jest and clip-score, and the refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli

from jestcurate.io.schema import embedding_column, score_column
from jestcurate.math.density import allocate, complexity, density_quotas, floors
from jestcurate.pipelines import dedup
from jestcurate.pipelines.dedup import load_clusters
from jestcurate.pipelines.select import SelectConfig
from jestcurate.pipelines.select import quotas as quotas_mod
from jestcurate.pipelines.synth import write_score_set

DIM, SHARDS, ROWS, B = 16, 4, 150, 10
SPREAD = (0.15, 0.35, 0.9)  # blob i of a part's row i mod 3: tight, middling, diffuse


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def blob(centre: int, spread: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return unit(np.eye(DIM)[centre] + spread * rng.standard_normal((n, DIM)))


def sums_of(*clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([c.sum(0) for c in clusters]), np.array([len(c) for c in clusters])


def test_diffuse_cluster_gets_more() -> None:
    rng = np.random.default_rng(0)
    tight, diffuse = blob(0, 0.05, 200, rng), blob(1, 0.8, 200, rng)
    sums, counts = sums_of(tight, diffuse)
    c = complexity(sums, counts)
    assert c[1] > c[0] > 0
    quota, _ = density_quotas(sums, counts, 100, temperature=0.05)
    assert quota.sum() == 100 and quota[1] > quota[0]
    # d_intra is the members' mean cosine distance to their normalised mean
    centroid = unit(tight.mean(0))
    d_intra = np.mean(1 - tight @ centroid)
    assert c[0] == pytest.approx(d_intra * (1 - centroid @ unit(diffuse.mean(0))), rel=1e-6)


def test_large_temperature_is_near_equal_and_caps_hold() -> None:
    rng = np.random.default_rng(1)
    clusters = [blob(i, s, n, rng) for i, (s, n) in enumerate([(0.05, 50), (0.3, 80),
                                                                (0.9, 30), (0.5, 40)])]  # fmt: skip
    sums, counts = sums_of(*clusters)
    equal, _ = density_quotas(sums, counts, 100, temperature=1e6)
    assert equal.tolist() == [25, 25, 25, 25]
    for t in (0.01, 0.1, 1.0):
        for total in (1, 37, 150, 200):
            quota, _ = density_quotas(sums, counts, total, temperature=t)
            assert quota.sum() == total and (quota <= counts).all() and (quota >= 0).all()


def test_allocate_redistributes_the_excess() -> None:
    # the authors' QP: the capped cluster's excess is spread as an equal shift
    assert allocate(np.array([0.9, 0.1, 0.0]), np.array([10, 100, 100]), 60).tolist() == [
        10, 28, 22,
    ]  # fmt: skip
    assert allocate(np.array([1.0, 1.0, 1.0]), np.array([1, 2, 3]), 6).tolist() == [1, 2, 3]
    assert allocate(np.zeros(2), np.array([5, 5]), 3).sum() == 3


def test_the_authors_floor() -> None:
    """prune.py's pruning_qp: lb_j = min(int(N / K * cls_bal_ratio), n_j - 1), 1 for ratio 0."""
    assert floors(np.array([10, 1, 100]), 60).tolist() == [9, 0, 10]
    assert floors(np.array([10, 1, 100]), 60, 0.0).tolist() == [1, 0, 1]
    assert floors(np.array([10, 5, 100]), 1, 0.0).tolist() == [0, 0, 0]  # 3 floors of 1 > N
    lower = np.array([9, 0, 10])
    quota = allocate(np.array([1.0, 0.0, 0.0]), np.array([10, 1, 100]), 60, lower)
    assert quota.tolist() == [10, 1, 49]  # the capped first's excess spread: one shift
    quota = allocate(np.array([0.0, 0.0, 1.0]), np.array([10, 1, 100]), 60, lower)
    assert quota.tolist() == [9, 0, 51]
    rng = np.random.default_rng(2)
    tight, diffuse = blob(0, 0.05, 200, rng), blob(1, 0.8, 200, rng)
    sums, counts = sums_of(tight, diffuse)
    quota, _ = density_quotas(sums, counts, 100, temperature=1e-4)
    assert quota.tolist() == [25, 75]  # without the floor: [0, 100]
    quota, _ = density_quotas(sums, counts, 100, temperature=1e-4, floor=0.0)
    assert quota.tolist() == [1, 99]
    for total in (1, 3, 99, 400):
        for f in (0.0, 0.5, 1.0):
            quota, _ = density_quotas(sums, counts, total, temperature=0.01, floor=f)
            assert quota.sum() == total and (quota <= counts).all() and (quota >= 0).all()


class Embeddings:
    """A row cache's image embeddings, all that the quotas read of it."""

    def __init__(self, emb: np.ndarray) -> None:
        self.emb, self.size = emb, len(emb)

    def read_range(self, column: str, start: int, stop: int) -> np.ndarray:
        return self.emb[start:stop]


def test_non_finite_embeddings_are_left_out(tmp_path: Path) -> None:
    """One NaN embedding would make its cluster's sum NaN and every quota garbage: the rows
    are left out of the centroids (counted in the summary), their cluster keeps its size."""
    rng = np.random.default_rng(3)
    emb = np.concatenate([blob(i, s, 100, rng) for i, s in enumerate((0.1, 0.4, 0.9))])
    cluster = np.repeat(np.arange(3), 100)
    cfg = SelectConfig(reference=tmp_path, out=tmp_path / "s", method="random",
                       cluster_quotas="density", quota_temperature=0.05)  # fmt: skip
    clean = quotas_mod.compute(cfg, Embeddings(emb), cluster, 120)
    bad = emb.copy()
    bad[[5, 150]] = np.nan
    bad[250, 3] = np.inf
    found = quotas_mod.compute(cfg, Embeddings(bad), cluster, 120)
    assert np.isfinite(found.complexity).all() and found.quota.sum() == 120
    assert (found.quota >= 0).all() and (found.quota <= found.sizes).all()
    assert found.sizes.tolist() == [100, 100, 100] and found.non_finite == 3
    assert np.allclose(found.complexity, clean.complexity, rtol=0.05)
    assert found.summary(cfg)["rows_without_finite_embedding"] == 3
    assert clean.summary(cfg)["rows_without_finite_embedding"] == 0
    everything = np.full_like(emb, np.nan)  # no centroid at all: still finite quotas
    found = quotas_mod.compute(cfg, Embeddings(everything), cluster, 120)
    assert found.quota.sum() == 120 and found.non_finite == 300


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """600 rows in three blobs of different spread, deduplicated into three clusters."""
    root = tmp_path_factory.mktemp("quotas")
    write_score_set(root / "ref", SHARDS, ROWS, dim=DIM, seed=1)
    rng = np.random.default_rng(5)
    for part in sorted((root / "ref" / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        ok = np.ones(table.num_rows, dtype=bool)
        img = np.stack([blob(i % 3, SPREAD[i % 3], 1, rng)[0] for i in range(table.num_rows)])
        txt = unit(img + 0.2 * rng.standard_normal(img.shape))
        for name, column in (("img_emb", embedding_column(img, ok, DIM)),
                             ("txt_emb", embedding_column(txt, ok, DIM)),
                             ("clip_score", score_column((img * txt).sum(1), ok))):  # fmt: skip
            table = table.set_column(table.schema.get_field_index(name), name, column)
        rewrite_part(part, table)
    dedup.run(dedup.DedupConfig(root / "ref", root / "dedup", clusters=3, eps=0.001,
                                device="cpu"))  # fmt: skip
    return {"ref": root / "ref", "dedup": root / "dedup"}


def select(pool: dict[str, Path], out: Path, *extra: str | Path) -> tuple[int, str]:
    return run_cli("select", pool["ref"], "--out", out, "--batch-size", B, "--ratio", 0.2,
                   "--chunks", 2, "--device", "cpu", "--dedup", pool["dedup"], *extra)  # fmt: skip


def kept_per_cluster(pool: dict[str, Path], out: Path) -> Counter[int]:
    clusters = load_clusters(pool["dedup"])
    manifest = pq.read_table(out / "manifest.parquet", columns=["shard", "index", "step"])
    return Counter(int(clusters[r["shard"]][r["index"]]) for r in manifest.to_pylist())


def blob_of_cluster(pool: dict[str, Path]) -> dict[int, int]:
    """Each dedup cluster's blob (the blob most of its rows came from)."""
    clusters = load_clusters(pool["dedup"])
    votes: dict[int, Counter[int]] = {}
    for ids in clusters.values():
        for i, c in enumerate(ids.tolist()):
            votes.setdefault(c, Counter())[i % 3] += 1
    return {c: v.most_common(1)[0][0] for c, v in votes.items() if c >= 0}


def test_clip_score_keeps_the_quotas(pool: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "clip"
    code, output = select(pool, out, "--method", "clip-score", "--cluster-quotas", "density",
                          "--quota-temperature", 0.05, "--ledger")  # fmt: skip
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    quotas = summary["cluster_quotas"]
    assert summary["parameters"]["cluster_quotas"] == {
        "method": "density", "temperature": 0.05, "neighbours": 20, "floor": 0.5,
    }  # fmt: skip
    assert quotas["applied_to"] == "kept set" and quotas["kept"] == summary["counts"]["kept"]
    kept = kept_per_cluster(pool, out)
    assert sum(kept.values()) == summary["counts"]["kept"]
    assert quotas["quota"]["min"] == min(kept.get(c, 0) for c in range(3))
    assert quotas["quota"]["max"] == max(kept.values())
    blobs = blob_of_cluster(pool)
    by_blob = {blobs[c]: n for c, n in kept.items()}
    assert by_blob.get(2, 0) > by_blob.get(0, 0)  # the diffuse blob keeps more than the tight
    ledger = pq.read_table(out / "ledger").to_pylist()
    lost = {r["reason"] for r in ledger if r["fate"] == "not_chosen"}
    assert "cluster_quota" in lost and lost <= {"cluster_quota", "below_cut"}
    code, why = run_cli("info", out, "--why", next(r["key"] for r in ledger
                                                   if r["reason"] == "cluster_quota"))  # fmt: skip
    assert code == 0 and "--cluster-quotas" in why
    # without the options the identity has no such key (old selections keep theirs)
    plain = tmp_path / "plain"
    assert select(pool, plain, "--method", "clip-score")[0] == 0
    summary = json.loads((plain / "summary.json").read_text())
    assert "cluster_quotas" not in summary["parameters"] and "cluster_quotas" not in summary


def test_jest_batches_follow_the_quotas(pool: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "jest"
    code, output = select(pool, out, "--cluster-quotas", "density", "--quota-temperature", 0.05)
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cluster_quotas"]["applied_to"] == "each batch"
    blobs = blob_of_cluster(pool)
    kept = {blobs[c]: n for c, n in kept_per_cluster(pool, out).items()}
    assert kept.get(2, 0) > kept.get(0, 0)
    equal = tmp_path / "equal"
    assert select(pool, equal, "--cluster-quotas", "density", "--quota-temperature", 1e6)[0] == 0
    spread = kept_per_cluster(pool, equal)
    assert max(spread.values()) - min(spread.values()) <= summary["counts"]["steps"]
    again = tmp_path / "again"
    assert select(pool, again, "--cluster-quotas", "density", "--quota-temperature", 0.05)[0] == 0
    assert (again / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--cluster-quotas", "density", "--quota-temperature", 0), "--quota-temperature must"),
        (("--cluster-quotas", "density", "--quota-temperature", -1), "--quota-temperature must"),
        (("--cluster-quotas", "density", "--quota-temperature", "nan"), "--quota-temperature"),
        (("--cluster-quotas", "sizes"), "unknown --cluster-quotas"),
        (("--cluster-quotas", "density", "--balance-clusters"), "pass one of them"),
        (("--quota-temperature", 0.5), "needs --cluster-quotas"),
        (("--quota-floor", 0.5), "--quota-floor needs --cluster-quotas"),
        (("--cluster-quotas", "density", "--quota-floor", 1.5), "--quota-floor must"),
        (("--cluster-quotas", "density", "--quota-floor", -0.1), "--quota-floor must"),
    ],
)
def test_refusals(pool: dict[str, Path], tmp_path: Path, extra: tuple, said: str) -> None:
    code, output = select(pool, tmp_path / "s", *extra)
    assert code == 2 and said in output and len(output.strip().splitlines()) == 1, output


def array(pool: dict[str, Path], out: Path, count: int, *extra: str | float) -> dict:
    """Run `count` array tasks twice (round 1, then round 2; the last merges)."""
    for i in [*range(count), *range(count)]:
        code, output = select(pool, out, "--task-index", i, "--num-tasks", count, *extra)
        assert code == 0, output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize(("method", "count"), [("clip-score", 2), ("random", 3)])
def test_array_tasks_keep_the_global_quotas(
    pool: dict[str, Path], tmp_path: Path, method: str, count: int
) -> None:
    """Merged kept rows per cluster == the quotas one run computes over the whole pool for
    the same number of kept rows; the summary carries the same global block."""
    opts = ("--method", method, "--cluster-quotas", "density", "--quota-temperature", 0.05)
    summary = array(pool, tmp_path / "a", count, *opts)
    block, kept = summary["cluster_quotas"], summary["counts"]["kept"]
    assert block["kept"] == kept and block["applied_to"] == "kept set"
    clusters = load_clusters(pool["dedup"])
    keys = sorted(clusters)
    cluster = np.concatenate([clusters[k] for k in keys])
    emb = np.concatenate(
        [
            np.stack(pq.read_table(p, columns=["img_emb"]).column(0).to_numpy(zero_copy_only=False))
            for p in sorted((pool["ref"] / "parts").glob("*.parquet"))
        ]
    )
    cfg = SelectConfig(reference=tmp_path, out=tmp_path / "s", method=method,
                       cluster_quotas="density", quota_temperature=0.05)  # fmt: skip
    single = quotas_mod.compute(cfg, Embeddings(emb), cluster, kept)
    assert dict(kept_per_cluster(pool, tmp_path / "a")) == {
        g: q for g, q in single.caps().items() if q
    }
    assert block["quota"] == single.summary(cfg)["quota"]


def test_jest_as_array_tasks(pool: dict[str, Path], tmp_path: Path) -> None:
    summary = array(pool, tmp_path / "j", 2, "--cluster-quotas", "density")
    assert summary["cluster_quotas"]["applied_to"] == "each batch"
    tasks = tmp_path / "j" / "tasks"
    found = [json.loads(p.read_text())["cluster_quotas"] for p in tasks.glob("*/summary.json")]
    assert found and all(f == summary["cluster_quotas"] for f in found)


def test_quotas_need_dedup(pool: dict[str, Path], tmp_path: Path) -> None:
    code, output = run_cli("select", pool["ref"], "--out", tmp_path / "s", "--batch-size", B,
                           "--cluster-quotas", "density")  # fmt: skip
    assert code == 2 and "--cluster-quotas needs --dedup" in output
    assert len(output.strip().splitlines()) == 1
