"""The quality benchmark's code path at a tiny size (the real run is in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    methods = results["summary"]["methods"]
    assert set(methods) == {
        "uniform", "random", "clip-score", "easy-ref", "learnability",
        "jest (easy-ref)", "jest (learnability)", "jest (learnability), open_clip_train",
        "jest (learnability), shuffled", "jest (learnability, 2 sweeps)",
        "jest (learnability, Algorithm 1)",
        "jest (online)", "jest (online, 32 px scoring)",
    }  # fmt: skip
    for curves in results["curves"].values():
        assert all(len(c) == 3 and all(0 <= a <= 1 for a in c) for c in curves)
    assert set(results["diagnostic"]) == {"main", "ratio 0.1", "larger batch"}
    for diag in results["diagnostic"].values():
        assert {"random", "independent top-k", "jest: refine, top-k, 1 sweep"} <= set(diag)
        # the refine sampler's batches are never below independent top-k's on this objective
        top = diag["independent top-k"]["mean"]
        assert all(d["mean"] >= top - 1e-6 for k, d in diag.items() if "refine" in k), diag
    assert "ratio 0.5" in " ".join(results["ablation"])
    assert results["compute"]["forward_flops_per_sample"] > 1e6
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| jest (learnability) |" in (out / "results.md").read_text()
