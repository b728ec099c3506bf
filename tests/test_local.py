"""`jestcurate local`: score and select as N task processes on this machine (CPU processes
here), with the same bytes as one run or as the tasks run one by one, a killed or failing task
that leaves the others to finish, `status` naming it, and a rerun that completes the set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, run_subprocess

from jestcurate.pipelines.synth import CorpusSpec, write_corpus


def local(*args: object) -> tuple[int, str]:
    """`jestcurate local ...` in a new process: (exit status, stdout and stderr)."""
    done = run_subprocess("local", *args)  # type: ignore[arg-type]
    return done.returncode, done.stdout + done.stderr


def parts(scores: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((scores / "parts").glob("*.parquet"))}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # shards long enough (about a second each here) that a test can find a task mid-shard
    folder = tmp_path_factory.mktemp("local") / "pool"
    write_corpus(folder, CorpusSpec(shards=4, samples_per_shard=48, seed=3, image_size=32))
    return folder


@pytest.fixture(scope="module")
def one_run(pool: Path) -> Path:
    """The score set of one plain `score` run, for comparison."""
    out = pool.parent / "one-run"
    code, output = run_cli("score", pool, "--out", out, "-m", "jc-tiny", "--workers", 0)
    assert code == 0, output
    return out


SCORE = ["--", "score", "POOL", "--out", "OUT", "-m", "jc-tiny", "--workers", "0"]


def score_args(pool: Path, out: Path) -> list[str]:
    return [str(pool) if a == "POOL" else str(out) if a == "OUT" else a for a in SCORE]


def test_tasks_give_the_bytes_of_one_run(pool: Path, one_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    code, output = local("--num-tasks", 2, "--devices", "cpu", *score_args(pool, out))
    assert code == 0, output
    assert "score task 0: done" in output and "score task 1: done" in output
    assert parts(out) == parts(one_run)
    # each task's own log, with the command it ran
    log = (out / "local" / "logs" / "score-00001.log").read_text()
    assert "--task-index 1 --num-tasks 2" in log
    code, output = local("--num-tasks", 2, "--devices", "cpu", *score_args(pool, out))
    assert code == 0 and "nothing to do" in output, output
    # Nothing is left, but the files are another model's: score itself says so.
    other = [a.replace("jc-tiny", "jc-tiny-sigmoid") for a in score_args(pool, out)]
    code, output = local("--devices", "cpu", *other)
    assert code == 1 and "made differently" in output and "fix that and rerun" in output, output


def test_a_requeued_job_takes_over_its_own_tasks_claims(
    pool: Path, one_run: Path, tmp_path: Path
) -> None:
    """`jestcurate local` as one Slurm job, requeued onto another node: task 1's claim from the
    first node is within its lease, but it is this job's task 1, so the new task 1 goes on."""
    out = tmp_path / "scores"
    shutil.copytree(one_run, out)
    for lost in ("done/00001.json", "parts/00001.parquet"):
        (out / lost).unlink()
    now = time.time()
    claim = {"host": "the-first-node", "pid": 1, "pid_start": None, "token": "before",
             "job": "77.local-1", "claimed": now, "expires": now + 3600}  # fmt: skip
    (out / "claims").mkdir(exist_ok=True)
    (out / "claims" / "00001.json").write_text(json.dumps(claim))
    done = run_subprocess("local", "--num-tasks", 2, "--devices", "cpu",
                          *score_args(pool, out), env={"SLURM_JOB_ID": "77"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "score task 1: done" in done.stdout, done.stdout
    assert parts(out) == parts(one_run)


def _claimed_pid(out: Path, limit: float = 120.0) -> int:
    """The pid of a task process holding a shard claim, as soon as one does."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in (out / "claims").glob("0*.json"):
            try:
                return int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue  # being written or released
        time.sleep(0.01)
    pytest.fail("no task claimed a shard")


def test_a_killed_task_leaves_the_others_and_a_rerun_completes(
    pool: Path, one_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    command = [sys.executable, "-m", "jestcurate", "local", "--num-tasks", "2", "--devices", "cpu"]
    runner = subprocess.Popen(
        [*command, *score_args(pool, out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    victim = _claimed_pid(out)
    cmdline = Path(f"/proc/{victim}/cmdline").read_bytes().split(b"\0")
    assert b"--task-index" in cmdline  # a task, not the executor
    task = int(cmdline[cmdline.index(b"--task-index") + 1])
    os.kill(victim, signal.SIGKILL)
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode == 1, output
    assert f"score task {task} failed (killed by signal 9)" in output, output
    assert f"score task {1 - task}: done" in output, output
    code, shown = run_cli("status", out, pool, "--check")
    assert code == 1, shown  # the killed task's shards are left
    code, output = local("--num-tasks", 2, "--devices", "cpu", *score_args(pool, out))
    assert code == 0, output
    assert f"score task {task}: done" in output and f"task {1 - task}" not in output
    assert parts(out) == parts(one_run)
    code, shown = run_cli("status", out, pool, "--check")
    assert code == 0, shown


def test_sigterm_to_local_ends_its_tasks_and_a_rerun_completes(
    pool: Path, one_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    command = [sys.executable, "-m", "jestcurate", "local", "--num-tasks", "2", "--devices", "cpu"]
    runner = subprocess.Popen(
        [*command, *score_args(pool, out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    task = _claimed_pid(out)
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 143, output
    assert (
        not Path(f"/proc/{task}").exists() or b"zombie" in Path(f"/proc/{task}/status").read_bytes()
    )
    code, output = local("--num-tasks", 2, "--devices", "cpu", *score_args(pool, out))
    assert code == 0, output
    assert parts(out) == parts(one_run)


def test_select_tasks_fail_status_names_one_and_a_rerun_completes(
    one_run: Path, tmp_path: Path
) -> None:
    select = ["select", one_run, "--out", tmp_path / "sel", "-b", 4, "--export"]
    # Task 1 cannot write its round-1 buckets: a file where its folder goes.
    blocker = tmp_path / "sel" / "tasks" / "scatter" / "00001-of-00003"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    code, output = local("--num-tasks", 3, "--devices", "cpu", "--", *select)
    assert code == 1, output
    assert "round 1 task 1 failed" in output, output
    assert "the rounds after round 1 did not run" in output, output
    assert not (tmp_path / "sel" / "summary.json").exists()

    code, shown = run_cli("status", tmp_path / "sel", "--json", "--check")
    assert code == 1, shown
    found = json.loads(shown)
    assert found["kind"] == "selection" and not found["merged"] and found["num_tasks"] == 3
    assert found["export_planned"] and found["export"] is None
    round_one = [u for u in found["unfinished"] if u["step"] == "round 1"]
    assert [u["task"] for u in round_one] == [1]
    assert round_one[0]["log"].endswith("round1-00001.log") and round_one[0]["last"]
    code, shown = run_cli("status", tmp_path / "sel")
    assert "round 1 unfinished task 1 (log " in shown, shown

    blocker.unlink()
    code, output = local("--num-tasks", 3, "--devices", "cpu", "--", *select)
    assert code == 0, output
    assert "round 1 task 1: done" in output and "round 1 task 0" not in output
    code, shown = run_cli("status", tmp_path / "sel", "--check")
    assert code == 0, shown

    # The same files as the three tasks run one after the other, then the merge and export.
    by_hand = ["select", one_run, "--out", tmp_path / "by-hand", "-b", 4]
    for task in (0, 1, 2, 0, 1, 2):
        code, output = run_cli(*by_hand, "--task-index", task, "--num-tasks", 3)
        assert code == 0, output
    merged = (tmp_path / "sel" / "manifest.parquet").read_bytes()
    assert merged == (tmp_path / "by-hand" / "manifest.parquet").read_bytes()
    assert (tmp_path / "sel" / "shards.txt").is_file()
    # Rerun with another batch size: nothing is left by the files, and select refuses.
    code, output = local("--num-tasks", 3, "--devices", "cpu", "--", *select[:-2], 8)
    assert code == 1 and "holds a different selection" in output, output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--", "dedup", "x"], "jestcurate local runs score, import, select, not 'dedup'"),
        ([], "give the command after --"),
        (
            ["--devices", "gpu0", "--", "score", "POOL", "--out", "o", "-m", "jc-tiny"],
            "--devices takes auto, cpu or GPU ids",
        ),
        (["--num-tasks", 0, "--", "score", "POOL", "--out", "o"], "at least 1"),
        (
            [
                "--num-tasks",
                2,
                "--",
                "score",
                "POOL",
                "--out",
                "o",
                "-m",
                "jc-tiny",
                "--task-index",
                0,
            ],
            "local's to set",
        ),
        (["--num-tasks", 1, "--", "select", "s", "--out", "o"], "--num-tasks must be at least 2"),
        (["--", "score", "POOL", "--out", "o", "--bogus"], "score options: No such option"),
    ],
)
def test_bad_input_is_one_line(pool: Path, args: list[object], message: str) -> None:
    code, output = run_cli("local", *[pool if a == "POOL" else a for a in args])
    assert code == 2 and message in output, output
    assert len(output.strip().splitlines()) == 1, output


def test_import_as_tasks_equals_one_import(tmp_path: Path) -> None:
    from conftest import write_datacomp

    write_datacomp(tmp_path / "pool", shards=3)
    common = ["--format", "datacomp", "-m", "jc-tiny", "--logit-scale", "100"]
    code, output = run_cli("import", tmp_path / "pool", "--out", tmp_path / "one", *common)
    assert code == 0, output
    # five tasks asked for, three files: three tasks
    code, output = local("--num-tasks", 5, "--", "import", tmp_path / "pool", "--out",
                         tmp_path / "tasks", *common)  # fmt: skip
    assert code == 0, output
    assert "import task 2: done" in output and "import task 3" not in output  # 3 files
    assert parts(tmp_path / "tasks") == parts(tmp_path / "one")
    code, output = local("--num-tasks", 5, "--", "import", tmp_path / "pool", "--out",
                         tmp_path / "tasks", *common)  # fmt: skip
    assert code == 0 and "nothing to do" in output, output


def test_select_ledger_tasks_write_the_merge_written_ledger(one_run: Path, tmp_path: Path) -> None:
    """--ledger with 3 tasks: after the merge, a ledger round of the tasks (--spread-ledger)
    writes the parts a merge writing the whole ledger gives, byte for byte, and the summary."""
    select = ["select", one_run, "--out", tmp_path / "sel", "-b", 4, "--ledger"]
    code, output = local("--num-tasks", 3, "--devices", "cpu", "--", *select)
    assert code == 0, output
    assert "ledger task 0: done" in output and "ledger task 2: done" in output, output
    by_hand = ["select", one_run, "--out", tmp_path / "by-hand", "-b", 4, "--ledger"]
    for task in (0, 1, 2, 0, 1, 2):  # the merge writes the ledger itself
        code, output = run_cli(*by_hand, "--task-index", task, "--num-tasks", 3)
        assert code == 0, output

    def ledger(out: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((out / "ledger").glob("*.parquet"))}

    assert len(ledger(tmp_path / "sel")) == 4
    assert ledger(tmp_path / "sel") == ledger(tmp_path / "by-hand")
    summary = json.loads((tmp_path / "sel" / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "by-hand" / "summary.json").read_text())
    assert summary["fates"] and "status" not in summary["ledger"]
    code, shown = run_cli("status", tmp_path / "sel", "--check")
    assert code == 0, shown
    code, output = local("--num-tasks", 3, "--devices", "cpu", "--", *select)  # nothing left
    assert code == 0 and "ledger task" not in output, output
