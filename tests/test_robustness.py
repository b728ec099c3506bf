"""Real processes: concurrent array tasks on one output, and kill -9 followed by a rerun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_subprocess

from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus

pytestmark = pytest.mark.slow


def parts_and_statuses(out: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    parts = {p.name: p.read_bytes() for p in sorted((out / "parts").glob("*.parquet"))}
    statuses = {
        p.stem: json.loads(p.read_text())["status"] for p in sorted((out / "done").glob("*.json"))
    }
    return parts, statuses


def test_concurrent_array_tasks_share_one_output(corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert run_subprocess("score", corpus, "--out", reference, "-m", "jc-tiny").returncode == 0

    out = tmp_path / "shared"
    env = {"SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    cmd = [sys.executable, "-m", "jestcurate", "score", str(corpus), "--out", str(out)]
    procs = [
        subprocess.Popen(
            [*cmd, "-m", "jc-tiny", "--workers", "1"],
            env={**os.environ, **env, "SLURM_ARRAY_TASK_ID": str(5 + i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    # Each task scored exactly one of the three shards.
    assert all(re.search(r"scored now\s+1\s", o) for o in outputs), outputs
    parts, statuses = parts_and_statuses(out)
    assert statuses == {"00000": "ok", "00001": "ok", "00002": "ok"}
    assert parts == parts_and_statuses(reference)[0]
    assert not [p for p in out.rglob(".*") if p.is_file()], "temp files left behind"
    assert json.loads((out / "meta.json").read_text())["role"] == "reference"


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    spec = CorpusSpec(shards=8, samples_per_shard=64, seed=3, image_size=48, noise=PRESETS["noisy"])
    write_corpus(pool, spec)
    args = ["score", pool, "-m", "jc-tiny", "--batch-size", "16", "--workers", "1"]
    whole = tmp_path / "whole"
    assert run_subprocess(*args, "--out", whole).returncode == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jestcurate", *[str(a) for a in args], "--out", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "done").glob("*.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its decoding workers
    proc.wait()
    done_at_kill = len(list((out / "done").glob("*.json")))
    assert 1 <= done_at_kill < 8, "the kill should land mid-run"

    rerun = run_subprocess(*args, "--out", out)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{done_at_kill} of 8 shards already done" in rerun.stderr
    assert parts_and_statuses(out) == parts_and_statuses(whole)
    assert not [p for p in out.rglob(".*") if p.is_file()], "temp files left behind"
    for part in (out / "parts").glob("*.parquet"):
        assert pq.read_table(part).num_rows == 64
