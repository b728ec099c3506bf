"""Shard claims: overlapping runs on one score set never score a shard twice, a dead owner's
claim is taken over at once, another host's only when its lease runs out."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_subprocess

from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus
from jestcurate.scale.claims import Claims, Owner, _process_start


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def foreign(host: str, pid: int, expires_in: float, pid_start: str | None = None) -> dict:
    return {
        "host": host,
        "pid": pid,
        "pid_start": pid_start,
        "token": "someone-else",
        "claimed": time.time(),
        "expires": time.time() + expires_in,
    }


def put(out: Path, name: str, claim: dict) -> None:
    (out / "claims").mkdir(parents=True, exist_ok=True)
    (out / "claims" / f"{name}.json").write_text(json.dumps(claim))


def test_claim_rules(tmp_path: Path) -> None:
    me = Claims(tmp_path, Owner.this_process(), lease=60)
    host = socket.gethostname()
    assert me.try_claim("a") and me.try_claim("a")  # idempotent for the owner
    other = Claims(tmp_path, Owner.this_process(), lease=60)
    assert not other.try_claim("a")  # a live owner on this host keeps it
    other.release("a")  # releasing someone else's claim does nothing
    assert me.is_ours(me.read("a"))

    put(tmp_path, "dead", foreign(host, dead_pid(), expires_in=3600))
    assert me.try_claim("dead")  # owner gone on this host: taken at once, lease or not
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        put(tmp_path, "live", foreign(host, sleeper.pid, 3600, _process_start(sleeper.pid)))
        assert not me.try_claim("live")
        put(tmp_path, "reused", foreign(host, sleeper.pid, 3600, pid_start="1"))
        assert me.try_claim("reused")  # the pid is alive but is another process now
    finally:
        sleeper.kill()
        sleeper.wait()

    put(tmp_path, "far", foreign("another-host", 1, expires_in=3600))
    assert not me.try_claim("far")  # another host: trusted until its lease ends
    put(tmp_path, "far-expired", foreign("another-host", 1, expires_in=-1))
    assert me.try_claim("far-expired")
    (tmp_path / "claims" / "garbage.json").write_text("{not json")
    assert me.try_claim("garbage")

    me.release("a")
    assert me.read("a") is None
    assert sorted(me.ours()) == ["dead", "far-expired", "garbage", "reused"]


def test_heartbeat_renews_and_releases(tmp_path: Path) -> None:
    me = Claims(tmp_path, Owner.this_process(), lease=0.4)
    with me.heartbeat():
        assert me.try_claim("x")
        first = me.read("x")["expires"]
        time.sleep(0.5)
        assert me.read("x")["expires"] > first  # renewed, so it never looks expired
    assert me.read("x") is None  # released on the way out


def score_cfg(corpus: Path, out: Path, **kw) -> score_mod.ScoreConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("poll", 0.05)
    return score_mod.ScoreConfig(inputs=[str(corpus)], out=out, model="jc-tiny", device="cpu", **kw)


def test_a_shard_claimed_by_a_live_run_is_waited_for_not_scored(
    corpus: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    score_mod.run(score_cfg(corpus, reference))
    out = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])  # the "other run" holding shard 00001
    try:
        put(out, "00001", foreign(socket.gethostname(), sleeper.pid, 3600))
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(report=score_mod.run(score_cfg(corpus, out)))
        )
        thread.start()
        deadline = time.monotonic() + 120
        while len(list((out / "done").glob("*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert thread.is_alive(), "the run must wait for the claimed shard"
        assert not (out / "done" / "00001.json").exists()
        # The other run finishes shard 00001 and lets go of it.
        shutil.copy(reference / "parts" / "00001.parquet", out / "parts" / "00001.parquet")
        shutil.copy(reference / "done" / "00001.json", out / "done" / "00001.json")
        (out / "claims" / "00001.json").unlink()
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        sleeper.kill()
        sleeper.wait()
    report = result["report"]
    assert sorted(r.name for r in report.results) == ["00000", "00002"]
    assert report.by_others == 1
    assert not list((out / "claims").glob("*.json"))


def test_a_dead_runs_claim_is_taken_over_at_once(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    put(out, "00001", foreign(socket.gethostname(), dead_pid(), 3600))
    began = time.monotonic()
    report = score_mod.run(score_cfg(corpus, out, poll=30))
    assert sorted(r.name for r in report.results) == ["00000", "00001", "00002"]
    assert time.monotonic() - began < 30  # no poll: a dead owner is not waited for


@pytest.mark.slow
def test_overlapping_runs_score_each_shard_exactly_once(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_corpus(
        pool,
        CorpusSpec(shards=8, samples_per_shard=32, seed=5, image_size=48, noise=PRESETS["noisy"]),
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jestcurate", "-v", "score", str(pool), "--out", str(out)]
    cmd += ["-m", "jc-tiny", "--workers", "1", "--batch-size", "16"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    scored = [int(re.search(r"scored now\s+(\d+)", o).group(1)) for o in outputs]
    assert sum(scored) == 8, (scored, outputs)  # never the same shard twice
    statuses = {p.stem: json.loads(p.read_text())["status"] for p in (out / "done").glob("*")}
    assert statuses == {f"{i:05d}": "ok" for i in range(8)}
    assert not list((out / "claims").glob("*.json"))
    # A third run right after finds nothing to do.
    again = run_subprocess("score", pool, "--out", out, "-m", "jc-tiny")
    assert again.returncode == 0 and re.search(r"scored now\s+0\s", again.stdout), again.stdout


def test_a_growing_input_pattern_scores_only_new_shards(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    spec = CorpusSpec(shards=3, samples_per_shard=16, seed=2, image_size=48)
    write_corpus(pool, spec)
    (pool / "00002.tar").rename(tmp_path / "later.tar")  # the third shard lands tomorrow
    out = tmp_path / "out"
    first = score_mod.run(score_cfg(pool, out))
    assert sorted(r.name for r in first.results) == ["00000", "00001"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*")}
    (tmp_path / "later.tar").rename(pool / "00002.tar")
    second = score_mod.run(score_cfg(pool, out))
    assert [r.name for r in second.results] == ["00002"] and second.skipped == 2
    for name, mtime in before.items():
        assert (out / "parts" / name).stat().st_mtime_ns == mtime  # untouched
    assert os.path.exists(out / "parts" / "00002.parquet")


def test_local_tasks_inside_one_slurm_job_do_not_take_each_others_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jestcurate local` run as one Slurm job: its tasks share SLURM_JOB_ID, so a claim's
    "earlier incarnation of this job" must also be the same local task."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("JESTCURATE_LOCAL_TASK", "0")
    first = Owner.this_process()
    monkeypatch.setenv("JESTCURATE_LOCAL_TASK", "1")
    second = Owner.this_process()
    assert first.job == "77.local-0" and second.job == "77.local-1"
    # task 0's claim (held by a process that is still alive: this one) stands against task 1
    assert Claims(tmp_path, first).try_claim("00000")
    assert not Claims(tmp_path, second).try_claim("00000")
    # a requeued incarnation of task 0 itself takes it over
    monkeypatch.setenv("JESTCURATE_LOCAL_TASK", "0")
    assert Claims(tmp_path, Owner.this_process()).try_claim("00000")
