"""Unit tests of model/openclip.py on the built-in jc-tiny models: resolving a spec, checking a
checkpoint file against a model, and what a loaded model reports. No scoring runs."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jestcurate.errors import JCError
from jestcurate.model import openclip as oc
from jestcurate.model.openclip import (
    LoadedModel,
    ModelSpec,
    check_checkpoint,
    check_fit,
    load_model,
    resolve_spec,
)

TINY = json.loads((oc.BUILTIN_CONFIG_DIR / "jc-tiny.json").read_text())


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    open_clip = oc._open_clip()
    torch.manual_seed(0)
    return {
        name: open_clip.create_model(name, device="cpu") for name in ("jc-tiny", "jc-tiny-sigmoid")
    }


@pytest.fixture(scope="module")
def state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """jc-tiny's state_dict: a checkpoint that fits (copy before changing)."""
    return {k: v.clone() for k, v in models["jc-tiny"].state_dict().items()}


def save(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return str(path)


def refusal(path: str, model: torch.nn.Module, name: str, **kw: bool) -> str:
    with pytest.raises(JCError) as caught:
        check_checkpoint(path, model, name, **kw)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- resolve_spec ------------------------------------------------------------------------


def test_resolve_a_builtin_name() -> None:
    r = resolve_spec(ModelSpec("jc-tiny", device="cpu", init_seed=5))
    assert (r.name, r.config_path, r.config_sha256) == ("jc-tiny", None, None)
    assert (r.pretrained, r.pretrained_is_file, r.pretrained_sha256) == (None, False, None)
    assert r.device == torch.device("cpu") and r.precision == "fp32" and r.init_seed == 5
    assert r.identity() == {
        "model": "jc-tiny",
        "model_config_sha256": None,
        "pretrained_sha256": None,
        "init_seed": 5,
        "precision": "fp32",
        "pretrained": None,
    }
    assert resolve_spec(ModelSpec("jc-tiny", device="cpu", precision="bf16")).precision == "bf16"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tinny", device="cpu"))
    assert str(caught.value).startswith("unknown model 'jc-tinny'; did you mean jc-tiny, ")
    assert str(caught.value).endswith("? (or pass a model-config .json path)")
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("qqqqqqqqqqqq", device="cpu"))
    assert str(caught.value) == ("unknown model 'qqqqqqqqqqqq' (or pass a model-config .json path)")


def test_a_config_file_is_identified_by_its_content(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "jcunit-cfg.json"
    first.write_text(json.dumps(TINY, indent=4))
    moved = tmp_path / "b" / "jcunit-cfg-copy.json"  # other path, name, order and spacing
    moved.write_text(json.dumps(dict(reversed(list(TINY.items()))), separators=(",", ":")))
    one, two = (
        resolve_spec(ModelSpec(str(first), device="cpu")),
        resolve_spec(ModelSpec(str(moved), device="cpu")),
    )
    assert one.name == "jcunit-cfg" and one.config_path == str(first)
    assert one.config_sha256 is not None and one.config_sha256 == two.config_sha256
    assert one.identity()["model"] is None  # the hash identifies it, not the name
    other = tmp_path / "jcunit-cfg-other.json"
    other.write_text(json.dumps({**TINY, "embed_dim": 32}))
    assert resolve_spec(ModelSpec(str(other), device="cpu")).config_sha256 != one.config_sha256


def test_a_config_file_builds_its_model(tmp_path: Path) -> None:
    path = tmp_path / "jcunit-narrow.json"
    path.write_text(json.dumps({**TINY, "embed_dim": 32}))
    loaded = load_model(resolve_spec(ModelSpec(str(path), device="cpu")), warn_random=False)
    assert loaded.embed_dim == 32 and loaded.describe()["model_config_path"] == str(path)
    bad = tmp_path / "jcunit-bogus.json"
    bad.write_text(json.dumps({**TINY, "vision_cfg": {**TINY["vision_cfg"], "bogus": 1}}))
    with pytest.raises(JCError, match=r"^open_clip cannot build jcunit-bogus: .*bogus"):
        load_model(resolve_spec(ModelSpec(str(bad), device="cpu")), warn_random=False)


def test_config_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec(str(missing)))
    assert str(caught.value) == f"model config not found: {missing}"
    broken = tmp_path / "broken.json"
    broken.write_text('{"embed_dim": ')
    with pytest.raises(JCError, match=rf"^cannot read model config {broken}: "):
        resolve_spec(ModelSpec(str(broken)))
    for content in ({"embed_dim": 8, "vision_cfg": {}}, [1, 2]):
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(content))
        with pytest.raises(JCError) as caught:
            resolve_spec(ModelSpec(str(wrong)))
        assert str(caught.value) == (
            f"{wrong} is not an open_clip model config (it needs embed_dim, vision_cfg and "
            "text_cfg)"
        )


