"""The quality benchmarks' code paths at a tiny size (the real runs are in docs/benchmarks.md):
quality.py (selections chained per method, trained through `jestcurate eval`) and
quality_inmemory.py (the arms eval cannot express, and the samplers' diagnostic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, tmp_path: Path, *more: str) -> Path:
    out = tmp_path / "out"
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out),
               "--workdir", str(tmp_path / "w"), *more]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


@pytest.mark.slow
def test_quality_benchmark_trains_every_arm_through_eval(tmp_path: Path) -> None:
    out = run_benchmark("quality.py", tmp_path, "--tasks", "2")
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {
        "random", "clip-score", "easy-ref", "learnability", "jest (easy-ref)",
        "jest (learnability)", "jest (learnability, 2 sweeps)",
        "jest (learnability, Algorithm 1)", "learnability, ratio 0.5",
        "jest (learnability), ratio 0.5", "jest (learnability, Algorithm 1), ratio 0.5",
    }  # fmt: skip
    summary = results["eval"]["summary"]
    trained = [row["arm"] for row in summary["arms"]]
    assert trained == ["uniform", *results["arms"].values()]
    steps = results["setup"]["steps"]
    for name, paths in results["selections"].items():
        # a chain of successive selections holding at least the recipe's steps, each its own
        held = [json.loads((Path(p) / "summary.json").read_text())["counts"]["steps"]
                for p in paths]  # fmt: skip
        assert sum(held) >= steps and sum(held[:-1]) < steps, (name, held)
        seeds = [json.loads((Path(p) / "summary.json").read_text())["parameters"]["seed"]
                 for p in paths]  # fmt: skip
        assert seeds == list(range(len(paths)))
    first = results["selections"]["jest-learnability"]
    assert len(first) > 1  # 512 rows, B 80: 6 batches a selection for 20 steps
    keys = [pq.read_table(Path(p) / "manifest.parquet").column("key").to_pylist()
            for p in first[:2]]  # fmt: skip
    assert keys[0] != keys[1]
    for curves in results["eval"]["units"].values():
        assert all([p["step"] for p in c] == [0, 10, 20] for c in curves)
    text = (out / "results.md").read_text()
    row = next(r for r in summary["arms"] if r["arm"] == "jest-learnability")
    mean = row["final"]["zeroshot"]["acc1"]["mean"]
    assert f"| jest (learnability) | {mean:.3f} ±" in text, text


@pytest.mark.slow
def test_quality_inmemory_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = run_benchmark("quality_inmemory.py", tmp_path)
    results = json.loads((out / "results.json").read_text())
    methods = results["summary"]["methods"]
    assert set(methods) == {
        "uniform", "jest (learnability)", "jest (learnability), open_clip_train",
        "jest (learnability), shuffled", "jest (online)", "jest (online, 32 px scoring)",
    }  # fmt: skip
    for curves in results["curves"].values():
        assert all(len(c) == 3 and all(0 <= a <= 1 for a in c) for c in curves)
    assert set(results["diagnostic"]) == {"main", "ratio 0.1", "larger batch"}
    for diag in results["diagnostic"].values():
        assert {"random", "independent top-k", "jest: refine, top-k, 1 sweep"} <= set(diag)
        # the refine sampler's batches are never below independent top-k's on this objective
        top = diag["independent top-k"]["mean"]
        assert all(d["mean"] >= top - 1e-6 for k, d in diag.items() if "refine" in k), diag
    assert results["compute"]["forward_flops_per_sample"] > 1e6
    assert "| jest (learnability) |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_quality_benchmark_probes_train_their_own_learners(tmp_path: Path) -> None:
    """Issue 31's probes: the long learner scores the pool for its chain, and the refreshed
    learner is trained from the 60-step one on the first selection's exported samples, then
    scores every later selection of its chain; the oracle arm trains jest's rows in other
    batches; b and the grid follow --batch/--eval-every."""
    out = run_benchmark(
        "quality.py", tmp_path, "--model", "jc-tiny-sigmoid", "--ablation-ratios",
        "--batch", "8", "--eval-every", "5", "--methods", "jest (learnability, long learner)",
        "jest (learnability, refreshed learner)", "jest (learnability, top-k)",
        "jest (hard-learner)", "jest (learnability), batches spread by class (oracle)",
        "jest (learnability), batches shuffled",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    work = tmp_path / "w"

    def learner_of(path: str) -> str:
        summary = json.loads((Path(path) / "summary.json").read_text())
        assert summary["parameters"]["batch_size"] == 8
        return Path(summary["inputs"]["learner"]["path"]).name

    chains = results["selections"]
    assert {learner_of(p) for p in chains["jest-learnability-long-learner"]} == {"learner-long"}
    refreshed = [learner_of(p) for p in chains["jest-learnability-refreshed"]]
    assert refreshed[0] == "learner" and set(refreshed[1:]) == {"learner-refreshed-b8"}
    # trained from the 60-step learner on selection 0's exported samples, as many steps of b
    # as it holds; the long learner on every pool shard
    first = Path(chains["jest-learnability-refreshed"][0])
    trained = json.loads((work / "learner-refreshed-b8.pt.json").read_text())["config"]
    assert trained["pretrained"] == str(work / "learner.pt") and trained["batch_size"] == 8
    assert trained["inputs"] == sorted(str(p) for p in (first / "shards").glob("*.tar"))
    assert trained["steps"] == json.loads((first / "summary.json").read_text())["counts"]["steps"]
    long = json.loads((work / "learner-long.pt.json").read_text())["config"]
    assert long["inputs"] == sorted(str(p) for p in (work / "pool").glob("*.tar"))
    assert {learner_of(p) for p in chains["jest-hard-learner"]} == {"learner"}
    # the recomposed arms: jest's selections (made beside them), the same rows in other
    # batches of b, each a selection `jestcurate verify` finds intact
    for path in chains["jest-learnability-spread"] + chains["jest-learnability-shuffled"]:
        new = pq.read_table(Path(path) / "manifest.parquet").to_pydict()
        own = pq.read_table(work / "selections-b8" / "jest-learnability" / Path(path).name
                            / "manifest.parquet").to_pydict()  # fmt: skip
        rows = list(zip(new["shard"], new["key"], strict=True))
        assert sorted(rows) == sorted(zip(own["shard"], own["key"], strict=True))
        assert rows != list(zip(own["shard"], own["key"], strict=True))
        steps = json.loads((Path(path) / "summary.json").read_text())["counts"]["steps"]
        assert new["step"] == [s for s in range(steps) for _ in range(8)]
        assert new["position"] == list(range(8)) * steps
        check = subprocess.run([sys.executable, "-m", "jestcurate", "verify", path],
                               capture_output=True, text=True)  # fmt: skip
        said = check.stdout + check.stderr
        assert check.returncode == 0 and "intact" in said, said
    assert all("selections-b8" in p for paths in chains.values() for p in paths)
    topk = json.loads((Path(chains["jest-learnability-topk"][0]) / "summary.json").read_text())
    assert topk["parameters"]["topk"] is True
    for curves in results["eval"]["units"].values():
        assert all([p["step"] for p in c] == [0, 5, 10, 15, 20] for c in curves)
