"""Evaluation sets for `jestcurate eval`, in layouts people already have, and their metrics.

Two kinds, told apart by the folder's contents:

- zero-shot classification in clip_benchmark's WebDataset layout (what clip_benchmark_export_wds
  writes and the djghosh/wds_* datasets hold): classnames.txt (one name per line, in label
  order), zeroshot_classification_templates.txt (prompts with {c}), SPLIT/0.tar, 1.tar, ...
  whose samples hold an image (.webp, .png, .jpg) and a .cls label (the integer as text), and
  SPLIT/nshards.txt;
- image-text retrieval: tars of images with a .txt caption and no classnames.txt. Either a
  held-out split of an img2dataset corpus (one caption per image, the whole .txt), or
  clip_benchmark's retrieval layout (dataset_type.txt says "retrieval"; each .txt holds an
  image's captions one per line, as flickr30k and mscoco_captions have five).

A set is decoded once (load) into preprocessed tensors kept in memory, then evaluated as often
as needed (evaluate) with clip_benchmark's own metric code, so the numbers are clip_benchmark's.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jestcurate.errors import JCError, first_line, some
from jestcurate.io.reader import (
    IMAGE_EXTS,
    RawSample,
    SampleError,
    ShardReadError,
    iter_raw_samples,
    load_image,
)

log = logging.getLogger(__name__)

KINDS = ("zeroshot", "retrieval")
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
DEFAULT_SPLIT = "test"  # clip_benchmark's default split
# CLIP's plain prompt, for a set that names its classes but ships no templates.
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
RECALL_KS = (1, 5, 10)
INSTALL_HINT = "pip install 'jestcurate[eval]'"


@dataclass(frozen=True)
class EvalSet:
    """A located evaluation set: nothing decoded yet."""

    name: str  # the folder's name (unique names are the caller's problem)
    kind: str  # "zeroshot" or "retrieval"
    path: Path  # the set's folder (classnames.txt, dataset_type.txt sit here)
    split: str  # the split folder read, e.g. "test"; "" when the tars sit in path itself

    @property
    def shard_dir(self) -> Path:
        return self.path / self.split if self.split else self.path


@dataclass
class EvalData:
    """A set decoded once and kept in memory for every evaluation of every arm. Holds
    N x 3 x H x W float32 images: about 0.6 MB an image at 224 px (pass load a limit)."""

    eval_set: EvalSet
    images: torch.Tensor  # preprocessed, in the set's order
    keys: list[str]
    labels: torch.Tensor | None = None  # zeroshot: int64 class indices
    classnames: list[str] | None = None
    templates: list[str] | None = None
    captions: list[list[str]] | None = None  # retrieval: each image's captions
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples left out

    @property
    def kind(self) -> str:
        return self.eval_set.kind

    @property
    def name(self) -> str:
        return self.eval_set.name

    def __len__(self) -> int:
        return len(self.keys)


# --- finding a set --------------------------------------------------------------------------


def _natural(path: Path) -> list[Any]:
    """Sort key that puts 2.tar before 10.tar (clip_benchmark names shards 0.tar, 1.tar, ...)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _tars(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*.tar") if p.is_file()), key=_natural)


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JCError(f"cannot read {path}: {first_line(exc)}") from None
    # As clip_benchmark reads them: every line stripped, none dropped (line i is class i).
    return [line.strip() for line in text.splitlines()]


def _locate(root: Path) -> tuple[Path, str]:
    """(set folder, split) for a folder given on the command line."""
    markers = (CLASSNAMES, DATASET_TYPE)
    if _tars(root):
        # A clip_benchmark split folder named directly (wds_cifar10/test): the set is its parent.
        if not any((root / m).exists() for m in markers) and any(
            (root.parent / m).exists() for m in markers
        ):
            return root.parent, root.name
        return root, ""
    if _tars(root / DEFAULT_SPLIT):
        return root, DEFAULT_SPLIT
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and _tars(d))
    if len(splits) == 1:
        return root, splits[0]
    if splits:
        raise JCError(
            f"{root} has several splits ({', '.join(splits)}) and no {DEFAULT_SPLIT}/: "
            f"name one, e.g. {root / splits[0]}"
        )
    raise JCError(
        f"no .tar shards in {root} or a split folder under it: expected a clip_benchmark set "
        f"({CLASSNAMES}, {TEMPLATES}, {DEFAULT_SPLIT}/0.tar ...) or a folder of image-text "
        ".tar shards"
    )