@pytest.mark.parametrize("given", ["/no/such/dir/w.pt", "w.safetensors", "runs/last", "./x"])
def test_a_missing_checkpoint(given: str) -> None:
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tiny", pretrained=given, device="cpu"))
    assert str(caught.value) == f"checkpoint not found: {given}"


def test_an_unknown_pretrained_tag_names_the_known_ones() -> None:
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tiny", pretrained="openai", device="cpu"))
    assert str(caught.value) == (
        "unknown pretrained tag 'openai' for model jc-tiny; this model has no known tags"
    )
    with pytest.raises(
        JCError,
        match=r"^unknown pretrained tag 'nope' for model ViT-B-32; "
        r"known tags: openai, ",
    ):
        resolve_spec(ModelSpec("ViT-B-32", pretrained="nope", device="cpu"))


def test_a_checkpoint_file_is_hashed(tmp_path: Path, state: dict) -> None:
    path = tmp_path / "ckpt.pt"
    save(path, state)
    r = resolve_spec(ModelSpec("jc-tiny", pretrained=str(path), device="cpu", init_seed=3))
    assert r.pretrained == str(path) and r.pretrained_is_file
    assert r.pretrained_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.init_seed is None  # weights come from the file, not a seed
    assert oc.sha256_file(path, chunk=1000) == r.pretrained_sha256


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_errors() -> None:
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tiny", device="cuda:1"))
    assert str(caught.value) == "--device cuda:1 asked for, but torch sees no CUDA device"
    assert resolve_spec(ModelSpec("jc-tiny", device="auto")).device == torch.device("cpu")


def test_unknown_device_and_precision() -> None:
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tiny", device="tpu0"))
    assert str(caught.value) == "unknown device 'tpu0'; use auto, cpu or cuda"
    with pytest.raises(JCError) as caught:
        resolve_spec(ModelSpec("jc-tiny", device="cpu", precision="fp8"))
    assert str(caught.value) == "unknown precision 'fp8'; use one of fp32, bf16, fp16"


# --- check_checkpoint --------------------------------------------------------------------


def test_a_fitting_checkpoint_passes_in_every_wrapping(
    tmp_path: Path, models: dict, state: dict
) -> None:
    from safetensors.torch import save_file

    model = models["jc-tiny"]
    check_checkpoint(save(tmp_path / "plain.pt", state), model, "jc-tiny")
    ddp = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    check_checkpoint(save(tmp_path / "ddp.pt", ddp), model, "jc-tiny")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    check_checkpoint(str(tmp_path / "w.safetensors"), model, "jc-tiny")
    scalar = {**state, "logit_scale": state["logit_scale"].reshape(1)}  # open_clip reshapes
    check_checkpoint(save(tmp_path / "scalar.pt", scalar), model, "jc-tiny")
    # big_vision .npz files are converted by open_clip itself: not checked here
    (tmp_path / "bv.npz").write_bytes(b"not looked at")
    check_checkpoint(str(tmp_path / "bv.npz"), model, "jc-tiny")


def test_shape_differences_are_named(tmp_path: Path, models: dict, state: dict) -> None:
    narrow = {**state, "text_projection": torch.zeros(64, 32)}
    path = save(tmp_path / "narrow.pt", narrow)
    assert refusal(path, models["jc-tiny"], "jc-tiny") == (
        f"{path} does not fit jc-tiny: 1 tensors differ in shape (first: text_projection is "
        "[64, 64] in the model, [64, 32] in the checkpoint); pass the --model it was trained as"
    )
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in narrow.items()}, tmp_path / "narrow.safetensors")
    message = refusal(str(tmp_path / "narrow.safetensors"), models["jc-tiny"], "jc-tiny")
    assert "text_projection is [64, 64] in the model, [64, 32]" in message
    two = {**state, "logit_scale": torch.zeros(2)}
    message = refusal(save(tmp_path / "two.pt", two), models["jc-tiny"], "jc-tiny")
    assert "(first: logit_scale is [] in the model, [2] in the checkpoint)" in message


def test_missing_and_extra_tensors_are_counted(tmp_path: Path, models: dict, state: dict) -> None:
    model = models["jc-tiny"]
    fewer = {k: v for k, v in state.items() if k != "ln_final.bias"}
    path = save(tmp_path / "fewer.pt", fewer)
    assert refusal(path, model, "jc-tiny") == (
        f"{path} does not fit jc-tiny: 1 of the model's are missing (first: ln_final.bias is "
        "missing); pass the --model it was trained as"
    )
    path = save(tmp_path / "more.pt", {**state, "head.weight": torch.zeros(3)})
    assert "1 are not in the model (first: head.weight is extra)" in refusal(path, model, "x")
    all_three = {
        **fewer,
        "head.weight": torch.zeros(3),
        "text_projection": torch.zeros(64, 8),
        "visual.proj": torch.zeros(128, 8),
    }
    message = refusal(save(tmp_path / "all.pt", all_three), model, "jc-tiny")
    assert (
        ": 2 tensors differ in shape, 1 of the model's are missing, 1 are not in the model "
        "(first: text_projection is [64, 64] in the model, [64, 8] in the checkpoint)"
    ) in message


