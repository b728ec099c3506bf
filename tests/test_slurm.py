"""`jestcurate slurm score`, `slurm import` and `status`: generated scripts, submission through
a stand-in sbatch, and the scripts' per-task commands run locally with Slurm's variables set.
The stand-in stays for what the test Slurm (tests/test_slurm_real.py: one CPU node) cannot
show: GPU, partition and constraint flags, and the exact sbatch calls of a split array."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from jestcurate.scale.claims import Claims, Owner
from jestcurate.scale.slurm import array_spec, split_tasks


def test_array_spec_and_split() -> None:
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([5, 1, 2, 9, 10, 3], max_concurrent=4) == "1-3,5,9-10%4"
    assert split_tasks(range(5), 2) == [(0, [0, 1]), (2, [0, 1]), (4, [0])]
    assert split_tasks([1, 2, 7], 3) == [(0, [1, 2]), (6, [1])]


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `sbatch` on PATH that records its arguments and answers with a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "4242;cluster"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def slurm_args(corpus: Path, out: Path, *more: str) -> list:
    return ["slurm", "score", corpus, "--out", out, "-m", "jc-tiny", "--workers", "0", *more]


def run_task(script: Path, offset: int, array_id: int) -> subprocess.CompletedProcess:
    # SLURM_ARRAY_TASK_COUNT is per array job (here 2): the script's explicit flags must win.
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": str(array_id),
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_JOB_ID": "4242",
    }
    return subprocess.run(
        ["bash", str(script), str(offset)], env=env, capture_output=True, text=True
    )


def test_generate_submit_run_and_retry(corpus: Path, tmp_path: Path, fake_sbatch: Path) -> None:
    out = tmp_path / "scores"
    options = ["--num-tasks", "3", "--max-array-size", "2", "--partition", "gpu"]
    options += ["--max-concurrent", "2", "--sbatch", "constraint=a100", "--gpus-per-task", "1"]
    code, output = run_cli(*slurm_args(corpus, out, *options, "--submit"))
    assert code == 0, output
    script = out / "slurm" / "score.sbatch"
    assert str(script) in output and "submitted 3 tasks over 3 shards" in output
    text = script.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --requeue",
        "#SBATCH --constraint=a100",
        '--task-index "$task" --num-tasks 3',
    ):
        assert line in text, line
    # Three tasks, arrays capped at 2 indexes: two array jobs of the same script.
    calls = fake_sbatch.read_text().splitlines()
    assert calls == [
        f"--parsable --array=0-1%2 {script} 0",
        f"--parsable --array=0%2 {script} 2",
    ]

    # Run the tasks as Slurm would: array job 2 (offset 2), then task 0 of array job 1.
    for offset, array_id in ((2, 0), (0, 0)):
        done = run_task(script, offset, array_id)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "scored now" in done.stdout
    markers = sorted(p.stem for p in (out / "done").glob("*.json"))
    assert markers == ["00000", "00002"]  # task t of 3 scores shard t

    code, output = run_cli("status", out, corpus, "--json", "--check")
    assert code == 1
    found = json.loads(output)
    assert found["done"] == 2 and [Path(p).name for p in found["pending"]] == ["00001.tar"]

    # --retry resubmits task 1 alone.
    fake_sbatch.write_text("")
    code, output = run_cli(*slurm_args(corpus, out, *options, "--retry"))
    assert code == 0 and "resubmitted 1 of 3 tasks" in output, output
    assert fake_sbatch.read_text().splitlines() == [f"--parsable --array=1%2 {script} 0"]
    assert run_task(script, 0, 1).returncode == 0
    code, output = run_cli(*slurm_args(corpus, out, *options, "--retry"))
    assert code == 0 and "nothing to retry" in output, output
    code, output = run_cli("status", out, corpus, "--check")
    assert code == 0 and "done" in output, output

    # A retry must use the plan it retries.
    code, output = run_cli(*slurm_args(corpus, out, "--batch-size", "7", "--retry"))
    assert code == 2 and "differ from the plan" in output, output


def test_script_without_submit_and_errors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    code, output = run_cli(
        *slurm_args(corpus, out, "--shards-per-task", "2", "--gpus-per-task", "0")
    )
    assert code == 0, output
    text = (out / "slurm" / "score.sbatch").read_text()
    assert "--num-tasks 2" in text and "gpus-per-task" not in text
    assert "--batch-size 64" in text  # the CPU default, written out for --retry to compare
    assert "sbatch --array=0-1" in output
    code, output = run_cli(*slurm_args(tmp_path / "nope.tar", out))
    assert code == 2 and "input not found" in output, output
    code, output = run_cli(*slurm_args(corpus, tmp_path / "fresh", "--retry"))
    assert code == 2 and "nothing to retry" in output, output


def test_status_lists_failed_shards_with_reasons(hostile, tmp_path: Path) -> None:
    shard, _ = hostile
    broken = tmp_path / "broken.tar"
    broken.write_bytes(shard.read_bytes()[:1000])  # cut mid-member
    out = tmp_path / "scores"
    code, _ = run_cli("score", broken, shard, "--out", out, "-m", "jc-tiny", "--workers", "0")
    assert code == 1
    code, output = run_cli("status", out, "--json")
    found = json.loads(output)
    assert found["done"] == 1 and len(found["failed"]) == 1
    assert found["failed"][0]["shard"].endswith("broken.tar") and found["failed"][0]["error"]
    code, output = run_cli("status", out)
    assert code == 0 and "broken.tar" in output


def test_a_requeued_slurm_task_takes_over_its_own_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    before = Owner("node-a", 1234, None, "first-incarnation", "77_3")
    Claims(tmp_path, before, lease=3600).try_claim("00007")
    now = Claims(tmp_path, Owner.this_process(), lease=3600)
    assert now.owner.job == "77_3"
    assert now.try_claim("00007")  # same job id: the earlier incarnation is gone
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    other_task = Claims(tmp_path, Owner.this_process(), lease=3600)
    assert not other_task.try_claim("00007")


def test_slurm_select_array_merge_and_export_jobs(tmp_path: Path, fake_sbatch: Path) -> None:
    from jestcurate.pipelines.synth import write_score_set

    write_score_set(tmp_path / "ref", shards=4, rows_per_shard=300, dim=16, seed=1)
    out = tmp_path / "curated"
    select_args = [tmp_path / "ref", "--out", out, "-b", 32, "--ratio", 0.25]
    code, output = run_cli("slurm", "select", "--num-tasks", 3, "--max-array-size", 2,
                           "--submit", "--", *select_args)  # fmt: skip
    assert code == 0, output
    directory = out / "slurm"
    array, merge = directory / "select.sbatch", directory / "select-merge.sbatch"
    assert not (directory / "select-export.sbatch").exists()  # no --export asked for
    # the array (two jobs of at most 2 indexes) twice, then the merge after round 2
    after = "--dependency=afterok:4242:4242 --kill-on-invalid-dep=yes"
    assert fake_sbatch.read_text().splitlines() == [
        f"--parsable --array=0-1 {array} 0",
        f"--parsable --array=0 {array} 2",
        f"--parsable --array=0-1 {after} {array} 0",
        f"--parsable --array=0 {after} {array} 2",
        f"--parsable {after} {merge}",
    ]
    assert "--merge --num-tasks 3" in merge.read_text()
    for offset, array_id in ((0, 1), (2, 0), (0, 0)) * 2:  # the array, then its second round
        done = run_task(array, offset, array_id)
        assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["num_tasks"] == 3  # the last task merged
    done = subprocess.run(["bash", str(merge)], capture_output=True, text=True)
    assert done.returncode == 0 and "already selected" in done.stdout, done.stdout + done.stderr

    code, output = run_cli("slurm", "select", "--num-tasks", 3, "--", *select_args, "--export")
    assert code == 0 and (directory / "select-export.sbatch").is_file(), output
    text = (directory / "select-export.sbatch").read_text()
    assert "--export" in text and '--task-index "$task" --num-tasks 3' in text
    code, output = run_cli("slurm", "select", "--num-tasks", 3, "--", *select_args, "--bogus")
    assert code == 2 and "select options" in output and "--bogus" in output, output


def test_slurm_select_ledger_array_after_the_merge_and_its_retry(
    tmp_path: Path, fake_sbatch: Path
) -> None:
    """--ledger: the tasks get --spread-ledger, and a ledger array over every task follows the
    merge (its own script, no GPU); --retry resubmits only the tasks with parts left."""
    from jestcurate.pipelines.synth import write_score_set

    write_score_set(tmp_path / "ref", shards=5, rows_per_shard=60, dim=8, seed=3)
    out = tmp_path / "curated"
    select_args = [tmp_path / "ref", "--out", out, "-b", 8, "--ratio", 0.25, "--min-clip-score",
                   0, "--device", "cpu", "--ledger"]  # fmt: skip
    command = ["slurm", "select", "--num-tasks", 3, "--max-array-size", 4, "--submit", "--"]
    code, output = run_cli(*command, *select_args)
    assert code == 0, output
    directory = out / "slurm"
    array, merge = directory / "select.sbatch", directory / "select-merge.sbatch"
    ledger = directory / "select-ledger.sbatch"
    after = "--dependency=afterok:4242 --kill-on-invalid-dep=yes"
    assert fake_sbatch.read_text().splitlines() == [
        f"--parsable --array=0-2 {array} 0",
        f"--parsable --array=0-2 {after} {array} 0",
        f"--parsable {after} {merge}",
        f"--parsable --array=0-2 {after} {ledger} 0",
    ]
    for script in (array, merge, ledger):
        assert "--ledger --spread-ledger" in script.read_text()
    assert "--gpus-per-task" not in ledger.read_text() and "ledger-%A_%a" in ledger.read_text()
    chains = json.loads((directory / "select-jobs.json").read_text())["chains"]
    assert sorted(chains[-1]["arrays"]) == ["ledger", "merge", "round 1", "round 2"]
    for array_id in (0, 1, 2, 0, 1):  # both rounds (task 2 did its second in its first)
        done = run_task(array, 0, array_id)
        assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ledger"] == {"folder": "ledger", "parts": 5, "status": "pending"}
    done = run_task(ledger, 0, 1)  # task 1 writes parts 1 and 4; tasks 0 and 2 are left
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((out / "ledger").glob("*.parquet"))) == 2
    fake_sbatch.write_text("")
    code, output = run_cli(*command[:-2], "--retry", "--", *select_args)
    assert code == 0 and "the ledger of 2 tasks" in output, output
    assert fake_sbatch.read_text().splitlines() == [f"--parsable --array=0,2 {ledger} 0"]
    for array_id in (0, 2):
        done = run_task(ledger, 0, array_id)
        assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "status" not in summary["ledger"] and summary["fates"]
    code, output = run_cli(*command[:-2], "--retry", "--", *select_args)
    assert code == 0 and "nothing to retry" in output, output


def test_the_score_script_runs_from_any_folder(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INPUTS and --pretrained stay relative as typed; the script's --chdir makes them mean the
    same in a job submitted from elsewhere (what sbatch does with the directive, done here by
    hand: bash ignores #SBATCH lines)."""
    import re
    import shutil

    shutil.copytree(corpus, tmp_path / "pool")
    monkeypatch.chdir(tmp_path)
    code, output = run_cli(*slurm_args(Path("pool"), Path("scores"), "--num-tasks", "1"))
    assert code == 0, output
    script = tmp_path / "scores" / "slurm" / "score.sbatch"
    found = re.search(r"^#SBATCH --chdir=(.+)$", script.read_text(), re.MULTILINE)
    assert found and Path(found.group(1)) == tmp_path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    without = subprocess.run(["bash", str(script)], cwd=elsewhere, capture_output=True,
                             text=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})  # fmt: skip
    assert without.returncode == 2 and "input not found: pool" in without.stderr  # why it's there
    monkeypatch.chdir(elsewhere)
    done = subprocess.run(["bash", str(script)], cwd=found.group(1), capture_output=True,
                          text=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.stem for p in (tmp_path / "scores" / "done").glob("*.json")) == [
        "00000", "00001", "00002",
    ]  # fmt: skip


