"""`jestcurate train`: real contrastive training on generated shards, checkpoints, resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from jestcurate.errors import JCError
from jestcurate.model.openclip import BUILTIN_CONFIG_DIR
from jestcurate.pipelines import train as train_mod
from jestcurate.pipelines.synth import CorpusSpec, write_corpus


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guide")
    write_corpus(out, CorpusSpec(shards=2, samples_per_shard=160, seed=5, image_size=64))
    return out


def config(guide: Path, out: Path, **kw) -> train_mod.TrainConfig:
    kw.setdefault("steps", 30)
    kw.setdefault("batch_size", 32)
    kw.setdefault("model", "jc-tiny")
    kw.setdefault("workers", 0)
    return train_mod.TrainConfig(inputs=(str(guide),), out=out, **kw)


@pytest.mark.parametrize("model", ["jc-tiny", "jc-tiny-sigmoid"])
def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(
    guide: Path, tmp_path: Path, model: str
) -> None:
    import open_clip

    losses: list[float] = []
    report = train_mod.run(
        config(guide, tmp_path / "ref.pt", model=model, lr=2e-3),
        lambda step, total, loss: losses.append(loss),
    )
    assert report.steps == len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    info = json.loads((tmp_path / "ref.pt.json").read_text())
    assert info["model"] == model and info["steps"] == 30 and info["samples"] == 30 * 32
    assert info["loss"] == ("sigmoid" if "sigmoid" in model else "softmax")
    assert info["final_loss"] == pytest.approx(losses[-1])
    assert not (tmp_path / "ref.pt.resume.pt").exists()

    # open_clip loads it as it is, and so does score --pretrained.
    open_clip.add_model_config(BUILTIN_CONFIG_DIR)
    loaded, _, _ = open_clip.create_model_and_transforms(model, pretrained=str(tmp_path / "ref.pt"))
    saved = torch.load(tmp_path / "ref.pt", weights_only=True)["state_dict"]
    assert torch.equal(loaded.state_dict()["logit_scale"], saved["logit_scale"])
    code, output = run_cli(
        "score", guide / "00000.tar", "-m", model, "--pretrained", tmp_path / "ref.pt",
        "--out", tmp_path / "scores",
    )  # fmt: skip
    assert code == 0, output


def test_a_trained_reference_scores_matching_captions_higher(guide: Path, tmp_path: Path) -> None:
    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
    from jestcurate.pipelines.synth import CLASSES, draw_image

    train_mod.run(config(guide, tmp_path / "ref.pt", steps=80, lr=2e-3))
    model = load_model(resolve_spec(ModelSpec("jc-tiny", str(tmp_path / "ref.pt"))))
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(len(CLASSES), size=64)
    images = torch.stack([model.preprocess(draw_image(int(c), rng, 64)) for c in labels])
    prompts = model.tokenizer([f"a photo of a {c} {s}" for c, s in CLASSES])
    sims = model.encode_image(images) @ model.encode_text(prompts).T
    colours = [
        CLASSES[int(p)][0] == CLASSES[int(t)][0]
        for p, t in zip(sims.argmax(1), labels, strict=True)
    ]
    assert np.mean(colours) > 0.8  # colour is learnt within a few dozen steps; shape later


def test_resume_after_an_interruption(guide: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref.pt"

    def stop_at_12(step: int, total: int, loss: float) -> None:
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mod.run(config(guide, out, save_every=5), stop_at_12)
    assert not out.exists() and (tmp_path / "ref.pt.resume.pt").exists()
    report = train_mod.run(config(guide, out, save_every=5))
    assert report.resumed_from == 10 and report.steps == 30 and out.exists()
    again = train_mod.run(config(guide, out, save_every=5))
    assert again.already_done
    with pytest.raises(JCError, match="not trained with these settings"):
        train_mod.run(config(guide, out, steps=31))


def test_epochs_count_the_data(guide: Path, tmp_path: Path) -> None:
    report = train_mod.run(config(guide, tmp_path / "e.pt", steps=None, epochs=2))
    assert report.steps == 2 * (320 // 32)


def test_unusable_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01" * 5000)
    for name, message in (
        ("empty.tar", "less than one batch"),
        ("garbage.tar", "less than one batch"),
    ):
        for limit in (["--epochs", "1"], ["--steps", "5"]):
            code, output = run_cli(
                "train", tmp_path / name, "-m", "jc-tiny", "--out", tmp_path / "x.pt", *limit
            )
            assert code == 2, output
            assert message in output and "Traceback" not in output, output
    code, output = run_cli(
        "train", tmp_path / "empty.tar", "-m", "jc-tiny", "--out", tmp_path / "x.pt"
    )
    assert code == 2 and "exactly one of --steps and --epochs" in output