def test_positional_embeddings_may_differ_in_length_only(
    tmp_path: Path, models: dict, state: dict
) -> None:
    model = models["jc-tiny"]
    longer = {
        **state,
        "positional_embedding": torch.zeros(40, 64),
        "visual.positional_embedding": torch.zeros(50, 128),
    }
    check_checkpoint(save(tmp_path / "longer.pt", longer), model, "jc-tiny")
    wider = {**state, "positional_embedding": torch.zeros(32, 48)}
    message = refusal(save(tmp_path / "wider.pt", wider), model, "jc-tiny")
    assert "(first: positional_embedding is [32, 64] in the model, [32, 48] in" in message
    wide_visual = {**state, "visual.positional_embedding": torch.zeros(65, 96)}
    message = refusal(save(tmp_path / "wv.pt", wide_visual), model, "jc-tiny")
    assert "visual.positional_embedding is [65, 128] in the model, [65, 96]" in message


def test_a_longer_positional_embedding_is_interpolated_on_load(tmp_path: Path, state: dict) -> None:
    """What check_checkpoint's allowance relies on: open_clip resizes it to the model's."""
    longer = {
        **state,
        "positional_embedding": torch.ones(40, 64),
        "visual.positional_embedding": torch.ones(50, 128),
    }
    path = save(tmp_path / "longer.pt", longer)
    loaded = load_model(resolve_spec(ModelSpec("jc-tiny", pretrained=path, device="cpu")))
    assert tuple(loaded.model.positional_embedding.shape) == (32, 64)
    assert tuple(loaded.model.visual.positional_embedding.shape) == (65, 128)