def test_slurm_select_names_its_scripts_even_when_sbatch_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jestcurate.pipelines.synth import write_score_set

    write_score_set(tmp_path / "ref", shards=2, rows_per_shard=50, dim=8)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch anywhere
    out = tmp_path / "curated"
    code, output = run_cli("slurm", "select", "--num-tasks", 2, "--max-array-size", 4,
                           "--submit", "--", tmp_path / "ref", "--out", out, "-b", 8)  # fmt: skip
    assert code == 2 and "sbatch is not on PATH" in output, output
    assert str(out / "slurm" / "select.sbatch") in output  # said before the submission failed


def slurm_import_args(*more: str | Path) -> list:
    """`slurm import` of ./pool into ./scores, the scale given (no model to load in each task)
    and a --pretrained label that is a file here, relative as typed."""
    return ["slurm", "import", "pool", "--out", "scores", "--format", "datacomp", "-m",
            "jc-tiny", "--logit-scale", "100", "--pretrained", "ref.pt", *more]  # fmt: skip


def test_slurm_import_writes_absolute_paths_submits_runs_and_retries(
    tmp_path: Path, fake_sbatch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq
    from conftest import write_datacomp

    write_datacomp(tmp_path / "pool", shards=3)
    (tmp_path / "ref.pt").write_bytes(b"a label that happens to be a file")
    monkeypatch.chdir(tmp_path)
    options = ["--num-tasks", "3", "--max-array-size", "2", "--partition", "cpu"]
    code, output = run_cli(*slurm_import_args(*options, "--submit"))
    assert code == 0, output
    script = tmp_path / "scores" / "slurm" / "import.sbatch"
    assert str(script) in output and "submitted 3 tasks over 3 source files" in output, output
    text = script.read_text()
    for line in (
        "#SBATCH --job-name=jestcurate-import",
        "#SBATCH --partition=cpu",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path / 'scores' / 'slurm' / 'logs'}/import-%A_%a.out",
        f" import {tmp_path / 'pool'} --out {tmp_path / 'scores'} --format datacomp",
        f"--pretrained {tmp_path / 'ref.pt'} ",
        '--task-index "$task" --num-tasks 3',
    ):
        assert line in text, line
    assert "gpus-per-task" not in text  # import needs no GPU
    plan = json.loads((tmp_path / "scores" / "slurm" / "import.json").read_text())
    assert plan["num_tasks"] == 3 and plan["import_args"][0] == str(tmp_path / "pool")
    assert fake_sbatch.read_text().splitlines() == [
        f"--parsable --array=0-1 {script} 0",
        f"--parsable --array=0 {script} 2",
    ]

    # The tasks, run from another folder (the paths are absolute): task 2, then task 0.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for offset, array_id in ((2, 0), (0, 0)):
        done = run_task(script, offset, array_id)
        assert done.returncode == 0, done.stdout + done.stderr
    scores = tmp_path / "scores"
    assert sorted(p.stem for p in (scores / "done").glob("*.json")) == ["00000000", "00000002"]

    # --retry resubmits task 1 alone, then finds nothing left.
    monkeypatch.chdir(tmp_path)
    fake_sbatch.write_text("")
    code, output = run_cli(*slurm_import_args(*options, "--retry"))
    assert code == 0 and "resubmitted 1 of 3 tasks" in output, output
    assert fake_sbatch.read_text().splitlines() == [f"--parsable --array=1 {script} 0"]
    assert run_task(script, 0, 1).returncode == 0
    code, output = run_cli(*slurm_import_args(*options, "--retry"))
    assert code == 0 and "nothing to retry" in output, output
    assert fake_sbatch.read_text().splitlines() == [f"--parsable --array=1 {script} 0"]

    # A retry must use the plan it retries: other import options or --num-tasks are refused.
    for changed in (["--embeddings", "b32"], ["--num-tasks", "2"]):
        code, output = run_cli(*slurm_import_args(*options, *changed, "--retry"))
        assert code == 2 and "differ from the plan" in output, (changed, output)
        assert output.count("\n") == 1, output

    # The set is the one a single import makes.
    code, output = run_cli("import", "pool", "--out", "single", "--format", "datacomp", "-m",
                           "jc-tiny", "--logit-scale", "100")  # fmt: skip
    assert code == 0, output
    names = sorted(p.name for p in (tmp_path / "single" / "parts").glob("*.parquet"))
    assert names == sorted(p.name for p in (scores / "parts").glob("*.parquet")) and names
    for name in names:
        single = pq.read_table(tmp_path / "single" / "parts" / name)
        assert pq.read_table(scores / "parts" / name).equals(single), name


