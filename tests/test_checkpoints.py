"""Checkpoints that do not fit the model are refused in one line, before any scoring and before
`slurm score` writes a script: other shapes, missing tensors, and the other loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from jestcurate.errors import JCError
from jestcurate.model.openclip import BUILTIN_CONFIG_DIR, _open_clip, check_checkpoint


def save_model(path: Path, model: str, trained_as: str | None = None, **save_kw) -> None:
    """A checkpoint of a freshly built `model`, with the CKPT.json `jestcurate train` writes
    beside it when `trained_as` is given."""
    torch.manual_seed(0)
    state = _open_clip().create_model(model).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path, **save_kw)
    if trained_as:
        info = {"model": trained_as, "model_config_sha256": None, "loss": "softmax"}
        path.with_name(path.name + ".json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jc-tiny with a wider text tower: a model a jc-tiny checkpoint does not fit."""
    config = json.loads((BUILTIN_CONFIG_DIR / "jc-tiny.json").read_text())
    config["text_cfg"]["width"] = 96
    path = tmp_path_factory.mktemp("cfg") / "jc-wide.json"
    path.write_text(json.dumps(config))
    return path


def refusal(*args: object) -> str:
    code, output = run_cli(*args)
    assert code == 2, output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert "Traceback" not in output
    return output


def test_score_refuses_a_checkpoint_of_another_shape(
    corpus: Path, tmp_path: Path, wide_config: Path
) -> None:
    ckpt = tmp_path / "ref.pt"
    save_model(ckpt, "jc-tiny", trained_as="jc-tiny")
    out = tmp_path / "scores"
    output = refusal("score", corpus, "-m", wide_config, "--pretrained", ckpt, "--out", out)
    assert f"{ckpt} does not fit jc-wide" in output
    assert "differ in shape" in output and "[32, 96] in the model, [32, 64]" in output
    assert "it was trained as jc-tiny" in output and "pass --model jc-tiny" in output
    assert not (out / "meta.json").exists()


def test_score_refuses_a_softmax_checkpoint_for_a_sigmoid_model(
    corpus: Path, tmp_path: Path
) -> None:
    """open_clip would fill the missing logit bias with 0 and every score would be wrong."""
    ckpt = tmp_path / "ref.pt"
    save_model(ckpt, "jc-tiny", trained_as="jc-tiny")
    out = tmp_path / "scores"
    output = refusal("score", corpus, "-m", "jc-tiny-sigmoid", "--pretrained", ckpt, "--out", out)
    assert "has no logit_bias" in output and "pass --model jc-tiny" in output
    assert not (out / "meta.json").exists()

    sigmoid = tmp_path / "siglip.pt"  # and the other way round, no CKPT.json to cite
    save_model(sigmoid, "jc-tiny-sigmoid")
    output = refusal("score", corpus, "-m", "jc-tiny", "--pretrained", sigmoid, "--out", out)
    assert "has a logit_bias" in output and "pass the --model it was trained as" in output


def test_slurm_score_checks_the_checkpoint_before_writing_a_script(
    corpus: Path, tmp_path: Path, wide_config: Path
) -> None:
    ckpt = tmp_path / "ref.pt"
    save_model(ckpt, "jc-tiny", trained_as="jc-tiny")
    out = tmp_path / "scores"
    for model in (str(wide_config), "jc-tiny-sigmoid"):
        output = refusal("slurm", "score", corpus, "-m", model, "--pretrained", ckpt, "--out", out)
        assert "pass --model jc-tiny" in output
        assert not out.exists(), "nothing written on refusal"
    code, output = run_cli("slurm", "score", corpus, "-m", "jc-tiny", "--pretrained", ckpt,
                           "--out", out)  # fmt: skip
    assert code == 0 and (out / "slurm" / "score.sbatch").is_file(), output


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_the_check_reads_every_checkpoint_format(kind: str, tmp_path: Path) -> None:
    path = tmp_path / ("ref.safetensors" if kind == "safetensors" else "ref.pt")
    save_kw = {"_use_new_zipfile_serialization": False} if kind == "legacy" else {}
    save_model(path, "jc-tiny", **save_kw)
    open_clip = _open_clip()
    check_checkpoint(str(path), open_clip.create_model("jc-tiny"), "jc-tiny")  # fits: no error
    with pytest.raises(JCError, match="has no logit_bias"):
        check_checkpoint(str(path), open_clip.create_model("jc-tiny-sigmoid"), "jc-tiny-sigmoid")
    # Starting a SigLIP from a CLIP checkpoint is open_clip's documented fine-tuning path.
    model = open_clip.create_model("jc-tiny-sigmoid")
    check_checkpoint(str(path), model, "jc-tiny-sigmoid", allow_new_bias=True)


