"""select --export, the trainer-side loader, and open_clip_train reading the export."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from PIL import Image

from jestcurate.errors import JCError
from jestcurate.model.openclip import BUILTIN_CONFIG_DIR
from jestcurate.pipelines.export import export
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus
from jestcurate.trainer.loader import SelectionBatches


@pytest.fixture(scope="module")
def selection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real pipeline: corpus -> score -> select (jest, b=12) -> export (2 batches/shard)."""
    root = tmp_path_factory.mktemp("exported")
    spec = CorpusSpec(
        shards=3, samples_per_shard=160, seed=11, image_size=32, noise=PRESETS["noisy"]
    )
    write_corpus(root / "pool", spec)
    code, output = run_cli("score", root / "pool", "-m", "jc-tiny", "--out", root / "scores")
    assert code == 0, output
    code, output = run_cli(
        "select", root / "scores", "--out", root / "sel", "-b", 12, "--ratio", 0.25,
        "--export", "--samples-per-shard", 24,
    )  # fmt: skip
    assert code == 0, output
    assert "exported 120 samples to 5 shards" in output, output
    return root / "sel"


def tar_samples(path: Path) -> list[dict[str, bytes]]:
    samples: list[dict[str, bytes]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(m).read()
    return samples


def source_sample(shard: str, index: int) -> dict[str, bytes]:
    return tar_samples(Path(shard))[index]


def test_export_round_trip(selection: Path) -> None:
    manifest = pq.read_table(selection / "manifest.parquet").to_pylist()
    listed = (selection / "shards.txt").read_text().split()
    assert [Path(p).name for p in listed] == [f"{k:05d}.tar" for k in range(5)]
    exported = [s for p in listed for s in tar_samples(Path(p))]
    assert len(exported) == len(manifest) == 120
    for p, (row, sample) in enumerate(zip(manifest, exported, strict=True)):
        original = source_sample(row["shard"], row["index"])
        assert sample["__key__"] == f"{p:010d}"
        assert sample["jpg"] == original["jpg"] and sample["txt"] == original["txt"]
        meta = json.loads(sample["json"])
        assert meta["uid"] == json.loads(original["json"])["uid"]  # original fields kept
        assert meta["key"] == sample["__key__"]  # as img2dataset keeps them
        extra = meta["jestcurate"]
        assert (extra["step"], extra["position"]) == (row["step"], row["position"])
        assert extra["source_key"] == row["key"] and extra["source_shard"] == row["shard"]
        assert extra["clip_score"] == pytest.approx(row["clip_score"])
    info = json.loads((selection / "shards" / "export.json").read_text())
    assert info["samples_per_shard"] == 24 and info["shards"] == 5


def test_array_tasks_export_their_shares_of_the_merged_selection(
    selection: Path, tmp_path: Path
) -> None:
    scores = selection.parent / "scores"
    out = tmp_path / "tasks"
    base = ["select", scores, "--out", out, "-b", 12, "--ratio", 0.25, "--export",
            "--samples-per-shard", 24, "--num-tasks", 2]  # fmt: skip
    code, output = run_cli(*base, "--task-index", 0)  # round 1: scatter only
    assert code == 0 and "second round" in output, output
    code, output = run_cli(*base, "--task-index", 1)  # scatters, selects; task 0 has not yet
    assert code == 0 and "the export waits for the merge" in output, output
    assert not (out / "shards").exists()
    code, output = run_cli(*base, "--task-index", 0)  # selects last: merges, exports its share
    assert code == 0 and "exported 3 of 5 shards (this task's share)" in output, output
    written = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert written == ["00000.tar", "00002.tar", "00004.tar"]
    assert not (out / "shards.txt").exists()  # not until every share is written
    code, output = run_cli(*base, "--task-index", 1)
    assert code == 0 and "exported 108 samples to 5 shards" in output, output
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    listed = (out / "shards.txt").read_text().split()
    exported = [s for p in listed for s in tar_samples(Path(p))]
    assert len(exported) == len(manifest)
    for row, sample in zip(manifest, exported, strict=True):
        assert sample["jpg"] == source_sample(row["shard"], row["index"])["jpg"]
        assert json.loads(sample["json"])["jestcurate"]["step"] == row["step"]
    assert not list((out / "shards").glob(".spill*"))


def test_export_resumes_and_refuses_other_shard_sizes(selection: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "sel"
    shutil.copytree(selection, copy)
    kept = copy / "shards" / "00001.tar"
    mtime = kept.stat().st_mtime_ns
    (copy / "shards" / "00003.tar").unlink()  # as if killed before this shard was renamed
    code, output = run_cli("status", copy, "--json", "--check")
    assert code == 1 and json.loads(output)["missing"] == ["00003.tar"], output
    export(copy, 24)
    assert run_cli("status", copy, "--check")[0] == 0
    assert kept.stat().st_mtime_ns == mtime  # finished shards are not rewritten
    assert (copy / "shards" / "00003.tar").read_bytes() == (
        selection / "shards" / "00003.tar"
    ).read_bytes()
    assert not (copy / "shards" / ".spill").exists()
    from jestcurate.errors import JCError

    with pytest.raises(JCError, match="use the same --samples-per-shard"):
        export(copy, 36)


@pytest.mark.parametrize("source", ["export", "original"])
def test_loader_keeps_batches_whole_across_ranks_and_workers(selection: Path, source: str) -> None:
    manifest = pq.read_table(selection / "manifest.parquet").to_pylist()
    per_step: dict[int, list[tuple[str, int]]] = {}
    for r in manifest:
        per_step.setdefault(r["step"], []).append((r["shard"], r["index"]))

    def ident(samples):
        return [(s["__key__"], s["txt"]) for s in samples]

    seen: dict[int, list] = {}
    for rank in range(3):
        ds = SelectionBatches(selection, source=source, rank=rank, world_size=3, transform=ident)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        items = list(loader)
        assert len(items) == len(per_step) == len(ds)
        for step, item in enumerate(items):  # step order holds through the workers
            assert len(item) == 4
            seen.setdefault(step, []).extend(item)
    for step, rows in per_step.items():
        want = [source_sample(shard, index)["txt"] for shard, index in rows]
        assert [txt for _, txt in seen[step]] == want


def test_loader_errors(selection: Path, tmp_path: Path) -> None:
    from jestcurate.errors import JCError

    with pytest.raises(JCError, match="does not split over 5 ranks"):
        SelectionBatches(selection, rank=0, world_size=5)
    with pytest.raises(JCError, match="not a finished selection"):
        SelectionBatches(tmp_path)


def test_readme_training_loop_runs(selection: Path) -> None:
    """The README's loop, on the tiny model: the loader's batches drive a real open_clip step."""
    import open_clip

    open_clip.add_model_config(BUILTIN_CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms("jc-tiny")
    tokenizer = open_clip.get_tokenizer("jc-tiny")
    loss_fn = open_clip.ClipLoss()

    def collate(samples):
        images = [preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
        texts = tokenizer([s["txt"].decode("utf-8") for s in samples])
        return torch.stack(images), texts

    batches = SelectionBatches(selection, transform=collate)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for images, texts in loader:
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert images.shape == (12, 3, 64, 64)
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))


@pytest.fixture(scope="session")
def webdataset_0_2_86(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """open_clip_train needs webdataset <= 0.2.86 (newer ones break its tar grouping)."""
    target = tmp_path_factory.mktemp("wds-0.2.86")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    result = subprocess.run([*cmd, "webdataset==0.2.86"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot install webdataset 0.2.86 (offline?): {result.stderr[-300:]}")
    return target


@pytest.mark.slow
def test_open_clip_train_reads_the_export(
    selection: Path, webdataset_0_2_86: Path, tmp_path: Path
) -> None:
    """open_clip's own trainer trains on the exported shards unchanged (as a filter: it
    shuffles shards and samples, so JEST's batch composition is not kept)."""
    pattern = json.loads((selection / "shards" / "export.json").read_text())["pattern"]
    script = (
        "import sys, open_clip; "
        f"open_clip.add_model_config({str(BUILTIN_CONFIG_DIR)!r}); "
        "from open_clip_train.main import main; main(sys.argv[1:])"
    )
    args = [
        "--train-data", pattern, "--train-num-samples", "120", "--dataset-type", "webdataset",
        "--model", "jc-tiny", "--batch-size", "12", "--epochs", "1", "--workers", "1",
        "--precision", "fp32", "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
        "--logs", str(tmp_path / "logs"), "--name", "smoke", "--save-frequency", "1",
        "--report-to", "",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(webdataset_0_2_86), "CUDA_VISIBLE_DEVICES": ""}
    import os

    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Train Epoch: 0" in log, log[-3000:]
    checkpoint = tmp_path / "logs" / "smoke" / "checkpoints" / "epoch_1.pt"
    assert checkpoint.is_file(), log[-3000:]
    # The trainer's checkpoint scores through `score --pretrained`, closing the loop.
    code, output = run_cli(
        "score", selection / "shards", "-m", "jc-tiny", "--pretrained", checkpoint,
        "--out", tmp_path / "rescored",
    )  # fmt: skip
    assert code == 0, output


def test_an_export_begun_by_an_older_version_is_not_finished_in_the_new_format(
    selection: Path, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(selection, old)
    meta_path = old / "shards" / "export.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 2
    del meta["format"]  # as an export begun before the json key was the exported key
    meta_path.write_text(json.dumps(meta))
    (old / "shards" / "00004.tar").unlink()
    with pytest.raises(JCError, match="begun by an older jestcurate"):
        export(old, 24)


def test_a_failed_export_leaves_the_selection_on_screen(selection: Path, tmp_path: Path) -> None:
    import shutil

    pool = tmp_path / "pool"
    scores = tmp_path / "scores"
    shutil.copytree(selection.parent / "pool", pool)
    code, output = run_cli("score", pool, "-m", "jc-tiny", "--out", scores)
    assert code == 0, output
    shutil.rmtree(pool)  # the source shards are gone: the export cannot read them
    code, output = run_cli("select", scores, "--out", tmp_path / "sel", "-b", 12, "--ratio",
                           0.25, "--export")  # fmt: skip
    assert code == 2 and "error:" in output, output
    assert f"selection: {tmp_path / 'sel'}" in output  # the summary, printed before the export
    assert output.index("selection:") < output.index("error:")
