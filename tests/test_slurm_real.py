"""`slurm score`, `slurm select` and `slurm import` on a real single-node Slurm (started by
`.ci/services/slurm.sh start`, which .ci/run runs): submitted end to end over more tasks than
MaxArraySize (3 there), a script submitted by hand from another folder, a select chain that
ends when one of its tasks is cancelled, and an import whose cancelled task --retry completes.
Skipped, with the reason, where no Slurm answers."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import CorpusSpec, write_corpus


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
    """Skip, saying why, where no Slurm answers; fail instead where .ci/run started one
    (JESTCURATE_REQUIRE_SLURM=1), so that these tests cannot quietly stop running in CI."""
    if _slurm_answers():
        return
    reason = "no Slurm answers here (.ci/services/slurm.sh start)"
    if os.environ.get("JESTCURATE_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason}, though .ci/run started one", pytrace=False)
    pytest.skip(reason)


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


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    spec = CorpusSpec(shards=4, samples_per_shard=8, seed=5, image_size=32)
    write_corpus(tmp_path / "pool", spec)
    return tmp_path / "pool"


def markers(scores: Path) -> list[str]:
    return sorted(p.stem for p in (scores / "done").glob("*.json"))


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
