"""The open_clip_train launcher: open_clip's own trainer, under torchrun, trains on a selection's
batches in manifest step order, and resumes at the step after its checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus
from jestcurate.trainer.openclip.launcher import main

B = 16  # the selections' batch size: 2 ranks × --batch-size 8


@pytest.fixture(scope="module")
def selections(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two selections of one scored pool (seeds 0 and 1, 5 steps of 16 each): the first
    exported, the second read from the source tars."""
    root = tmp_path_factory.mktemp("octrain")
    spec = CorpusSpec(
        shards=2, samples_per_shard=160, seed=5, image_size=32, noise=PRESETS["noisy"]
    )
    write_corpus(root / "pool", spec)
    code, output = run_cli("score", root / "pool", "-m", "jc-tiny", "--out", root / "scores")
    assert code == 0, output
    for name, extra in (("sel", ["--export", "--samples-per-shard", 32]), ("sel2", ["--seed", 1])):
        code, output = run_cli(
            "select", root / "scores", "--out", root / name, "-b", B, "--ratio", 0.25, *extra
        )
        assert code == 0, output
    return root / "sel", root / "sel2"


@pytest.fixture(scope="module")
def scores(selections: tuple[Path, Path]) -> Path:
    return selections[0].parent / "scores"


def manifest_steps(*selections: Path) -> list[list[str]]:
    """The manifests' keys, step by step, the selections one after another."""
    steps: list[list[str]] = []
    for sel in selections:
        rows = pq.read_table(sel / "manifest.parquet", columns=["step", "key"]).to_pylist()
        first = len(steps)
        for row in rows:
            if row["step"] + first == len(steps):
                steps.append([])
            steps[first + row["step"]].append(row["key"])
    return steps


def recorded(folder: Path) -> dict[int, list[dict]]:
    """rank -> its record lines, in order."""
    return {
        int(path.stem.split("-")[1]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("rank-*.jsonl"))
    }


def trainer_args(logs: Path, *extra: object) -> list[str]:
    args = [
        "--model", "jc-tiny", "--batch-size", 8, "--workers", 1, "--precision", "fp32",
        "--lr", "1e-3", "--warmup", 1, "--logs", logs, "--name", "run", "--report-to", "",
        "--log-every-n-steps", 1, "--seed", 0, *extra,
    ]  # fmt: skip
    return [str(a) for a in args]