def _first_sample(shard: Path) -> RawSample:
    try:
        with open(shard, "rb") as f:
            first = next(iter_raw_samples(f), None)
    except ShardReadError as exc:
        raise JCError(f"{shard}: {exc}") from None
    except OSError as exc:
        raise JCError(f"cannot read {shard}: {first_line(exc)}") from None
    if first is None:
        raise JCError(f"{shard} holds no samples")
    return first


def _check_nshards(shard_dir: Path, found: int) -> None:
    """clip_benchmark reads shards 0..N-1 from nshards.txt: fewer files means a partial copy."""
    path = shard_dir / NSHARDS
    if not path.exists():
        return
    lines = _read_lines(path)
    try:
        wanted = int(lines[0])
    except (IndexError, ValueError):
        raise JCError(f"{path} should hold the number of shards, not {lines[:1]}") from None
    missing = [f"{i}.tar" for i in range(wanted) if not (shard_dir / f"{i}.tar").is_file()]
    if missing:
        raise JCError(
            f"{path} says {wanted} shards but {found} .tar files are there (missing: "
            f"{some(missing, sep=', ')}): an unfinished copy?"
        )


def open_eval_set(location: str) -> EvalSet:
    """Find the set at `location` (a local folder: the set, or one split folder of a
    clip_benchmark set) and tell its kind from the layout; a layout that is neither kind is a
    one-line JCError saying what is missing."""
    if "://" in location:
        raise JCError(f"evaluation sets are read from local folders; copy {location} here first")
    root = Path(location).expanduser()
    if not root.exists():
        raise JCError(f"evaluation set not found: {location}")
    if not root.is_dir():
        raise JCError(f"{location} is not a folder (an evaluation set is a folder of .tar shards)")
    path, split = _locate(root.resolve())
    shard_dir = path / split if split else path
    shards = _tars(shard_dir)
    _check_nshards(shard_dir, len(shards))
    dataset_type = ""
    if (path / DATASET_TYPE).exists():
        dataset_type = next(iter(_read_lines(path / DATASET_TYPE)), "").lower()
    if dataset_type == "multilabel":
        raise JCError(
            f"{path} is a multi-label set ({DATASET_TYPE} says multilabel), which eval does not "
            "support; use a single-label zero-shot set or a retrieval set"
        )
    if dataset_type not in ("", "classification", "retrieval"):
        raise JCError(f"{path / DATASET_TYPE} says {dataset_type!r}; expected retrieval or none")

    first = _first_sample(shards[0])
    files = first.files
    if not any(ext in files for ext in IMAGE_EXTS):
        raise JCError(
            f"{shards[0]}: sample {first.key!r} has no image (.webp, .png or .jpg; it holds "
            f"{', '.join('.' + e for e in sorted(files)) or 'nothing'})"
        )
    has_classnames = (path / CLASSNAMES).exists()
    if has_classnames and dataset_type != "retrieval":
        if "cls" not in files:
            raise JCError(
                f"{shards[0]}: sample {first.key!r} has no .cls label, but {path / CLASSNAMES} "
                "makes this a zero-shot set"
            )
        if not any(_read_lines(path / CLASSNAMES)):
            raise JCError(f"{path / CLASSNAMES} is empty: it needs one class name per line")
        kind = "zeroshot"
    elif "cls" in files and dataset_type != "retrieval":
        raise JCError(
            f"{path} has .cls labels but no {CLASSNAMES}: a zero-shot set needs "
            f"{path / CLASSNAMES}, one class name per line in label order"
        )
    elif "txt" in files:
        kind = "retrieval"
    else:
        raise JCError(
            f"{shards[0]}: sample {first.key!r} has no .txt caption (retrieval) or .cls label "
            "(zero-shot)"
        )
    return EvalSet(name=path.name, kind=kind, path=path, split=split)


# --- decoding it once -----------------------------------------------------------------------


