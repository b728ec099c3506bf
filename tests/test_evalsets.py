"""Evaluation sets: both layouts found, bad ones refused in one line, clip_benchmark's own writer
and reader agree with ours, and the metric wiring proven by models that are perfect by
construction."""

from __future__ import annotations

import io
import math
import shutil
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jestcurate.errors import JCError
from jestcurate.pipelines.evaluate import (
    EvalData,
    evaluate,
    load,
    open_eval_set,
    primary_metric,
)
from jestcurate.pipelines.synth import (
    CLASSES,
    CorpusSpec,
    class_name,
    draw_image,
    shard_samples,
    write_retrieval_set,
    write_tar,
    write_zeroshot_set,
)

ZEROSHOT_KEYS = {"acc1", "acc5", "mean_per_class_recall"}
RETRIEVAL_KEYS = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def zeroshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 samples over two shards (test/0.tar, test/1.tar). Read-only."""
    return write_zeroshot_set(tmp_path_factory.mktemp("zs") / "shapes", 64, 3, 32, per_shard=40)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_retrieval_set(tmp_path_factory.mktemp("ret") / "heldout", 40, 3, 32)


def pixels(image: Image.Image) -> torch.Tensor:
    """A stand-in for a model's eval transform that keeps every pixel, so a fake net can
    recognise an image exactly."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))