def torchrun(script: list[str], args: list[str], env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--standalone", *script, "--", *args]  # standalone: a free port of its own
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


# Kills rank 0 (SIGKILL) as its optimizer is about to take update number JC_DIE_AT, after the
# launcher recorded the ones before: a crash mid-epoch, after the previous epoch's checkpoint.
KILLER = """
import os, signal
from torch.optim.optimizer import register_optimizer_step_pre_hook
taken = 0
def die(optimizer, args, kwargs):
    global taken
    taken += 1
    if taken == int(os.environ["JC_DIE_AT"]) and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_pre_hook(die)
from jestcurate.trainer.openclip.launcher import main
main()
"""


@pytest.mark.slow
def test_two_ranks_train_the_manifest_steps_in_order_and_resume_at_the_next_step(
    selections: tuple[Path, Path], tmp_path: Path
) -> None:
    sel, sel2 = selections
    expected = manifest_steps(sel, sel2)
    assert len(expected) == 10 and all(len(keys) == B for keys in expected)
    # 3 epochs of 3 steps (48 samples), across both selections; checkpoints after each epoch.
    ours = ["--selection", str(sel), str(sel2), "--record-steps"]
    # Two DataLoader workers per rank, whose items must come back in step order.
    theirs = trainer_args(
        tmp_path / "logs", "--epochs", 3, "--train-num-samples", 48, "--workers", 2
    )
    theirs += ["--resume", "latest"]  # the same command starts, and continues, the run
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    first = torchrun(
        [str(killer)], [*ours, str(tmp_path / "rec1"), *theirs], env={"JC_DIE_AT": "5"}
    )
    assert first.returncode != 0, first.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "logs" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_1.pt"], (checkpoints, first.stderr[-3000:])
    killed = recorded(tmp_path / "rec1")
    assert [line["step"] for line in killed[0]] == [0, 1, 2, 3], first.stderr[-3000:]

    second = torchrun(["-m", "jestcurate.openclip_train"], [*ours, str(tmp_path / "rec2"), *theirs])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "9 steps of 16 from 2 selection(s), as 3 epoch(s) of 3 steps" in second.stderr
    assert "(read by position from 2 source tars)" in second.stderr  # sel2 has no export
    resumed = recorded(tmp_path / "rec2")
    # It continues at the step after the checkpoint (epoch 1 = steps 3..5), not at step 0.
    for rank in (0, 1):
        assert [line["step"] for line in resumed[rank]] == list(range(3, 9))
        assert not any("updated" in line for line in resumed[rank])
    # Every optimizer step trained exactly the manifest's batch: rank 0's slice, then rank 1's.
    for lines in (killed, resumed):
        for a, b in zip(lines[0], lines[1], strict=False):
            assert a["step"] == b["step"]
            assert a["keys"] + b["keys"] == expected[a["step"]], a["step"]
    # Step 3, trained before the kill and again after the resume, had the same keys.
    assert killed[0][3]["keys"] == resumed[0][0]["keys"]
    # Steps 5.. come from the second selection, read from its source tars.
    assert resumed[0][-1]["keys"] + resumed[1][-1]["keys"] == expected[8]
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_3.pt").is_file()
    # open_clip's schedule spans the 9 trained steps, and the resumed run takes it up at step 3:
    # rank 0 logged the learning rate of every step (0-3 before the kill, 3-8 after).
    logged = [float(m) for m in re.findall(r"LR: ([0-9.]+)", log_text(tmp_path / "logs"))]
    schedule = cosine_schedule(lr=1e-3, warmup=1, steps=9)
    assert logged == pytest.approx(schedule[:4] + schedule[3:], abs=1e-6), logged


def log_text(logs: Path) -> str:
    return (logs / "run" / "out.log").read_text()


def cosine_schedule(lr: float, warmup: int, steps: int) -> list[float]:
    """The learning rate open_clip_train's cosine schedule sets at each step."""
    import torch
    from open_clip_train.scheduler import cosine_lr

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = cosine_lr(optimizer, lr, warmup, steps)
    return [schedule(step) for step in range(steps)]


def refusal(capsys: pytest.CaptureFixture[str], argv: list[object]) -> str:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def imported_selection(root: Path) -> Path:
    """A selection of a score set imported from embeddings: its rows have no images."""
    source = root / "embeddings"
    for sub in ("img_emb", "text_emb", "metadata"):
        (source / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(200, 64)).astype(np.float16)
    np.save(source / "img_emb" / "img_emb_0.npy", img)
    np.save(source / "text_emb" / "text_emb_0.npy", img + rng.normal(size=img.shape) / 2)
    captions = pa.table({"caption": [f"c {i}" for i in range(200)]})
    pq.write_table(captions, source / "metadata" / "metadata_0.parquet")
    code, output = run_cli(
        "import", source, "--format", "clip-retrieval", "--out", root / "s", "-m", "jc-tiny"
    )
    assert code == 0, output
    code, output = run_cli("select", root / "s", "--out", root / "sel", "-b", B)
    assert code == 0, output
    return root / "sel"


def test_numbers_that_cannot_keep_the_batches_are_refused_before_training(
    selections: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sel, _ = selections
    logs = tmp_path / "logs"

    def refused(selection: Path, *extra: object) -> str:
        return refusal(capsys, ["--selection", str(selection), *trainer_args(logs, *extra)])

    # One process: --batch-size 8 × 1 rank is half of b.
    assert "--batch-size 8 × 1 rank(s) = 8 examples per step, but the selection's batches " \
        "hold 16: pass --batch-size 16" in refused(sel)  # fmt: skip
    assert "imported from embeddings" in refused(imported_selection(tmp_path), "--batch-size", B)
    assert "selection not found" in refused(tmp_path / "nowhere", "--batch-size", B)
    assert "open_clip_train would read these shuffled" in refused(
        sel, "--batch-size", B, "--train-data", "pool/{00000..00001}.tar", "--dataset-resampled"
    )
    assert "--epochs 6 is more than the 5 steps the selection holds" in refused(
        sel, "--batch-size", B, "--epochs", 6
    )
    assert "--epochs 3 × 2 steps = 6 steps, but the selection holds 5" in refused(
        sel, "--batch-size", B, "--epochs", 3, "--train-num-samples", 32
    )
    assert "--train-num-samples 40 is not a whole number of batches of 16: pass 32 or 48" in (
        refused(sel, "--batch-size", B, "--train-num-samples", 40)
    )
    assert "--accum-freq 2" in refused(sel, "--batch-size", B, "--accum-freq", 2)
    # Source tars that cannot be read by position, and no export to read instead.
    import gzip

    (tmp_path / "gz").mkdir()
    for tar in sorted((sel.parent / "pool").glob("*.tar")):
        (tmp_path / "gz" / f"{tar.name}.gz").write_bytes(gzip.compress(tar.read_bytes()))
    for command in (
        ["score", tmp_path / "gz", "-m", "jc-tiny", "--out", tmp_path / "gz-scores"],
        ["select", tmp_path / "gz-scores", "--out", tmp_path / "gz-sel", "-b", B],
    ):
        code, output = run_cli(*command)
        assert code == 0, output
    assert "cannot be read by position" in refused(tmp_path / "gz-sel", "--batch-size", B)
    online = ["--online", str(sel.parent / "scores"), *trainer_args(logs, "--batch-size", B)]
    assert "drop --accum-freq" in refusal(capsys, [*online, "--accum-freq", 2])
    assert "more than the 4 steps the reference's super-batches hold" in refusal(
        capsys, [*online, "--online-ratio", "0.2", "--epochs", 5]
    )
    assert "is a SigLIP model (its config sets a logit bias): pass --siglip" in refused(
        sel, "--batch-size", B, "--model", "jc-tiny-sigmoid"
    )
    assert "--online-ratio and --online-seed go with --online" in refused(
        sel, "--batch-size", B, "--online-ratio", "0.5"
    )
    unnamed = [a for a in trainer_args(logs, "--batch-size", B, "--epochs", 1) if a != "run"]
    unnamed.remove("--name")
    assert "--resume latest needs --name" in refusal(
        capsys, ["--selection", sel, *unnamed, "--resume", "latest"]
    )
    assert not logs.exists()  # nothing started: no log folder, no checkpoint


def test_a_run_folder_is_not_resumed_with_another_plan(
    selections: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Which samples step s trains depends on b, the steps per epoch and the selections: a
    resume that changed one of them would continue on other steps than the checkpoint's."""
    sel, sel2 = selections
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = ["--selection", str(sel), *trainer_args(tmp_path / "logs", "--batch-size", B)]
    args += ["--epochs", "2", "--train-num-samples", "32", "--resume", "latest"]
    cmd = [sys.executable, "-m", "jestcurate.openclip_train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "logs" / "run" / "jestcurate-plan.json").is_file()
    for changed in (
        ["--train-num-samples", "48", "--epochs", "1"],  # 3 steps per epoch instead of 2
        ["--selection", str(sel), str(sel2)],  # steps from other selections
    ):
        line = refusal(capsys, [*args, *changed])
        assert "was begun with another plan" in line and "a new --name" in line, changed
    # The same plan resumes (here: finds the run finished, and trains nothing more).
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_open_clip_train_that_builds_its_data_another_way_is_refused(
    selections: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a release of open_clip_train stopped building through get_dataset_fn, the launcher's
    builder would never be asked and open_clip would read (and shuffle) data of its own."""
    import open_clip_train.data
    import open_clip_train.main

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):  # builds no data through us
        return {}

    monkeypatch.setattr(open_clip_train.data, "get_data", get_data)
    monkeypatch.setattr(open_clip_train.main, "get_data", get_data)
    argv = ["--selection", str(selections[0]), *trainer_args(tmp_path / "logs")]
    assert "builds its training data another way" in refusal(capsys, argv)
    assert not (tmp_path / "logs").exists()


def test_a_refusal_under_torchrun_is_one_line_from_rank_zero(
    selections: tuple[Path, Path], tmp_path: Path
) -> None:
    sel, _ = selections
    args = ["--selection", str(sel), *trainer_args(tmp_path / "logs", "--batch-size", 4)]
    result = torchrun(["-m", "jestcurate.openclip_train"], args)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(ours) == 1 and "--batch-size 4 × 2 rank(s) = 8" in ours[0], result.stderr
    # torchrun reports the failed ranks with a traceback of its own; none runs through ours.
    assert "jestcurate/trainer" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_accumulated_micro_batches_make_up_one_manifest_step(
    selections: tuple[Path, Path], tmp_path: Path
) -> None:
    """--accum-freq 2 on one process: two micro-batches of 8 per optimizer step, which together
    are the manifest's batch (open_clip concatenates their features before the loss)."""
    sel, _ = selections
    args = ["--selection", str(sel), "--record-steps", str(tmp_path / "rec")]
    args += trainer_args(tmp_path / "logs", "--accum-freq", 2, "--epochs", 1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jestcurate.openclip_train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = recorded(tmp_path / "rec")[0]
    assert [line["keys"] for line in lines] == manifest_steps(sel)


@pytest.mark.slow
def test_online_jest_picks_each_step_from_its_super_batch_across_two_ranks(
    scores: Path, tmp_path: Path
) -> None:
    """--online: the model being trained scores each super-batch (each rank its share, the
    embeddings gathered) and both ranks train disjoint halves of one joint pick from it."""
    from jestcurate.trainer.online import SuperBatches

    args = ["--online", str(scores), "--online-ratio", "0.25", "--record-steps"]
    args += [str(tmp_path / "rec"), *trainer_args(tmp_path / "logs", "--epochs", 1)]
    result = torchrun(["-m", "jestcurate.openclip_train"], args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 steps of 16 chosen online from" in result.stderr
    candidates = SuperBatches(scores, B, 0.25, seed=0, rank=0, world_size=1)
    lines = recorded(tmp_path / "rec")
    assert [line["step"] for line in lines[0]] == [line["step"] for line in lines[1]] == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip
    for a, b in zip(lines[0], lines[1], strict=True):
        picked = a["keys"] + b["keys"]
        offered = candidates.super_batch_at(a["step"]).keys
        assert len(set(picked)) == B and set(picked) <= set(offered), a["step"]
        # a choice, not the first b candidates in the order they came
        assert set(picked) != set(offered[:B])