def test_slurm_import_script_without_submit_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import write_datacomp

    from jestcurate.pipelines.synth import CorpusSpec, write_corpus

    write_datacomp(tmp_path / "pool", shards=3)
    write_corpus(tmp_path / "tars", CorpusSpec(shards=2, samples_per_shard=4, image_size=16))
    monkeypatch.chdir(tmp_path)
    # more tasks than tars: one task per tar; the glob is written absolute, as typed
    code, output = run_cli(*slurm_import_args("--num-tasks", "5", "--shards", "tars/*.tar"))
    assert code == 0, output
    assert "2 tasks over 2 shards" in output and "sbatch --array=0-1" in output, output
    text = (tmp_path / "scores" / "slurm" / "import.sbatch").read_text()
    assert f"--shards '{tmp_path / 'tars'}/*.tar'" in text and "--num-tasks 2" in text, text
    # what cannot work is one line now, not a failure in every task
    cases = [
        (["--num-tasks", "2", "--shards", "nope/*.tar"], "input not found"),
        (["--num-tasks", "2", "--loss", "hinge"], "unknown --loss 'hinge'"),
        (["--num-tasks", "0"], "--num-tasks must be at least 1"),
    ]
    for args, message in cases:
        code, output = run_cli(*slurm_import_args(*args))
        assert code == 2 and message in output and output.count("\n") == 1, (args, output)
    code, output = run_cli(*slurm_import_args("--num-tasks", "2", "--out", "fresh", "--retry"))
    assert code == 2 and "nothing to retry" in output, output