def _templates(eval_set: EvalSet) -> list[str]:
    path = eval_set.path / TEMPLATES
    if not path.exists():
        log.warning("%s has no %s: using %r", eval_set.path, TEMPLATES, DEFAULT_TEMPLATES[0])
        return list(DEFAULT_TEMPLATES)
    templates = [t for t in _read_lines(path) if t]
    for template in templates:
        try:
            ok = "{c}" in template and template.format(c="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise JCError(f"{path}: template {template!r} needs {{c}} where the class name goes")
    if not templates:
        raise JCError(f"{path} is empty: it needs prompts such as 'a photo of a {{c}}.'")
    return templates


def _label(raw: RawSample, classes: int) -> int:
    text = raw.files["cls"].decode("utf-8", "replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise SampleError("bad label", f".cls holds {text[:20]!r}, not a class index")
    if int(text) >= classes:
        raise SampleError("bad label", f"label {text} but {CLASSNAMES} names {classes} classes")
    return int(text)


def _captions(raw: RawSample, per_line: bool) -> list[str]:
    try:
        text = raw.files["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("caption not utf-8", str(exc)) from None
    # clip_benchmark's retrieval layout holds one caption per line (str.splitlines, as its
    # loader); an img2dataset caption is the whole .txt, line breaks and all.
    captions = [c for c in text.splitlines() if c.strip()] if per_line else [text]
    if not any(c.strip() for c in captions):
        raise SampleError("missing caption", "empty .txt")
    return captions


def _samples(eval_set: EvalSet) -> Iterator[RawSample]:
    for shard in _tars(eval_set.shard_dir):
        try:
            with open(shard, "rb") as f:
                yield from iter_raw_samples(f)
        except ShardReadError as exc:
            raise JCError(f"{shard}: {exc}; an evaluation set must be readable whole") from None
        except OSError as exc:
            raise JCError(f"cannot read {shard}: {first_line(exc)}") from None


def load(
    eval_set: EvalSet, preprocess: Callable[[Any], torch.Tensor], limit: int | None = None
) -> EvalData:
    """Decode the set (its first `limit` usable samples, in shard and file order) with the
    model's eval transform. Samples that cannot be used (an undecodable image, no caption) are
    left out and counted in `skipped`; a damaged tar or a bad label is a JCError."""
    _clip_benchmark()  # refuse before decoding, not after the first training steps
    zeroshot = eval_set.kind == "zeroshot"
    classnames = _read_lines(eval_set.path / CLASSNAMES) if zeroshot else None
    templates = _templates(eval_set) if zeroshot else None
    per_line = (
        not zeroshot
        and (eval_set.path / DATASET_TYPE).exists()
        and next(iter(_read_lines(eval_set.path / DATASET_TYPE)), "").lower() == "retrieval"
    )
    images: list[torch.Tensor] = []
    keys: list[str] = []
    labels: list[int] = []
    captions: list[list[str]] = []
    skipped: dict[str, int] = {}
    for raw in _samples(eval_set):
        if limit is not None and len(keys) >= limit:
            break
        try:
            image_bytes = next((raw.files[e] for e in IMAGE_EXTS if e in raw.files), None)
            if image_bytes is None:
                raise SampleError("missing image")
            if zeroshot:
                if "cls" not in raw.files:
                    raise SampleError("missing label")
                label = _label(raw, len(classnames or ()))
            elif "txt" not in raw.files:
                raise SampleError("missing caption")
            else:
                texts = _captions(raw, per_line)
            image = load_image(image_bytes)
        except SampleError as exc:
            if exc.reason == "bad label":  # a wrong label would silently skew every score
                raise JCError(f"{eval_set.shard_dir}: sample {raw.key!r}: {exc}") from None
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        images.append(preprocess(image))
        keys.append(raw.key)
        if zeroshot:
            labels.append(label)
        else:
            captions.append(texts)
    if skipped:
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        log.warning("%s: left out %s", eval_set.name, what)
    if not keys:
        raise JCError(f"{eval_set.shard_dir} holds no usable samples")
    if not zeroshot and len(keys) < max(RECALL_KS):
        raise JCError(
            f"{eval_set.name} has {len(keys)} images; recall@{max(RECALL_KS)} needs at least "
            f"{max(RECALL_KS)}"
        )
    return EvalData(
        eval_set=eval_set,
        images=torch.stack(images),
        keys=keys,
        labels=torch.tensor(labels, dtype=torch.int64) if zeroshot else None,
        classnames=classnames,
        templates=templates,
        captions=None if zeroshot else captions,
        skipped=skipped,
    )


# --- metrics, with clip_benchmark's code ----------------------------------------------------


def _clip_benchmark() -> tuple[Any, Any]:
    """clip_benchmark's metric modules, imported only when evaluating (an optional extra; the
    import takes about a second, mostly scikit-learn)."""
    try:
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    except ImportError as exc:
        raise JCError(
            f"evaluation needs the clip-benchmark package ({first_line(exc)}): {INSTALL_HINT}"
        ) from None
    return zeroshot_classification, zeroshot_retrieval


def _no_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    return iterable


@contextlib.contextmanager
def _quiet_progress(*modules: Any) -> Iterator[None]:
    """clip_benchmark wraps every pass in a tqdm bar, with no way to turn it off; eval runs
    every K steps for every arm, so those bars would bury the training log. Swap its module's
    tqdm for a no-op while it runs."""
    saved = [module.tqdm for module in modules]
    for module in modules:
        module.tqdm = _no_bar
    try:
        yield
    finally:
        for module, bar in zip(modules, saved, strict=True):
            module.tqdm = bar


class _Captioned(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, captions: list[list[str]]) -> None:
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str]]:
        return self.images[i], self.captions[i]


def _collate_captions(batch: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list]:
    # clip_benchmark.datasets.builder.image_captions_collate_fn, written out: importing that
    # module loads every dataset clip_benchmark knows (about a second) for three lines.
    return torch.stack([image for image, _ in batch]), [texts for _, texts in batch]


def _topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """clip_benchmark's accuracy(), which its zero-shot evaluate calls, ending in .item(): it
    ends in float() of a one-element array, which numpy 2.4 refuses (TypeError)."""
    pred = logits.topk(k, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return correct[:k].reshape(-1).float().sum().item() / len(target)


def _zeroshot(
    cb: Any,
    net: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: EvalData,
    device_type: str,
    batch_size: int,
    amp: bool,
) -> dict[str, float]:
    """clip_benchmark's zero-shot evaluate, step by step (its accuracy() fails on numpy 2.4):
    the classifier rebuilt from the text tower as the model is now, its logits, then its
    metrics with its own scikit-learn balanced accuracy."""
    assert data.labels is not None and data.classnames and data.templates
    classifier = cb.zero_shot_classifier(
        net, tokenizer, data.classnames, data.templates, device_type, amp=amp
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.images, data.labels), batch_size=batch_size
    )
    logits, target = cb.run_classification(net, classifier, loader, device_type, amp=amp)
    enough = len(data.classnames) >= 5  # as clip_benchmark: acc5 is nan under five classes
    return {
        "acc1": _topk_accuracy(logits, target, 1),
        "acc5": _topk_accuracy(logits, target, 5) if enough else float("nan"),
        "mean_per_class_recall": float(cb.balanced_accuracy_score(target, logits.argmax(1))),
    }


def evaluate(
    net: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: EvalData,
    device: str = "cpu",
    batch_size: int = 256,
    amp: bool = False,
) -> dict[str, float]:
    """The set's metrics for an open_clip model (encode_image, encode_text) already on
    `device`, with clip_benchmark's own evaluate functions:

    - zeroshot: acc1, acc5 (nan under 5 classes, as clip_benchmark has it) and
      mean_per_class_recall (balanced accuracy), from a classifier built from the class names
      and templates with the model as it is now;
    - retrieval: image_retrieval_recall@K (each caption retrieves its image) and
      text_retrieval_recall@K (each image retrieves one of its captions) for K = 1, 5, 10.

    Runs under no_grad in eval mode and puts the model back in the mode it found it in. `amp`:
    clip_benchmark's autocast (float16 on CUDA, bfloat16 on CPU); off by default so that a
    score does not depend on the device's half-precision rounding.
    """
    zeroshot_classification, zeroshot_retrieval = _clip_benchmark()
    dev = torch.device(device)
    # clip_benchmark passes its device string to torch.autocast, which takes only a device
    # type ("cuda", not "cuda:1"): give it the type and make the indexed device the current one.
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), on_device, warnings.catch_warnings():
            # scikit-learn's balanced accuracy warns when a small set lacks a predicted class.
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            with _quiet_progress(zeroshot_classification, zeroshot_retrieval):
                if data.kind == "zeroshot":
                    metrics = _zeroshot(
                        zeroshot_classification, net, tokenizer, data, dev.type, batch_size, amp
                    )
                else:
                    assert data.captions is not None
                    loader = torch.utils.data.DataLoader(
                        _Captioned(data.images, data.captions),
                        batch_size=batch_size,
                        collate_fn=_collate_captions,
                    )
                    metrics = zeroshot_retrieval.evaluate(
                        net, loader, tokenizer, dev.type, amp, recall_k_list=list(RECALL_KS)
                    )
    finally:
        net.train(was_training)
    return {name: float(value) for name, value in metrics.items()}


def primary_metric(kind: str) -> str:
    """The one number per set that eval compares arms by."""
    if kind == "zeroshot":
        return "acc1"
    if kind == "retrieval":
        # Text-to-image recall@1: every caption is a query (five per image on COCO-style sets,
        # so the least noisy of the directions), and with several captions per image it is the
        # harder direction, which saturates last; a single clip_benchmark key, not a blend.
        return "image_retrieval_recall@1"
    raise ValueError(f"unknown evaluation set kind {kind!r}; expected one of {KINDS}")
