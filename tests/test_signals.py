"""SIGTERM (Slurm's scancel and preemption) ends a run cleanly: exit 143 within seconds, no
process of the run left, claims released, nothing partial, and a rerun equals an uninterrupted
run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus, write_score_set


def _start(*args: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jestcurate", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(check, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found |= {int(c) for c in text.split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _terminate(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM, then the run must be gone well inside Slurm's default KillWait (30 s)."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_ends_score_cleanly_and_a_rerun_completes(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_corpus(pool, CorpusSpec(shards=6, samples_per_shard=100, seed=5, image_size=48,
                                  noise=PRESETS["noisy"]))  # fmt: skip
    out = tmp_path / "scores"
    args = ("score", pool, "-m", "jc-tiny", "--out", out, "--workers", "2", "--batch-size", "32")
    proc = _start(*args)
    _wait_for(lambda: len(list((out / "done").glob("*.json"))) >= 1 if (out / "done").is_dir()
              else False)  # fmt: skip
    workers = _children(proc.pid)
    assert workers, "the run should have decoding workers"
    code, err = _terminate(proc)
    assert code == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    _wait_for(lambda: not [w for w in workers if _alive(w)], seconds=5)  # no worker outlives it
    assert not list((out / "claims").glob("*.json")), "claims were left behind"
    assert not list((out / "parts").glob(".*")), "a partial part is visible"
    done = len(list((out / "done").glob("*.json")))
    assert done < 6, "the run finished before the signal: make the corpus bigger"

    rerun = subprocess.run([sys.executable, "-m", "jestcurate", *map(str, args)],
                           capture_output=True, text=True)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    whole = tmp_path / "whole"
    again = subprocess.run([sys.executable, "-m", "jestcurate", "score", pool, "-m", "jc-tiny",
                            "--out", whole, "--workers", "2", "--batch-size", "32"],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    for part in sorted((whole / "parts").glob("*.parquet")):
        a = pq.read_table(part, columns=["key", "clip_score", "ref_loss"]).to_pydict()
        b = pq.read_table(out / "parts" / part.name, columns=["key", "clip_score", "ref_loss"])
        b = b.to_pydict()
        assert a["key"] == b["key"]
        assert a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-5)


def test_sigterm_ends_select_cleanly_and_a_rerun_is_identical(tmp_path: Path) -> None:
    write_score_set(tmp_path / "ref", shards=40, rows_per_shard=2500, dim=32, seed=1,
                    exact_losses=False)  # fmt: skip
    out = tmp_path / "sel"
    args = ("select", tmp_path / "ref", "--out", out, "-b", 512, "--ratio", 0.5, "--max-steps", 20)
    proc = _start(*args)
    _wait_for(lambda: (out / ".cache").is_dir() or proc.poll() is not None)
    code, err = _terminate(proc)
    assert code == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not (out / ".cache").exists() and not (out / "manifest.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for target in (out, tmp_path / "whole"):
        done = subprocess.run([sys.executable, "-m", "jestcurate", *map(str, args[:3]), target,
                               *map(str, args[4:])], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert (out / "manifest.parquet").read_bytes() == (
        tmp_path / "whole" / "manifest.parquet"
    ).read_bytes()
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))


def test_sigterm_ends_select_export_cleanly(corpus: Path, tmp_path: Path) -> None:
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(corpus, pool)
    scores = tmp_path / "scores"
    base = [sys.executable, "-m", "jestcurate"]
    done = subprocess.run([*base, "score", pool, "-m", "jc-tiny", "--out", scores,
                           "--workers", "0"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    select = ["select", scores, "-b", 4, "--ratio", 0.5, "--export", "--samples-per-shard", 8]
    clean = subprocess.run([*base, *map(str, select), "--out", tmp_path / "clean"],
                           capture_output=True, text=True)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    # The last source shard becomes a FIFO: the export blocks there, mid-run, until signalled.
    tar = pool / "00002.tar"
    tar.rename(tmp_path / "00002.tar")
    os.mkfifo(tar)
    out = tmp_path / "sel"
    proc = _start(*select, "--out", out)
    _wait_for(lambda: any((out / "shards").glob(".spill*")) or proc.poll() is not None)
    time.sleep(0.3)
    code, err = _terminate(proc)
    assert code == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not list((out / "shards").glob("*.tar")) and not (out / "shards.txt").exists()
    assert not [p for p in out.rglob("*.tmp")]
    tar.unlink()
    (tmp_path / "00002.tar").rename(tar)
    again = subprocess.run([*base, *map(str, select), "--out", out], capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (tmp_path / "clean" / "shards").glob("*.tar"))
    assert names == sorted(p.name for p in (out / "shards").glob("*.tar"))
    for name in names:
        assert (out / "shards" / name).read_bytes() == (
            tmp_path / "clean" / "shards" / name
        ).read_bytes()


# A launcher that registers `stalled://`, an fsspec store whose listing works but whose every
# read fails as a dropped connection would: the workers sit in their retry backoff, as on a
# storage outage, which is when a scheduler's SIGTERM must still end the run within seconds.
_STALLED = """
import sys
import fsspec
from fsspec.implementations.memory import MemoryFileSystem

class Stalled(MemoryFileSystem):
    protocol = "stalled"
    root_marker = "/"
    store = {}
    pseudo_dirs = [""]

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kwargs)

fsspec.register_implementation("stalled", Stalled)
for i in range(4):
    with fsspec.open(f"stalled://pool/{i:05d}.tar", "wb") as f:
        f.write(b"x" * 10240)

from jestcurate.cli import main
main()
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_ends_score_with_workers_stuck_in_retries(tmp_path: Path) -> None:
    launcher = tmp_path / "launch.py"
    launcher.write_text(_STALLED)
    out = tmp_path / "scores"
    shards = [f"stalled://pool/{i:05d}.tar" for i in range(4)]
    cmd = [sys.executable, str(launcher), "score", *shards, "-m", "jc-tiny", "--out", str(out),
           "--workers", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    claims = out / "claims"
    _wait_for(lambda: len(list(claims.glob("*.json"))) == 4 if claims.is_dir() else False)
    time.sleep(1.0)  # into the backoff
    workers = _children(proc.pid)
    assert len(workers) >= 4, "the run should have four decoding workers"
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)  # torch alone joins each worker for 5 s in turn
    took = time.monotonic() - began
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    _wait_for(lambda: not [w for w in workers if _alive(w)], seconds=5)
    assert not list(claims.glob("*.json")), "claims were left behind"
    print(f"ended {took:.1f} s after SIGTERM")
