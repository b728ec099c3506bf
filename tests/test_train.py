"""`jestcurate train`: real contrastive training on generated shards, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import io
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


@pytest.fixture(scope="module")
def little(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 valid samples (three batches of 8 an epoch) and a shard of two undecodable ones."""
    out = tmp_path_factory.mktemp("little")
    write_corpus(out, CorpusSpec(shards=1, samples_per_shard=24, seed=6, image_size=32))
    with tarfile.open(out / "00001.tar", "w") as tar:
        for i in range(2):
            for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a photo of a red square")):
                member = tarfile.TarInfo(f"broken{i}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out


def little_config(little: Path, out: Path, **kw) -> train_mod.TrainConfig:
    kw.setdefault("model", "jc-tiny")
    kw.setdefault("workers", 0)
    return train_mod.TrainConfig(
        inputs=(str(little),), out=out, steps=8, batch_size=8, save_every=4, **kw
    )


def interrupt(cfg: train_mod.TrainConfig, at: int) -> None:
    """Run until Ctrl-C just after step `at`."""

    def stop(step: int, total: int, loss: float) -> None:
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mod.run(cfg, stop)
    assert not cfg.out.exists()


def assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ


@pytest.fixture(scope="module")
def uninterrupted(little: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "ref.pt"
    train_mod.run(little_config(little, out))
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_run_is_the_uninterrupted_run(
    little: Path, uninterrupted: Path, tmp_path: Path, workers: int
) -> None:
    # Saved at step 4, one batch into epoch 1; stopped at 6, so steps 5 and 6 are redone and the
    # rerun passes over epoch 1's first batch, then crosses into epoch 2. --workers 0 and 1
    # augment alike, so both match the one uninterrupted run (made with --workers 0).
    out = tmp_path / "ref.pt"
    interrupt(little_config(little, out, workers=workers), at=6)
    report = train_mod.run(little_config(little, out, workers=workers))
    assert report.resumed_from == 4 and report.steps == 8 and report.epochs == 3
    assert_same_weights(out, uninterrupted)
    info = json.loads(out.with_name("ref.pt.json").read_text())
    reference = json.loads(uninterrupted.with_name("ref.pt.json").read_text())
    assert info["resumed_from"] == [{"step": 4, "exact": True}] and not reference["resumed_from"]
    assert info["final_loss"] == reference["final_loss"]
    # the undecodable pair, counted in each of the three epochs, across the resume and workers
    assert info["data"]["skipped"] == reference["data"]["skipped"] == {"image decode failed": 6}


def test_a_resume_restores_the_training_rng_and_the_loss_scaler(
    little: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Patch dropout draws from the main RNG at every step; a CPU GradScaler stands in for fp16
    # on CUDA (growing its scale at every step, which a fresh scaler would restart).
    config = json.loads((BUILTIN_CONFIG_DIR / "jc-tiny.json").read_text())
    config["vision_cfg"]["patch_dropout"] = 0.5
    (tmp_path / "jc-drop.json").write_text(json.dumps(config))
    scalers: list[torch.amp.GradScaler] = []
    trainer_init = train_mod.Trainer.__init__

    def with_scaler(self: train_mod.Trainer, *args, **kw) -> None:
        trainer_init(self, *args, **kw)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        scalers.append(self.scaler)

    monkeypatch.setattr(train_mod.Trainer, "__init__", with_scaler)
    model = str(tmp_path / "jc-drop.json")
    train_mod.run(little_config(little, tmp_path / "a.pt", model=model))
    interrupt(little_config(little, tmp_path / "b.pt", model=model), at=6)
    train_mod.run(little_config(little, tmp_path / "b.pt", model=model))
    assert_same_weights(tmp_path / "a.pt", tmp_path / "b.pt")
    assert scalers[0].get_scale() == scalers[-1].get_scale() == 2.0 ** (10 + 8)


def test_an_old_resume_file_resumes_but_says_it_is_not_exact(
    little: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ref.pt"
    cfg = little_config(little, out)
    interrupt(cfg, at=6)
    resume = tmp_path / "ref.pt.resume.pt"
    state = torch.load(resume, weights_only=True)
    old = ("state_dict", "optimizer", "step", "epoch", "samples", "config")
    torch.save({k: state[k] for k in old}, resume)
    report = train_mod.run(cfg)
    assert report.resumed_from == 4 and report.steps == 8
    assert "not exactly" in caplog.text and "older jestcurate" in caplog.text
    (resumed,) = json.loads((tmp_path / "ref.pt.json").read_text())["resumed_from"]
    assert resumed["step"] == 4 and not resumed["exact"] and "older" in resumed["why"]


def test_a_sigmoid_model_may_start_from_a_softmax_checkpoint(
    little: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    """Scoring refuses the pair (tests/test_checkpoints.py); training a SigLIP from a CLIP
    checkpoint is open_clip's documented fine-tuning path, its bias starting at 0."""
    out = tmp_path / "siglip.pt"
    cfg = little_config(little, out, model="jc-tiny-sigmoid", pretrained=str(uninterrupted))
    report = train_mod.run(dataclasses.replace(cfg, steps=2))
    assert report.steps == 2
    assert "logit_bias" in torch.load(out, weights_only=True)["state_dict"]
