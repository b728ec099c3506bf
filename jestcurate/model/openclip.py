"""The only module that imports open_clip: resolve a model spec, load it, encode batches."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jestcurate.errors import JCError, first_line, some

log = logging.getLogger(__name__)

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("fp32", "bf16", "fp16")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_registered_builtins = False


def _open_clip() -> Any:
    """Import open_clip once and teach it the project's own model configs (jc-tiny, ...)."""
    global _registered_builtins
    import open_clip

    if not _registered_builtins:
        open_clip.add_model_config(BUILTIN_CONFIG_DIR)
        _registered_builtins = True
    return open_clip


def sha256_file(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json_sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise JCError(f"--device {device} asked for, but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise JCError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def default_precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. `model` is an open_clip name or a path to a model-config JSON."""

    model: str
    pretrained: str | None = None
    device: str = "auto"
    precision: str | None = None
    init_seed: int = 0


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec with names resolved and files hashed, known before any weights are loaded."""

    name: str  # the open_clip registry name
    config_path: str | None
    config_sha256: str | None
    pretrained: str | None  # tag, or absolute checkpoint path
    pretrained_is_file: bool
    pretrained_sha256: str | None
    device: torch.device
    precision: str
    init_seed: int | None

    def identity(self) -> dict[str, Any]:
        """Fields that say which model this is, for comparing with an existing score set."""
        return {
            "model": None if self.config_sha256 else self.name,
            "model_config_sha256": self.config_sha256,
            "pretrained_sha256": self.pretrained_sha256,
            "init_seed": self.init_seed,
            "precision": self.precision,
            "pretrained": self.pretrained,  # not compared (the hash is), but named in refusals
        }


def spec_from_meta(meta: Mapping[str, Any], device: str = "auto") -> ModelSpec:
    """The spec that rebuilds the model a score set's meta.json describes (its config file or
    name, its checkpoint or tag, its seed for random weights), at the device's default precision.
    The caller compares the resolved spec's hashes with the meta's: files may have changed."""
    config = meta.get("model_config_path")
    if meta.get("model_config_sha256") and not (config and os.path.isfile(config)):
        raise JCError(
            f"the model config the score set was made with is gone ({config}); it is needed to "
            "embed images with the same model"
        )
    model = config if meta.get("model_config_sha256") else meta.get("model")
    if not model:
        raise JCError("the score set's meta.json names no model to embed images with")
    seed = meta.get("init_seed")
    return ModelSpec(str(model), meta.get("pretrained"), device, None, int(seed or 0))


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith(".") or text.lower().endswith(_CHECKPOINT_SUFFIXES)


def resolve_spec(spec: ModelSpec, fetch: bool = True) -> ResolvedSpec:
    """Names resolved and files hashed. `fetch`: download (or find in the cache) a pretrained
    tag's weights to pin their sha256; without it a tag is only checked against the registry."""
    open_clip = _open_clip()
    config_path = config_sha = None
    name = spec.model
    if spec.model.lower().endswith(".json") or os.path.isfile(spec.model):
        config_path = os.path.abspath(spec.model)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise JCError(f"model config not found: {spec.model}") from None
        except (OSError, ValueError) as exc:
            raise JCError(f"cannot read model config {spec.model}: {exc}") from None
        if not isinstance(config, dict) or not all(
            k in config for k in ("embed_dim", "vision_cfg", "text_cfg")
        ):
            raise JCError(
                f"{spec.model} is not an open_clip model config "
                "(it needs embed_dim, vision_cfg and text_cfg)"
            )
        # Hash the parsed content so the same config named by another path is the same model.
        config_sha = canonical_json_sha256(config)
        open_clip.add_model_config(config_path)
        name = Path(config_path).stem
    elif not spec.model.startswith(("hf-hub:", "local-dir:")) and spec.model not in set(
        open_clip.list_models()
    ):
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise JCError(f"unknown model {spec.model!r}{hint} (or pass a model-config .json path)")

    device = resolve_device(spec.device)
    precision = spec.precision or default_precision(device)
    if precision not in PRECISIONS:
        raise JCError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")

    pretrained = spec.pretrained
    is_file = False
    sha = None
    if pretrained:
        if os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)
            is_file = True
            sha = sha256_file(pretrained)
        elif _looks_like_path(pretrained):
            raise JCError(f"checkpoint not found: {pretrained}")
        elif fetch:
            sha = _fetch_tag(open_clip, name, pretrained)
        else:
            _known_tag(open_clip, name, pretrained)
    return ResolvedSpec(
        name=name,
        config_path=config_path,
        config_sha256=config_sha,
        pretrained=pretrained,
        pretrained_is_file=is_file,
        pretrained_sha256=sha,
        device=device,
        precision=precision,
        init_seed=None if pretrained else spec.init_seed,
    )