def test_an_unreachable_hub_is_one_line(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub logs every retry of every candidate file; the user needs the one failure. (A
    stand-in for the hub: its real retries take most of a minute without a network.)"""
    import open_clip

    def unreachable(cfg: dict, *args: object, **kw: object) -> str:
        for attempt in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning(
                "Retrying in %ds [Retry %d/5].", 2**attempt, attempt
            )
        raise OSError("Failed to download file: cannot reach the Hub\nand more detail")

    registry = {"jc-tiny": {"web": {"hf_hub": "someone/jc-tiny/"}}}
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED", registry)
    monkeypatch.setattr(open_clip, "download_pretrained", unreachable)
    code, output = run_cli("score", corpus, "-m", "jc-tiny", "--pretrained", "web",
                           "--out", tmp_path / "o")  # fmt: skip
    assert code == 2, output
    assert "Retry" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot fetch pretrained weights 'web'" in errors[0], output
    assert "HF_HUB_OFFLINE=1" in errors[0]


def test_a_score_set_made_with_another_checkpoint_names_both_files(
    corpus: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "ref-a.pt", tmp_path / "ref-b.pt"
    save_model(first, "jc-tiny")
    torch.manual_seed(1)
    torch.save(_open_clip().create_model("jc-tiny").state_dict(), second)
    out = tmp_path / "scores"
    code, output = run_cli("score", corpus / "00000.tar", "-m", "jc-tiny", "--pretrained", first,
                           "--out", out, "--workers", 0)  # fmt: skip
    assert code == 0, output
    output = refusal("score", corpus, "-m", "jc-tiny", "--pretrained", second, "--out", out)
    assert "made differently" in output and str(first) in output and str(second) in output


def test_files_that_hold_no_state_dict_are_one_line(corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = _open_clip().create_model("jc-tiny").state_dict()
    cases = {
        "trainer.pt": ({"model": state, "epoch": 3}, "its keys: model, epoch"),
        "scalar.pt": ({"a": 1}, "no state_dict of tensors by name"),
        "numbered.pt": ({0: torch.zeros(1)}, "no state_dict of tensors by name"),
    }
    for name, (content, _) in cases.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    cases["bad.safetensors"] = (None, "not a safetensors file")
    for name, (_, message) in cases.items():
        output = refusal("score", corpus, "-m", "jc-tiny", "--pretrained", tmp_path / name,
                         "--out", tmp_path / "o")  # fmt: skip
        assert message in output, (name, output)


def test_slurm_score_checks_a_tag_without_fetching_it(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tasks fetch a tag's weights where they run; the login node need not."""
    import open_clip

    def fetch(*args: object, **kw: object) -> str:
        raise AssertionError("slurm score fetched the weights")

    registry = {"jc-tiny": {"web": {"hf_hub": "someone/jc-tiny/"}}}
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED", registry)
    monkeypatch.setattr(open_clip, "download_pretrained", fetch)
    out = tmp_path / "scores"
    code, output = run_cli("slurm", "score", corpus, "-m", "jc-tiny", "--pretrained", "web",
                           "--out", out)  # fmt: skip
    assert code == 0 and (out / "slurm" / "score.sbatch").is_file(), output
    output = refusal("slurm", "score", corpus, "-m", "jc-tiny", "--pretrained", "nope",
                     "--out", tmp_path / "o")  # fmt: skip
    assert "unknown pretrained tag 'nope'" in output


def test_a_library_error_that_announces_its_reason_keeps_it() -> None:
    from jestcurate.errors import first_line

    torch_style = RuntimeError("Error(s) in loading state_dict for CLIP:\n\tsize mismatch for x")
    assert first_line(torch_style) == "Error(s) in loading state_dict for CLIP: size mismatch for x"
    assert first_line(ValueError("one line\nand detail")) == "one line"
    assert first_line(KeyError()) == "KeyError"
