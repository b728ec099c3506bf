"""`slurm score`, `slurm select` and `slurm import` on a real single-node Slurm (started by
`.ci/services/slurm.sh start`, which .ci/run runs): submitted end to end over more tasks than
MaxArraySize (3 there), a script submitted by hand from another folder, a score task cancelled
or requeued while it is scoring, a task that fails on a broken shard, a select chain of three
tasks that ends when one is cancelled (status names it), and an import whose cancelled task
--retry completes. Skipped, with the reason, where no Slurm answers."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

import jestcurate
from jestcurate.pipelines.synth import CorpusSpec, shard_samples, write_corpus


@functools.cache  # asked once: sinfo takes seconds to give up on a controller that is not there
def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        shown = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(re.search(r"^(idle|mixed|allocated)", shown, re.MULTILINE))


pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def slurm_answers() -> None:
    """Skip, saying why, where no Slurm answers; fail instead under CI=true or where .ci/run
    started one (JESTCURATE_REQUIRE_SLURM=1), so that these tests cannot quietly stop running
    in CI."""
    if _slurm_answers():
        return
    reason = "no Slurm answers here (.ci/services/slurm.sh start)"
    if os.environ.get("JESTCURATE_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason}, though .ci/run started one", pytrace=False)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the Slurm tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def jobs_run_this_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs run `python -m jestcurate` in the folder the script was written from, so they
    would import whichever jestcurate the interpreter has installed (another checkout's, for an
    editable install). sbatch passes the environment on: the jobs import the code under test."""
    root = str(Path(jestcurate.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *paths]))


# A 2-core node: one core and a little memory a task, so two tasks run at once.
SMALL_TASKS = ["--gpus-per-task", "0", "--cpus-per-task", "1", "--mem", "1G", "--workers", "0"]


def wait_for(jobs: list[str], limit: float = 300.0) -> None:
    """Until Slurm lists none of `jobs` (array jobs included) as pending or running."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%A %T", "-j", ",".join(jobs)],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        if not listed.strip():
            return
        time.sleep(1)
    pytest.fail(f"jobs {jobs} still queued after {limit:.0f} s:\n{listed}")


SPEC = CorpusSpec(shards=4, samples_per_shard=8, seed=5, image_size=32)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "pool", SPEC)
    return tmp_path / "pool"


def markers(scores: Path) -> list[str]:
    return sorted(p.stem for p in (scores / "done").glob("*.json"))


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` of one job or array task, as a dict (kept MinJobAge after it ends)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def state_of(job: str) -> str:
    return job_fields(job)["JobState"]


def submitted_jobs(output: str) -> list[str]:
    found = re.search(r"as job\(s\) ([\d, ]+)", output)
    assert found, output
    return [j.strip() for j in found.group(1).split(",")]


def stamps(scores: Path) -> dict[str, tuple[bytes, int]]:
    """Each completion marker's bytes and mtime: a shard scored again changes both."""
    return {
        p.stem: (p.read_bytes(), p.stat().st_mtime_ns) for p in (scores / "done").glob("*.json")
    }


def assert_every_sample_once(scores: Path) -> None:
    """Each shard's part holds its shard's samples, each once, all scored."""
    import pyarrow.parquet as pq

    parts = sorted((scores / "parts").glob("*.parquet"))
    assert [p.stem for p in parts] == [f"{k:05d}" for k in range(SPEC.shards)]
    for shard, part in enumerate(parts):
        table = pq.read_table(part, columns=["key", "status"])
        keys = table.column("key").to_pylist()
        assert sorted(keys) == [s["__key__"] for s in shard_samples(SPEC, shard)], part
        assert set(table.column("status").to_pylist()) == {"ok"}, part


def logs(scores: Path) -> str:
    return "".join(p.read_text() for p in sorted((scores / "slurm" / "logs").glob("*")))