def one_line(exc: pytest.ExceptionInfo[JCError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# --- layouts ------------------------------------------------------------------------------


def test_layouts_detected(zeroshot: Path, retrieval: Path) -> None:
    found = open_eval_set(str(zeroshot))
    assert (found.name, found.kind, found.path, found.split) == (
        "shapes",
        "zeroshot",
        zeroshot,
        "test",
    )
    assert open_eval_set(str(zeroshot / "test")) == found  # a split folder named directly
    held_out = open_eval_set(str(retrieval))
    assert (held_out.name, held_out.kind, held_out.path, held_out.split) == (
        "heldout",
        "retrieval",
        retrieval,
        "",
    )
    assert (zeroshot / "classnames.txt").read_text().splitlines() == [
        class_name(i) for i in range(len(CLASSES))
    ]
    assert primary_metric("zeroshot") in ZEROSHOT_KEYS
    assert primary_metric("retrieval") in RETRIEVAL_KEYS


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_images(tmp: Path) -> Path:
    write_tar(tmp / "00000.tar", [{"__key__": "a", "txt": "a caption", "json": {"k": 1}}])
    return tmp


def _splits(tmp: Path, zeroshot: Path) -> Path:
    for split in ("train", "val"):
        shutil.copytree(zeroshot / "test", tmp / split)
    shutil.copy(zeroshot / "classnames.txt", tmp)
    return tmp


def _multilabel(tmp: Path, zeroshot: Path) -> Path:
    _copy(zeroshot, tmp / "set")
    (tmp / "set" / "dataset_type.txt").write_text("multilabel\n")
    return tmp / "set"


BAD: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty folder": (lambda tmp, zs: tmp, "no .tar shards in"),
    "missing": (lambda tmp, zs: tmp / "nowhere", "not found"),
    "cls without classnames": (
        lambda tmp, zs: (_copy(zs, tmp / "set") / "classnames.txt").unlink() or tmp / "set",
        ".cls labels but no classnames.txt",
    ),
    "no images": (lambda tmp, zs: _no_images(tmp), "has no image"),
    "partial copy": (
        lambda tmp, zs: (_copy(zs, tmp / "set") / "test" / "1.tar").unlink() or tmp / "set",
        "says 2 shards but 1 .tar files are there (missing: 1.tar)",
    ),
    "several splits": (_splits, "several splits (train, val)"),
    "multilabel": (_multilabel, "multi-label"),
    "not a tar": (
        lambda tmp, zs: (tmp / "0.tar").write_bytes(b"x" * 2000) and tmp,
        "not a readable tar",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layouts_one_line(case: str, tmp_path: Path, zeroshot: Path) -> None:
    make, expected = BAD[case]
    location = make(tmp_path, zeroshot)
    with pytest.raises(JCError) as exc:
        open_eval_set(str(location))
    assert expected in one_line(exc)


def test_bad_label_and_bad_template(tmp_path: Path, zeroshot: Path) -> None:
    bad = _copy(zeroshot, tmp_path / "labels")
    (bad / "classnames.txt").write_text("red circle\nblue square\n")  # labels go up to 31
    with pytest.raises(JCError) as exc:
        load(open_eval_set(str(bad)), pixels)
    assert "but classnames.txt names 2 classes" in one_line(exc)
    bad = _copy(zeroshot, tmp_path / "templates")
    (bad / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {thing}\n")
    with pytest.raises(JCError) as exc:
        load(open_eval_set(str(bad)), pixels)
    assert "needs {c}" in one_line(exc)


def test_without_clip_benchmark_one_line(zeroshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "clip_benchmark.metrics", None)
    with pytest.raises(JCError) as exc:
        load(open_eval_set(str(zeroshot)), pixels)
    assert "pip install 'jestcurate[eval]'" in one_line(exc)


def test_load_limit_and_skipped(tmp_path: Path, retrieval: Path) -> None:
    full = load(open_eval_set(str(retrieval)), pixels)
    assert len(full) == 40 and full.captions is not None and full.skipped == {}
    assert all(len(c) == 1 for c in full.captions)  # img2dataset: the whole .txt, one caption
    part = load(open_eval_set(str(retrieval)), pixels, limit=12)
    assert part.keys == full.keys[:12] and torch.equal(part.images, full.images[:12])
    samples = shard_samples(CorpusSpec(1, 12, 5, 32), 0)
    samples[3]["jpg"] = samples[3]["jpg"][:50]  # cut short: not decodable
    samples[4].pop("txt")
    write_tar(tmp_path / "00000.tar", samples)
    data = load(open_eval_set(str(tmp_path)), pixels)
    assert len(data) == 10 and data.skipped == {"image decode failed": 1, "missing caption": 1}


def test_synthetic_sets_are_held_out(tmp_path: Path, retrieval: Path) -> None:
    """Same seed as a corpus, other images: an evaluation set never repeats training data."""
    corpus = shard_samples(CorpusSpec(1, 40, 3, 32), 0)
    held_out = [s.files["jpg"] for s in _raw(retrieval / "00000.tar")]
    assert not {s["jpg"] for s in corpus} & set(held_out)


def _raw(shard: Path) -> list[Any]:
    from jestcurate.io.reader import iter_raw_samples

    with open(shard, "rb") as f:
        return list(iter_raw_samples(f))


# --- clip_benchmark's own writer and reader ---------------------------------------------------


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")
def test_clip_benchmark_reads_our_zeroshot_set(zeroshot: Path) -> None:
    from clip_benchmark.datasets.builder import build_wds_dataset

    dataset = build_wds_dataset("shapes", transform=pixels, split="test", data_dir=str(zeroshot))
    theirs = list(dataset)
    ours = load(open_eval_set(str(zeroshot)), pixels)
    assert dataset.classes == ours.classnames and dataset.templates == ours.templates
    assert len(theirs) == len(ours) == 64
    assert torch.equal(torch.stack([image for image, _ in theirs]), ours.images)
    assert [label for _, label in theirs] == ours.labels.tolist()
    assert sorted(np.bincount(ours.labels.numpy()).tolist()) == [2] * len(CLASSES)


class _Listing(list):
    """What clip_benchmark's converters take: (image, target) pairs with optional attributes."""

    classes: list[str] | None = None
    templates: list[str] | None = None


def _images(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, len(CLASSES), n)]
    return [draw_image(label, rng, 24) for label in labels], labels


@pytest.fixture(scope="module")
def written_by_clip_benchmark(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A zero-shot set and a retrieval set (two captions an image) written by clip_benchmark's
    own converters, as its wds downloads were made."""
    from clip_benchmark.webdataset_builder import (
        PIL_to_bytes,
        convert_dataset,
        convert_retrieval_dataset,
    )

    out = tmp_path_factory.mktemp("cb")
    images, labels = _images(40, 11)
    listing = _Listing(zip(images, labels, strict=True))
    listing.classes = [class_name(i) for i in range(len(CLASSES))]
    listing.templates = ["a photo of a {c}.", "art of the {c}."]
    pairs = _Listing((im, [f"caption {i} a", f"caption {i} b"]) for i, im in enumerate(images))
    with warnings.catch_warnings():
        # Its converters always start 8 loader workers; torch warns on a small machine.
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        convert_dataset(listing, "test", str(out / "zs"), transform=PIL_to_bytes("webp"))
        convert_retrieval_dataset(pairs, "test", str(out / "ret"), transform=PIL_to_bytes("webp"))
    return {"zs": out / "zs", "ret": out / "ret", "images": images, "labels": labels}


class Lookup(torch.nn.Module):
    """Perfect by construction: encode_image gives the one-hot of the class (or index) that the
    test knows for exactly these pixels, encode_text the one-hot the fake tokenizer put in the
    first token; `shift` moves every image to the wrong class."""

    def __init__(self, image_ids: dict[bytes, int], n: int, shift: int = 0) -> None:
        super().__init__()
        self.image_ids, self.n, self.shift = image_ids, n, shift
        self.scale = torch.nn.Parameter(torch.ones(()))  # so .train()/.eval() mean something

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        ids = [(self.image_ids[im.numpy().tobytes()] + self.shift) % self.n for im in images]
        return F.one_hot(torch.tensor(ids), self.n).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], self.n).float()


def class_tokenizer(classnames: list[str]) -> Callable[[list[str]], torch.Tensor]:
    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = []
        for text in texts:
            named = [i for i, name in enumerate(classnames) if f" {name}" in f" {text}"]
            assert len(named) == 1, text
            ids.append([named[0]])
        return torch.tensor(ids)

    return tokenize


def caption_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[int(text.split()[1])] for text in texts])  # "caption 7 b" -> 7


def _truth_from_tars(folder: Path) -> dict[bytes, int]:
    """Pixels -> label, read from the tars with tarfile and PIL alone (not the code tested)."""
    truth: dict[bytes, int] = {}
    for shard in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
        for files in members.values():
            image = pixels(Image.open(io.BytesIO(files["webp"])))
            truth[image.numpy().tobytes()] = int(files["cls"].decode())
    return truth


def test_perfect_zeroshot_model_scores_one(zeroshot: Path) -> None:
    data = load(open_eval_set(str(zeroshot)), pixels)
    truth = _truth_from_tars(zeroshot / "test")
    tokenize = class_tokenizer([class_name(i) for i in range(len(CLASSES))])
    perfect = evaluate(Lookup(truth, len(CLASSES)), tokenize, data, batch_size=24)
    assert perfect == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    wrong = evaluate(Lookup(truth, len(CLASSES), shift=1), tokenize, data, batch_size=24)
    assert wrong["acc1"] == 0.0 and wrong["mean_per_class_recall"] == 0.0


def test_perfect_models_on_sets_clip_benchmark_wrote(written_by_clip_benchmark: dict) -> None:
    cb = written_by_clip_benchmark
    zs = open_eval_set(str(cb["zs"]))
    assert (zs.kind, zs.split) == ("zeroshot", "test")
    data = load(zs, pixels)
    assert data.templates == ["a photo of a {c}.", "art of the {c}."]
    assert data.labels.tolist() == cb["labels"] and data.keys[:2] == ["s0000000", "s0000001"]
    truth = {
        pixels(im).numpy().tobytes(): label
        for im, label in zip(cb["images"], cb["labels"], strict=True)
    }
    tokenize = class_tokenizer(data.classnames)
    assert evaluate(Lookup(truth, len(CLASSES)), tokenize, data)["acc1"] == 1.0

    ret = open_eval_set(str(cb["ret"]))
    assert (ret.kind, ret.split) == ("retrieval", "test")
    data = load(ret, pixels)
    assert data.captions[7] == ["caption 7 a", "caption 7 b"]  # one caption per line
    index = {pixels(im).numpy().tobytes(): i for i, im in enumerate(cb["images"])}
    scores = evaluate(Lookup(index, len(index)), caption_tokenizer, data, batch_size=16)
    assert scores == dict.fromkeys(RETRIEVAL_KEYS, 1.0)
    # Each caption points at the next image: nothing is found at rank 1.
    worse = evaluate(Lookup(index, len(index), shift=1), caption_tokenizer, data, batch_size=16)
    assert worse["image_retrieval_recall@1"] == worse["text_retrieval_recall@1"] == 0.0


# --- a real (random) open_clip model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Iterator[Any]:
    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec

    # Dozens of tiny forward passes: one thread, or a busy 2-core machine makes them 10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), warn_random=False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["zeroshot", "retrieval"])
def test_random_tiny_model(kind: str, tiny: Any, zeroshot: Path, retrieval: Path) -> None:
    data: EvalData = load(
        open_eval_set(str(zeroshot if kind == "zeroshot" else retrieval)), tiny.preprocess
    )
    assert data.images.shape[1:] == (3, 64, 64)
    net = tiny.model.train()
    first = evaluate(net, tiny.tokenizer, data, batch_size=16)
    assert net.training  # put back as found
    assert set(first) == (ZEROSHOT_KEYS if kind == "zeroshot" else RETRIEVAL_KEYS)
    assert all(0.0 <= v <= 1.0 for v in first.values()), first
    assert evaluate(net.eval(), tiny.tokenizer, data, batch_size=16) == first  # deterministic
    assert not net.training
    assert not math.isnan(first[primary_metric(kind)])