def test_logit_bias_must_match_the_models_loss(tmp_path: Path, models: dict, state: dict) -> None:
    softmax = save(tmp_path / "softmax.pt", state)
    message = refusal(softmax, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid")
    assert message == (
        f"{softmax} has no logit_bias: it was trained with CLIP's softmax loss, but "
        "jc-tiny-sigmoid is a sigmoid (SigLIP) model and would score with a bias of 0; "
        "pass the --model it was trained as"
    )
    check_checkpoint(softmax, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid", allow_new_bias=True)
    sigmoid = save(tmp_path / "sigmoid.pt", {**state, "logit_bias": torch.tensor([-10.0])})
    assert refusal(sigmoid, models["jc-tiny"], "jc-tiny") == (
        f"{sigmoid} has a logit_bias: it was trained with the sigmoid (SigLIP) loss, but "
        "jc-tiny is a softmax (CLIP) model; pass the --model it was trained as"
    )
    check_checkpoint(sigmoid, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid")


def test_a_refusal_names_the_model_it_was_trained_as(
    tmp_path: Path, models: dict, state: dict
) -> None:
    path = save(tmp_path / "ckpt.pt", state)
    info = Path(f"{path}.json")
    info.write_text(json.dumps({"model": "jc-tiny", "model_config_sha256": None}))
    assert refusal(path, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid").endswith(
        f"; it was trained as jc-tiny ({info}): pass --model jc-tiny"
    )
    info.write_text(json.dumps({"model": "mine", "model_config_sha256": "ab" * 32}))
    assert refusal(path, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid").endswith(
        f"; it was trained as the model config mine.json ({info}): pass that config"
    )
    info.write_text("[]")
    assert refusal(path, models["jc-tiny-sigmoid"], "jc-tiny-sigmoid").endswith(
        "; pass the --model it was trained as"
    )


def test_check_fit_errors_are_one_line(tmp_path: Path, state: dict) -> None:
    def fit(path: Path) -> str:
        with pytest.raises(JCError) as caught:
            check_fit(resolve_spec(ModelSpec("jc-tiny", pretrained=str(path), device="cpu")))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert fit(Path(save(tmp_path / "list.pt", [1, 2]))) == (
        f"cannot load {tmp_path / 'list.pt'} into jc-tiny: "
        "it holds no state_dict of tensors by name"
    )
    assert fit(Path(save(tmp_path / "empty.pt", {}))).endswith(
        ": it holds no state_dict of tensors by name"
    )
    pickled = Path(save(tmp_path / "ns.pt", {**state, "args": argparse.Namespace(lr=1)}))
    assert fit(pickled) == (
        f"refusing to load {pickled}: it pickles argparse.Namespace, not only tensors; "
        "checkpoints are loaded with weights_only=True (save a plain state_dict instead)"
    )
    page = tmp_path / "page.pt"  # an error page saved where the weights should be
    page.write_bytes(b"<html>404 not found</html>")
    assert fit(page) == f"cannot load {page}: not a PyTorch checkpoint (Unsupported operand 60)"
    check_fit(resolve_spec(ModelSpec("jc-tiny", device="cpu")))  # no file: nothing to check


def test_a_text_file_is_not_said_to_pickle_a_class(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_bytes(b"checkpoint to come")
    with pytest.raises(JCError) as caught:
        check_fit(resolve_spec(ModelSpec("jc-tiny", pretrained=str(text), device="cpu")))
    assert str(caught.value).startswith(f"cannot load {text}: not a PyTorch checkpoint")


# --- LoadedModel -------------------------------------------------------------------------


def test_loaded_tiny_models_report_their_kind() -> None:
    clip = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), warn_random=False)
    assert clip.loss_kind == "softmax" and clip.logit_bias is None
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's initial value
    assert clip.embed_dim == 64 and clip.image_size == (64, 64)
    siglip = load_model(resolve_spec(ModelSpec("jc-tiny-sigmoid", device="cpu")), warn_random=False)
    assert siglip.loss_kind == "sigmoid" and siglip.logit_bias == pytest.approx(-10.0)
    assert siglip.logit_scale == pytest.approx(10.0, rel=1e-6)  # exp(init_logit_scale = ln 10)
    described = siglip.describe()
    assert described["loss"] == "sigmoid" and described["embed_dim"] == 64
    assert described["context_length"] == 32 and described["init_seed"] == 0
    assert described["model"] == "jc-tiny-sigmoid" and described["precision"] == "fp32"
    json.dumps(described)  # meta.json must be able to hold it


def test_weights_come_from_the_checkpoint(tmp_path: Path, state: dict) -> None:
    path = save(tmp_path / "ckpt.pt", {**state, "logit_scale": torch.tensor(math.log(20.0))})
    loaded = load_model(resolve_spec(ModelSpec("jc-tiny", pretrained=path, device="cpu")))
    assert loaded.logit_scale == pytest.approx(20.0, rel=1e-6)
    assert torch.equal(loaded.model.text_projection.detach(), state["text_projection"])
    # a softmax checkpoint may start a sigmoid model only when asked: its bias starts at 0
    spec = ModelSpec("jc-tiny-sigmoid", pretrained=path, device="cpu")
    with pytest.raises(JCError, match="has no logit_bias"):
        load_model(resolve_spec(spec))
    started = load_model(resolve_spec(spec), allow_new_bias=True)
    assert started.loss_kind == "sigmoid" and started.logit_bias == 0.0


def test_random_weights_are_reproducible_from_the_seed(caplog: pytest.LogCaptureFixture) -> None:
    def encode(seed: int) -> torch.Tensor:
        loaded = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu", init_seed=seed)))
        out = loaded.encode_text(loaded.tokenizer(["a red circle", "a blue square"]))
        assert out.dtype == torch.float32 and out.shape == (2, 64)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
        return out

    with caplog.at_level(logging.WARNING, logger="jestcurate.model.openclip"):
        first = encode(3)
    assert "jc-tiny has random weights (seed 3)" in caplog.text
    assert torch.equal(first, encode(3)) and not torch.equal(first, encode(4))


def test_bf16_encodes_to_unit_float32_on_cpu() -> None:
    loaded = load_model(
        resolve_spec(ModelSpec("jc-tiny", device="cpu", precision="bf16")), warn_random=False
    )
    out = loaded.encode_image(torch.rand(2, 3, 64, 64))
    assert out.dtype == torch.float32 and out.shape == (2, 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_loaded_model_properties_from_a_stub() -> None:
    resolved = resolve_spec(ModelSpec("jc-tiny", device="cpu"))

    def stub(**visual: object) -> LoadedModel:
        model = SimpleNamespace(
            visual=SimpleNamespace(**visual),
            logit_scale=torch.tensor([math.log(30.0)]),
            logit_bias=torch.tensor([[-3.5]]),
        )
        return LoadedModel(resolved, model, None, None)

    assert stub(image_size=96).image_size == (96, 96)
    assert stub(image_size=[32, 48]).image_size == (32, 48)
    assert stub().image_size == (224, 224)  # open_clip's default when a tower says nothing
    assert stub().logit_scale == pytest.approx(30.0)
    assert stub().logit_bias == -3.5 and stub().loss_kind == "sigmoid"
