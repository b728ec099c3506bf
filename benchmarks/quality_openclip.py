"""quality.py's open_clip_train arm: selections on disk, trained by the project's launcher.

`python -m jestcurate.openclip_train` runs open_clip_train's own main on the selections' batches,
one manifest step per optimizer step; it checkpoints after every epoch (an epoch here is
quality.py's evaluation interval), and each checkpoint is evaluated like the in-memory learners.
What differs from quality.py's Trainer is open_clip_train's data path: images decoded from the
exported tars with open_clip's training transform (which augments), where the in-memory arms use
pre-decoded, eval-preprocessed images.

open_clip_train takes AdamW's betas and eps from the model's name ((0.9, 0.98), 1e-6 only for
names containing "vit"); jc-tiny would get (0.9, 0.999), 1e-8, so they are passed as the
project's Trainer sets them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

import jestcurate
from jestcurate.errors import JCError
from jestcurate.model.openclip import _open_clip
from jestcurate.pipelines import select as select_mod

BETAS = (0.9, 0.98)  # jestcurate.pipelines.train.trainer's AdamW
EPS = 1e-6
RUN = "run"  # open_clip_train's --name


def manifest_batches(selection: Path) -> list[list[tuple[str, str]]]:
    """A selection's batches in step order, each its (shard, key) pairs in position order."""
    table = pq.read_table(
        selection / "manifest.parquet", columns=["step", "position", "shard", "key"]
    )
    batches: list[list[tuple[str, str]]] = []
    columns = (table[c].to_pylist() for c in table.column_names)
    for step, position, shard, key in zip(*columns, strict=True):
        if position == 0:
            batches.append([])
        assert step == len(batches) - 1 and position == len(batches[-1]), (selection, step)
        batches[-1].append((shard, key))
    return batches


def write_selection(cfg: Any) -> None:
    """select's own run (and export): a finished selection with the same inputs is reused, one
    made from other inputs (an earlier corpus in the same work folder) replaced."""
    try:
        select_mod.run(cfg)
    except JCError:
        select_mod.run(replace(cfg, overwrite=True))


def check_selection(
    selection: Path, stream: Sequence[np.ndarray], index: dict[tuple[str, str], int]
) -> int:
    """Assert that the selection's batches are the first of `stream` (arrays of pool rows;
    `index` maps (shard, key) to a row), in order; returns how many it holds."""
    batches = manifest_batches(selection)
    assert len(batches) <= len(stream), (selection, len(batches), len(stream))
    for step, (pairs, rows) in enumerate(zip(batches, stream, strict=False)):
        found = np.array([index[pair] for pair in pairs])
        assert np.array_equal(found, rows), f"{selection}: step {step} differs from the stream"
    return len(batches)


def launcher_args(
    selections: Sequence[Path], folder: Path, setup: Any, seed: int, hyper: dict[str, Any]
) -> list[str]:
    """The launcher's command line: setup.steps steps of setup.batch, an epoch (and checkpoint)
    every setup.eval_every steps, the optimizer and schedule as `hyper` (lr, weight decay,
    warm-up) and quality.py's Trainer have them; --siglip for the sigmoid loss."""
    if setup.steps % setup.eval_every:
        raise ValueError(f"steps {setup.steps} is not a multiple of eval_every")
    args = [
        "--selection", *selections, "--record-steps", folder / "steps",
        "--model", setup.model, "--batch-size", setup.batch,
        "--epochs", setup.steps // setup.eval_every,
        "--train-num-samples", setup.eval_every * setup.batch,
        "--lr", setup.lr, "--wd", hyper["weight_decay"], "--warmup", hyper["warmup"],
        "--beta1", BETAS[0], "--beta2", BETAS[1], "--eps", EPS,
        "--precision", "fp32", "--workers", 1, "--seed", seed,
        "--logs", folder / "logs", "--name", RUN, "--report-to", "", "--save-frequency", 1,
    ]  # fmt: skip
    if hyper["sigmoid"]:
        args.append("--siglip")
    return [str(a) for a in args]


def train(selections: Sequence[Path], folder: Path, setup: Any, seed: int, hyper: dict) -> None:
    """Run the launcher in a subprocess (one CPU process, no CUDA, one thread), its output in
    FOLDER/launcher.log; then check that step s trained the keys of the selections' step s."""
    for old in ("logs", "steps"):  # open_clip_train refuses a --name it has already run
        shutil.rmtree(folder / old, ignore_errors=True)
    root = str(Path(jestcurate.__file__).resolve().parents[1])  # this checkout's jestcurate
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "jestcurate.openclip_train"]
    cmd += launcher_args(selections, folder, setup, seed, hyper)
    log = folder / "launcher.log"
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the launcher exited with {code} ({log}):\n{tail}")
    recorded = [json.loads(line) for line in (folder / "steps" / "rank-000.jsonl").open()]
    expected = [b for s in selections for b in manifest_batches(s)][: setup.steps]
    assert [r["step"] for r in recorded] == list(range(setup.steps)), log
    for r in recorded:
        assert r["keys"] == [key for _, key in expected[r["step"]]], (log, r["step"])


def initial_model(name: str, seed: int, sigmoid: bool) -> torch.nn.Module:
    """open_clip_train's model before its first step, built as its main builds it:
    random_seed(args.seed, 0), then create_model_and_transforms (with --siglip's logit
    scale and bias)."""
    from open_clip_train.main import random_seed

    open_clip = _open_clip()  # the project's configs (jc-tiny, ...), as the launcher registers
    random_seed(seed, 0)
    kwargs = {"init_logit_scale": np.log(10), "init_logit_bias": -10} if sigmoid else {}
    model, _, _ = open_clip.create_model_and_transforms(
        name, None, precision="fp32", device="cpu", output_dict=True, **kwargs
    )
    return model


def curve(
    folder: Path, setup: Any, seed: int, sigmoid: bool, evaluate: Callable[[Any], float]
) -> list[float]:
    """`evaluate` on the initial model and on each epoch's checkpoint, which are then removed
    (a tiny model's checkpoint with its optimizer state is tens of MB)."""
    net = initial_model(setup.model, seed, sigmoid)
    accuracy = [evaluate(net)]
    checkpoints = folder / "logs" / RUN / "checkpoints"
    for epoch in range(1, setup.steps // setup.eval_every + 1):
        saved = torch.load(checkpoints / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True)
        assert saved["epoch"] == epoch
        net.load_state_dict(saved["state_dict"])
        accuracy.append(evaluate(net))
    shutil.rmtree(checkpoints)
    return accuracy