class StalledStore:
    """The pool over HTTP on 127.0.0.1, as a remote store would serve it, except that the first
    GET of `stalled` is not answered until the test ends: the task that reads that shard is
    running, holds its claim and stays so, however fast or slow the machine, until it is
    cancelled or requeued. Later GETs of it (a retried or requeued task's) are answered."""

    def __init__(self, root: Path, stalled: str) -> None:
        self.reached = threading.Event()  # the stalled GET arrived
        self.ended = threading.Event()  # the test is over: answer it after all
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def answer(self, head: bool) -> None:
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if not head and path.name == stalled and not store.reached.is_set():
                    store.reached.set()
                    store.ended.wait(900)
                asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if asked and not head:
                    start = int(asked[1])
                    end = min(int(asked[2] or len(data) - 1), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    data = data[start : end + 1]
                else:
                    self.send_response(200)
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    with contextlib.suppress(OSError):  # the task that asked is gone
                        self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.ended.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalled(pool: Path) -> Iterator[StalledStore]:
    store = StalledStore(pool, "00003.tar")
    yield store
    store.close()


def stalled_inputs(store: StalledStore) -> list[str]:
    """Shards 0-2 from the pool, shard 3 from the store."""
    return ["pool/00000.tar", "pool/00001.tar", "pool/00002.tar", f"{store.url}/00003.tar"]


# --batch-size 1: each shard is encoded, and its part and marker written, as soon as it is read
# (larger batches pack samples across shards), so task 1 has finished shard 1 before shard 3.
TWO_TASKS = ["-m", "jc-tiny", "--num-tasks", 2, "--batch-size", 1, *SMALL_TASKS]


def release(job: str) -> None:
    released = subprocess.run(["scontrol", "release", job], capture_output=True, text=True)
    assert released.returncode == 0, released.stderr


def stall_task_one(store: StalledStore, scores: Path) -> str:
    """Submit two tasks over the four shards (task 1: shards 1 and 3); return the array job once
    task 0 has ended and task 1 has scored shard 1 and is reading shard 3, its claim held, the
    job RUNNING. Submitted held and released one task after the other: a task stalled here
    holds a core of the node until the test ends it, so a test run beside this one (it has the
    other core) must not find it waiting for a core too."""
    code, output = run_cli("slurm", "score", *stalled_inputs(store), "--out", scores,
                           *TWO_TASKS, "--sbatch", "hold", "--submit")  # fmt: skip
    assert code == 0, output
    (job,) = submitted_jobs(output)
    release(f"{job}_0")
    wait_for([f"{job}_0"], limit=600)  # generous: a queue that other tests share
    assert state_of(f"{job}_0") == "COMPLETED", logs(scores)
    release(f"{job}_1")
    assert store.reached.wait(600), logs(scores)
    assert state_of(f"{job}_1") == "RUNNING"
    assert (scores / "claims" / "00003.json").is_file()
    assert not (scores / "done" / "00003.json").exists()
    assert "00001" in markers(scores)
    code, output = run_cli("status", scores, *stalled_inputs(store), "--json", "--check")
    assert code == 1, output
    running = json.loads(output)["running"]
    assert [r["shard"] for r in running] == [stalled_inputs(store)[3]], output
    return job


def test_slurm_score_submits_several_arrays_and_every_task_scores(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run_cli("slurm", "score", "pool", "--out", "scores", "-m", "jc-tiny",
                           "--num-tasks", 4, *SMALL_TASKS, "--submit")  # fmt: skip
    assert code == 0, output
    found = re.search(r"as job\(s\) ([\d, ]+)", output)
    assert found, output
    jobs = [j.strip() for j in found.group(1).split(",")]
    assert len(jobs) == 2, output  # 4 tasks, MaxArraySize 3: two array jobs of the script
    wait_for(jobs)
    assert markers(tmp_path / "scores") == ["00000", "00001", "00002", "00003"], sorted(
        (tmp_path / "scores" / "slurm" / "logs").glob("*")
    )
    code, output = run_cli("status", "scores", "pool", "--check")
    assert code == 0, output


def test_a_script_submitted_by_hand_from_another_folder_runs(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run_cli("slurm", "score", "pool", "--out", "scores", "-m", "jc-tiny",
                           "--num-tasks", 2, *SMALL_TASKS)  # fmt: skip
    assert code == 0, output
    script = tmp_path / "scores" / "slurm" / "score.sbatch"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", str(script), "0"],
        cwd=elsewhere, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    wait_for([submitted.stdout.strip().split(";")[0]])
    logs = "".join(p.read_text() for p in (tmp_path / "scores" / "slurm" / "logs").glob("*"))
    assert markers(tmp_path / "scores") == ["00000", "00001", "00002", "00003"], logs


def test_a_score_task_cancelled_while_running_is_resubmitted_alone_by_retry(
    stalled: StalledStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scores = tmp_path / "scores"
    job = stall_task_one(stalled, scores)
    inputs = stalled_inputs(stalled)
    # Only task 1 has a shard left, and it is scoring it: no task to resubmit.
    code, output = run_cli("slurm", "score", *inputs, "--out", "scores", *TWO_TASKS, "--retry")
    assert code == 0 and "nothing to retry" in output and "1 more are running" in output, output
    cancelled = subprocess.run(["scancel", f"{job}_1"], capture_output=True, text=True)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for([job])
    assert state_of(f"{job}_1") == "CANCELLED"
    # Cancelled mid-read, shard 3 is neither done nor failed: pending (its claim is gone).
    assert markers(scores) == ["00000", "00001", "00002"], logs(scores)
    code, output = run_cli("status", "scores", *inputs, "--json", "--check")
    assert code == 1, output
    found = json.loads(output)
    assert found["pending"] == [inputs[3]], found
    assert found["done"] == 3 and not found["failed"] and not found["running"], found
    before = stamps(scores)

    code, output = run_cli("slurm", "score", *inputs, "--out", "scores", *TWO_TASKS, "--retry")
    assert code == 0 and "resubmitted 1 of 2 tasks" in output, output
    (retried,) = submitted_jobs(output)
    assert job_fields(retried)["ArrayTaskId"] == "1"  # task 1 alone: shards 1 and 3
    wait_for([retried])
    assert markers(scores) == ["00000", "00001", "00002", "00003"], logs(scores)
    after = stamps(scores)
    assert {k: after[k] for k in before} == before  # shard 1 (task 1's too) was not scored again
    assert_every_sample_once(scores)
    code, output = run_cli("status", "scores", *inputs, "--check")
    assert code == 0, output


def test_a_score_task_requeued_while_running_resumes_and_loses_or_doubles_no_row(
    stalled: StalledStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scores = tmp_path / "scores"
    job = stall_task_one(stalled, scores)
    done_first = stamps(scores)["00001"]
    requeued = subprocess.run(["scontrol", "requeue", f"{job}_1"], capture_output=True,
                              text=True)  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr
    deadline = time.monotonic() + 120
    while (state := state_of(f"{job}_1")) in ("RUNNING", "COMPLETING", "REQUEUED"):
        assert time.monotonic() < deadline, job_fields(f"{job}_1")  # the first run is ending
        time.sleep(0.5)
    if state == "PENDING":  # Slurm holds a requeued job back two minutes; start it at once
        now = subprocess.run(["scontrol", "update", f"jobid={job}_1", "StartTime=now"],
                             capture_output=True, text=True)  # fmt: skip
        assert now.returncode == 0, now.stderr
    wait_for([job])
    shown = job_fields(f"{job}_1")
    assert shown["JobState"] == "COMPLETED" and shown["Restarts"] == "1", shown
    assert "DUE TO JOB REQUEUE" in logs(scores)
    assert markers(scores) == ["00000", "00001", "00002", "00003"], logs(scores)
    assert stamps(scores)["00001"] == done_first  # resumed: the finished shard was kept
    assert_every_sample_once(scores)
    code, output = run_cli("status", "scores", *stalled_inputs(stalled), "--check")
    assert code == 0, output


def test_a_score_task_failing_on_a_broken_shard_is_retried_once_it_is_replaced(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scores = tmp_path / "scores"
    good = (pool / "00003.tar").read_bytes()
    (pool / "00003.tar").write_bytes(good[: len(good) // 2])  # truncated mid-sample
    code, output = run_cli("slurm", "score", "pool", "--out", "scores", *TWO_TASKS, "--submit")
    assert code == 0, output
    (job,) = submitted_jobs(output)
    wait_for([job])
    # score exits 1 when a shard fails; the other task is not affected
    failed = job_fields(f"{job}_1")
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] == "1:0", failed
    assert state_of(f"{job}_0") == "COMPLETED"
    assert markers(scores) == ["00000", "00001", "00002", "00003"], logs(scores)
    code, output = run_cli("status", "scores", "pool", "--check")
    assert code == 1, output
    assert re.search(r"failed \S*00003\.tar: tar damaged after \d+ samples", output), output
    before = stamps(scores)

    (pool / "00003.tar").write_bytes(good)
    code, output = run_cli("slurm", "score", "pool", "--out", "scores", *TWO_TASKS, "--retry")
    assert code == 0 and "resubmitted 1 of 2 tasks" in output, output
    (retried,) = submitted_jobs(output)
    assert job_fields(retried)["ArrayTaskId"] == "1"
    wait_for([retried])
    assert state_of(retried) == "COMPLETED", logs(scores)
    after = stamps(scores)
    assert after["00003"] != before["00003"]
    del before["00003"]
    assert {k: after[k] for k in before} == before  # shard 1 (task 1's too) was not scored again
    assert_every_sample_once(scores)
    code, output = run_cli("status", "scores", "pool", "--check")
    assert code == 0, output
    code, output = run_cli("slurm", "score", "pool", "--out", "scores", *TWO_TASKS, "--retry")
    assert code == 0 and "nothing to retry" in output, output


def test_a_cancelled_select_task_ends_the_chain_and_retry_completes_it(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """afterok alone leaves round 2, the merge and the export PENDING (DependencyNeverSatisfied)
    for good once a round-1 task fails; the chain must end instead."""
    monkeypatch.chdir(tmp_path)
    code, output = run_cli("score", "pool", "--out", "scores", "-m", "jc-tiny", "--workers", 0)
    assert code == 0, output
    select_args = ["scores", "--out", "curated", "-b", 2, "--ratio", 0.5, "--export"]
    # Submitted held, so that task 1 is cancelled before it can run, whatever the timing.
    code, output = run_cli("slurm", "select", "--num-tasks", 3, *SMALL_TASKS[:6], "--sbatch",
                           "hold", "--submit", "--", *select_args)  # fmt: skip
    assert code == 0, output
    jobs = re.search(r"then .*?: ([\d, ]+)$", output.strip(), re.MULTILINE)
    assert jobs, output
    ids = [j.strip() for j in jobs.group(1).split(",")]
    round_one = ids[0]
    cancelled = subprocess.run(["scancel", f"{round_one}_1"], capture_output=True, text=True)
    assert cancelled.returncode == 0, cancelled.stderr
    released = subprocess.run(["scontrol", "release", ",".join(ids)], capture_output=True,
                              text=True)  # fmt: skip
    assert released.returncode == 0, released.stderr
    wait_for(ids, limit=180)  # nothing left pending: the dependants were cancelled
    assert not (tmp_path / "curated" / "summary.json").exists()  # no merge ran
    # status names the task that stopped the chain, with its log, and says the chain ended
    code, shown = run_cli("status", "curated", "--json", "--check")
    assert code == 1, shown
    found = json.loads(shown)
    assert [u["task"] for u in found["unfinished"] if u["step"] == "round 1"] == [1], found
    assert found["slurm"]["queued"] == [] and found["export_planned"], found
    code, shown = run_cli("status", "curated")
    assert "round 1 unfinished task 1" in shown and "chain has ended unfinished" in shown, shown

    # --retry resubmits what is unfinished, and the selection completes ...
    code, output = run_cli(
        "slurm", "select", "--num-tasks", 3, *SMALL_TASKS[:6], "--retry", "--", *select_args
    )  # fmt: skip (the scripts' resources may change)
    assert code == 0 and "resubmitted round 1 of 1 and round 2 of 3 of 3 tasks" in output, output
    retried = re.search(r": ([\d, ]+)$", output.strip(), re.MULTILINE)
    assert retried, output
    wait_for([j.strip() for j in retried.group(1).split(",")], limit=240)
    # ... with the files of an uninterrupted run of the same three tasks (here, in-process).
    for task in (0, 1, 2, 0, 1, 2):  # round 1 of each, then round 2 (the last merges)
        code, output = run_cli("select", *select_args[:-1], "--out", "uninterrupted",
                               "--task-index", task, "--num-tasks", 3)  # fmt: skip
        assert code == 0, output
    merged = (tmp_path / "curated" / "manifest.parquet").read_bytes()
    assert merged == (tmp_path / "uninterrupted" / "manifest.parquet").read_bytes()
    assert (tmp_path / "curated" / "shards.txt").is_file()  # the export ran
    code, output = run_cli("slurm", "select", "--num-tasks", 3, *SMALL_TASKS[:6], "--retry",
                           "--", *select_args)  # fmt: skip
    assert code == 0 and "nothing to retry" in output, output
    code, shown = run_cli("status", "curated", "--check")
    assert code == 0, shown
    # A retry with other select options would finish another chain than the one it found.
    code, output = run_cli("slurm", "select", "--num-tasks", 3, *SMALL_TASKS[:6], "--retry",
                           "--", "scores", "--out", "curated", "-b", 8, "--export")  # fmt: skip
    assert code == 2 and "--retry needs the same select options" in output, output


def test_a_cancelled_import_task_is_retried_and_the_set_matches_one_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq
    from conftest import write_datacomp

    import jestcurate

    # the jobs import the code under test (sbatch passes the environment on)
    here = str(Path(jestcurate.__file__).resolve().parents[1])
    paths = [here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    write_datacomp(tmp_path / "pool", shards=3)
    monkeypatch.chdir(tmp_path)
    args = ["slurm", "import", "pool", "--out", "scores", "--format", "datacomp", "-m",
            "jc-tiny", "--num-tasks", 2, *SMALL_TASKS[:6]]  # fmt: skip
    # Submitted held, so that task 1 is cancelled before it can run, whatever the timing.
    code, output = run_cli(*args, "--sbatch", "hold", "--submit")
    assert code == 0, output
    found = re.search(r"as job\(s\) (\d+)", output)
    assert found, output
    job = found.group(1)
    cancelled = subprocess.run(["scancel", f"{job}_1"], capture_output=True, text=True)
    assert cancelled.returncode == 0, cancelled.stderr
    released = subprocess.run(["scontrol", "release", job], capture_output=True, text=True)
    assert released.returncode == 0, released.stderr
    wait_for([job], limit=600)
    logs = tmp_path / "scores" / "slurm" / "logs"
    assert markers(tmp_path / "scores") == ["00000000", "00000002"], sorted(logs.glob("*"))

    code, output = run_cli(*args, "--retry")
    assert code == 0 and "resubmitted 1 of 2 tasks" in output, output
    retried = re.search(r"as job\(s\) (\d+)", output)
    assert retried, output
    wait_for([retried.group(1)], limit=600)
    assert markers(tmp_path / "scores") == ["00000000", "00000001", "00000002"], "".join(
        p.read_text() for p in logs.glob("*")
    )
    code, output = run_cli(*args, "--retry")
    assert code == 0 and "nothing to retry" in output, output

    # The same parts as one import of the whole source (here, in-process).
    code, output = run_cli("import", "pool", "--out", "single", "--format", "datacomp", "-m",
                           "jc-tiny")  # fmt: skip
    assert code == 0, output
    for name in ("00000000", "00000001", "00000002"):
        part = f"parts/{name}.parquet"
        assert pq.read_table(tmp_path / "scores" / part).equals(
            pq.read_table(tmp_path / "single" / part)
        ), name