def _fetch_tag(open_clip: Any, name: str, tag: str) -> str:
    """Download (or find in the cache) the file behind a pretrained tag and return its sha256, so
    meta.json pins the exact weights."""
    cfg = _known_tag(open_clip, name, tag)
    log.info("fetching pretrained weights %r for %s (or reading the cached copy)", tag, name)
    try:
        # The hub logs each retry of each candidate file (twice, through its handler and
        # ours): dozens of lines before the one that matters, the failure below.
        with _quiet("huggingface_hub"):
            path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network, hub and cache errors all mean the same thing here
        raise JCError(
            f"cannot fetch pretrained weights {tag!r} for {name} ({first_line(exc)}); without "
            "a network, pass a checkpoint file to --pretrained, or set HF_HUB_OFFLINE=1 to "
            "use only the local cache"
        ) from None
    if not path or not os.path.isfile(path):
        raise JCError(f"cannot fetch pretrained weights {tag!r} for {name}")
    return sha256_file(path)


def _known_tag(open_clip: Any, name: str, tag: str) -> dict[str, Any]:
    """open_clip's registry entry for a pretrained tag, or a one-line refusal listing the
    model's tags."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"; known tags: {', '.join(tags)}" if tags else "; this model has no known tags"
        raise JCError(f"unknown pretrained tag {tag!r} for model {name}{known}")
    return dict(cfg)


def _unpickling_message(path: str | None, text: str) -> str:
    # A class pickled by name ("argparse.Namespace"); a text file beginning with "c" reads as
    # the same opcode, followed by words that name no class.
    found = re.search(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+) was not an allowed", text)
    if found:
        return (
            f"refusing to load {path}: it pickles {found.group(1)}, not only tensors; "
            "checkpoints are loaded with weights_only=True (save a plain state_dict instead)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = detail.group(1).strip() if detail else "unreadable pickle"
    return f"cannot load {path}: not a PyTorch checkpoint ({reason})"


class LoadedModel:
    """A frozen open_clip model with its eval preprocessing and tokenizer."""

    def __init__(self, resolved: ResolvedSpec, model: Any, preprocess: Any, tokenizer: Any):
        self.resolved = resolved
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = resolved.device
        self.precision = resolved.precision

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0])

    @property
    def loss_kind(self) -> str:
        # open_clip gives SigLIP-style models a learnt logit bias; CLIP-style ones have none.
        return "sigmoid" if self.logit_bias is not None else "softmax"

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def forward_flops(self) -> int:
        """FLOPs of one sample's forward pass (image and caption), counted by torch; a training
        step costs about three forward passes per sample."""
        from torch.utils.flop_counter import FlopCounterMode

        height, width = self.image_size
        context = int(getattr(self.tokenizer, "context_length", 0) or 77)
        device = next(self.model.parameters()).device
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.model.encode_image(torch.zeros(1, 3, height, width, device=device))
            self.model.encode_text(torch.zeros(1, context, dtype=torch.long, device=device))
        return int(counter.get_total_flops())

    @functools.cached_property
    def embed_dim(self) -> int:
        # Towers differ in where they keep the projection; encoding one caption always works.
        return int(self.encode_text(self.tokenizer(["probe"])).shape[-1])

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_transform(self) -> Any:
        """open_clip's training transform (its default augmentation) for this model."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=True)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model.encode_image(images)
        return F.normalize(out.float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model.encode_text(tokens)
        return F.normalize(out.float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        """Everything meta.json records about the model."""
        r = self.resolved
        preprocess = json.loads(json.dumps(getattr(self.model.visual, "preprocess_cfg", {})))
        return {
            "model": r.name,
            "model_config_path": r.config_path,
            "model_config_sha256": r.config_sha256,
            "pretrained": r.pretrained,
            "pretrained_sha256": r.pretrained_sha256,
            "init_seed": r.init_seed,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "loss": self.loss_kind,
            "precision": r.precision,
            "preprocess": preprocess,
            "context_length": int(getattr(self.tokenizer, "context_length", 0) or 0),
        }


def load_model(
    resolved: ResolvedSpec, warn_random: bool = True, allow_new_bias: bool = False
) -> LoadedModel:
    """Build the model (weights from the checkpoint or tag, or from the fixed seed) in eval mode.
    `warn_random`: say that random weights make meaningless scores (not when training).
    `allow_new_bias`: let a softmax checkpoint start a sigmoid model with a zero logit bias
    (fine-tuning a CLIP as a SigLIP); scoring refuses it, as every score would be wrong."""
    open_clip = _open_clip()
    if resolved.pretrained is None and warn_random:
        log.warning(
            "no --pretrained given: %s has random weights (seed %d); scores are reproducible "
            "but mean nothing until you pass a trained checkpoint",
            resolved.name,
            resolved.init_seed,
        )
    if resolved.pretrained is None:
        torch.manual_seed(resolved.init_seed or 0)
    # A checkpoint file is checked against the built model before open_clip loads it: open_clip
    # asserts on some mismatches and silently fills a missing logit bias with zero.
    tag = None if resolved.pretrained_is_file else resolved.pretrained
    with _open_clip_errors(resolved):
        model, _, preprocess = open_clip.create_model_and_transforms(
            resolved.name, pretrained=tag, device="cpu", weights_only=True
        )
        if resolved.pretrained_is_file:
            assert resolved.pretrained is not None
            check_checkpoint(resolved.pretrained, model, resolved.name, allow_new_bias)
            open_clip.load_checkpoint(model, resolved.pretrained, weights_only=True)
    model = model.to(resolved.device).eval()
    tokenizer = open_clip.get_tokenizer(resolved.name)
    return LoadedModel(resolved, model, preprocess, tokenizer)


def check_fit(resolved: ResolvedSpec) -> None:
    """Build the model on the CPU and check the checkpoint file against it, loading no weights:
    what `slurm score` runs before it writes a script that every task would fail in."""
    if not resolved.pretrained_is_file:
        return
    assert resolved.pretrained is not None
    with _open_clip_errors(resolved):
        model = _open_clip().create_model(resolved.name, device="cpu")
        check_checkpoint(resolved.pretrained, model, resolved.name)


@contextlib.contextmanager
def _quiet(logger: str = "", level: int = logging.ERROR) -> Iterator[None]:
    """Raise a logger's level for a while: libraries' chatter the user has no use for."""
    chatty = logging.getLogger(logger)
    before = chatty.level
    chatty.setLevel(level)
    try:
        yield
    finally:
        chatty.setLevel(before)


@contextlib.contextmanager
def _open_clip_errors(resolved: ResolvedSpec) -> Iterator[None]:
    """open_clip's errors while building a model and loading weights, as one line each (and
    its "No pretrained weights loaded" warning, which we said already, unsaid)."""
    what = resolved.pretrained if resolved.pretrained else resolved.name
    try:
        with _quiet():
            yield
    except pickle.UnpicklingError as exc:
        raise JCError(_unpickling_message(resolved.pretrained, str(exc))) from None
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, AssertionError) as exc:
        raise JCError(f"cannot load {what} into {resolved.name}: {first_line(exc)}") from None
    except TypeError as exc:  # a config key open_clip's model classes do not take
        raise JCError(f"open_clip cannot build {resolved.name}: {first_line(exc)}") from None


def check_checkpoint(path: str, model: Any, name: str, allow_new_bias: bool = False) -> None:
    """Refuse, in one line, a checkpoint file that does not fit `model` (open_clip `name`):
    tensors missing, extra or of another shape (a positional embedding may differ in length
    only: open_clip interpolates it), or a loss other than the model's (a logit bias present in
    one and not the other). Only names and shapes are compared; no weights are read."""
    tensors = _checkpoint_tensors(path, model)
    if tensors is None:
        return  # a format open_clip converts on its own (big_vision .npz)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    got.pop("text.transformer.embeddings.position_ids", None)  # open_clip drops it too
    shapes = [k for k in want if k in got and not _shape_fits(k, want[k], got[k])]
    missing = [k for k in want if k not in got and k != "logit_bias"]
    extra = [k for k in got if k not in want and k != "logit_bias"]
    trained_as = _trained_as(path)
    if shapes or missing or extra:
        counts = [
            f"{len(shapes)} tensors differ in shape" if shapes else "",
            f"{len(missing)} of the model's are missing" if missing else "",
            f"{len(extra)} are not in the model" if extra else "",
        ]
        if shapes:
            k = shapes[0]
            first = f"{k} is {list(want[k])} in the model, {list(got[k])} in the checkpoint"
        else:
            first = f"{(missing or extra)[0]} is {'missing' if missing else 'extra'}"
        raise JCError(
            f"{path} does not fit {name}: {', '.join(c for c in counts if c)} (first: {first}); "
            f"{trained_as}"
        )
    has_bias, wants_bias = "logit_bias" in got, "logit_bias" in want
    if wants_bias and not has_bias and allow_new_bias:
        log.info("%s has no logit_bias (a softmax checkpoint): %s starts it at 0", path, name)
    elif wants_bias and not has_bias:
        raise JCError(
            f"{path} has no logit_bias: it was trained with CLIP's softmax loss, but {name} is "
            f"a sigmoid (SigLIP) model and would score with a bias of 0; {trained_as}"
        )
    if has_bias and not wants_bias:
        raise JCError(
            f"{path} has a logit_bias: it was trained with the sigmoid (SigLIP) loss, but "
            f"{name} is a softmax (CLIP) model; {trained_as}"
        )


def _checkpoint_tensors(path: str, model: Any) -> dict[str, Any] | None:
    """A checkpoint's tensors by name as open_clip will see them, their data left on disk:
    memory-mapped (torch's zip format), or shapes only (safetensors)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    if path.lower().endswith((".npz", ".npy")):
        return None
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                found: Any = {
                    k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                    for k in f.keys()  # noqa: SIM118 (not a dict)
                }
        except Exception as exc:  # safetensors' own error type: a damaged or foreign file
            raise ValueError(f"not a safetensors file ({first_line(exc)})") from None
    else:
        try:
            found = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            found = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(found, dict) and "state_dict" in found:
        found = found["state_dict"]
    if not _is_state_dict(found):
        keys = some([str(k) for k in found], 5, ", ") if isinstance(found, dict) else ""
        raise ValueError(
            f"it holds no state_dict of tensors by name{f' (its keys: {keys})' if keys else ''}"
        )
    if next(iter(found)).startswith("module"):  # saved from DistributedDataParallel
        found = {k[7:]: v for k, v in found.items()}
    # The same conversions open_clip's load_checkpoint applies before loading.
    found = convert_state_dict(model, found)
    if "positional_embedding" in found and not hasattr(model, "positional_embedding"):
        found = convert_to_custom_text_state_dict(found)
    return dict(found)


def _is_state_dict(found: Any) -> bool:
    return (
        isinstance(found, dict)
        and bool(found)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in found.items())
    )


def _shape_fits(name: str, want: tuple[int, ...], got: tuple[int, ...]) -> bool:
    if want == got:
        return True
    if name.split(".")[-1] in ("logit_scale", "logit_bias"):  # scalar or 1-d: open_clip reshapes
        return math.prod(want) == math.prod(got) == 1
    # open_clip interpolates a positional embedding to the model's length, never its width
    return name.endswith("positional_embedding") and want[-1:] == got[-1:]


def _trained_as(path: str) -> str:
    """The hint that ends a refusal: the model the checkpoint was trained as, where the
    CKPT.json that `jestcurate train` writes beside it says."""
    info_path = f"{path}.json"
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        model = info["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return "pass the --model it was trained as"
    if info.get("model_config_sha256"):
        return f"it was trained as the model config {model}.json ({info_path}): pass that config"
    return f"it was trained as {model} ({info_path}): pass --model {model}"
