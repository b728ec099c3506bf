"""Synthetic img2dataset-style corpora for tests, benchmarks and the demo: no downloads.

Each image shows one coloured shape; the class of a sample is its (colour, shape) pair. A clean
sample's caption names that class, so a tiny CLIP model can learn the pairing in minutes. Noisy
kinds copy what makes web data hard: captions of another class ("mismatched"), boilerplate that
names nothing ("junk"), blank images with a class caption ("blank") and exact copies of an
earlier sample ("duplicate"). The kind and true class of every sample are in its .json, so a
curation method can be scored against the truth.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from jestcurate.io.store import atomic_write

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLORS for s in SHAPES]
NOISE_KINDS = ("clean", "mismatched", "junk", "blank", "duplicate")
PRESETS: dict[str, dict[str, float]] = {
    "clean": {"clean": 1.0},
    # Roughly the mix a raw web scrape shows after basic URL filtering.
    "noisy": {"clean": 0.4, "mismatched": 0.25, "junk": 0.15, "blank": 0.1, "duplicate": 0.1},
}
_TEMPLATES = (
    "a photo of a {color} {shape}",
    "a {color} {shape}",
    "{color} {shape} on a plain background",
    "a picture showing a {color} {shape}",
    "an image of a {shape} that is {color}",
)
_JUNK = (
    "IMG_{n:04d}.jpg",
    "click here to buy now",
    "free shipping on all orders",
    "untitled",
    "stock photo {n}",
    "lorem ipsum dolor sit amet",
    "product image",
    "DSC{n:05d}",
    "download wallpaper hd",
    "home | about | contact",
)


def class_caption(label: int, rng: np.random.Generator) -> str:
    color, shape = CLASSES[label]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(color=color, shape=shape)


def draw_image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    color, shape = CLASSES[label]
    gray = int(rng.integers(90, 170))
    background = np.full((size, size, 3), gray, dtype=np.int16)
    background += rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    extent = int(size * rng.uniform(0.35, 0.7))
    x0 = int(rng.integers(0, size - extent + 1))
    y0 = int(rng.integers(0, size - extent + 1))
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill)
    else:
        bar = max(2, extent // 4)
        mid_x, mid_y = x0 + extent // 2, y0 + extent // 2
        draw.rectangle((mid_x - bar // 2, y0, mid_x + bar // 2, y0 + extent), fill=fill)
        draw.rectangle((x0, mid_y - bar // 2, x0 + extent, mid_y + bar // 2), fill=fill)
    return image


def blank_image(rng: np.random.Generator, size: int) -> Image.Image:
    value = int(rng.choice([0, 128, 255]))
    return Image.new("RGB", (size, size), (value, value, value))


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        params.setdefault("quality", 90)
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def colour_field(rng: np.random.Generator, size: int, cells: int = 4) -> Image.Image:
    """A smooth field of random colours (cells x cells of them, interpolated): every one
    distinct, unlike the shapes, whose images of one class differ little. The evaluation
    images of the decontamination tests."""
    small = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def near_copy(
    image_bytes: bytes, rng: np.random.Generator, crop: int = 4, quality: tuple[int, int] = (55, 80)
) -> bytes:
    """An image re-cropped by 1 to `crop` pixels on each side and re-encoded as a JPEG at a
    quality drawn from `quality`: what a copy of an evaluation image found on the web looks like."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    width, height = image.size
    left, top, right, bottom = (int(v) for v in rng.integers(1, crop + 1, size=4))
    image = image.crop((left, top, width - right, height - bottom))
    return encode(image, quality=int(rng.integers(quality[0], quality[1] + 1)))


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate. `noise` maps kinds to fractions (normalised); `first_shard` offsets
    shard numbers and keys so several splits can share a key space."""

    shards: int = 4
    samples_per_shard: int = 100
    seed: int = 0
    image_size: int = 96
    noise: Mapping[str, float] = field(default_factory=lambda: dict(PRESETS["clean"]))
    first_shard: int = 0
    stream: int = 0  # nonzero: a random stream of its own, never a corpus's with the same seed


def _kinds(noise: Mapping[str, float], n: int, rng: np.random.Generator) -> list[str]:
    unknown = set(noise) - set(NOISE_KINDS)
    if unknown:
        raise ValueError(f"unknown noise kinds: {sorted(unknown)}")
    names = list(noise)
    weights = np.array([noise[k] for k in names], dtype=float)
    return [names[i] for i in rng.choice(len(names), size=n, p=weights / weights.sum())]


def shard_samples(spec: CorpusSpec, shard: int) -> list[dict[str, Any]]:
    """The samples of one shard as webdataset dicts, reproducible from (seed, shard) alone."""
    rng = np.random.default_rng(
        [spec.seed, shard, spec.stream] if spec.stream else [spec.seed, shard]
    )
    samples: list[dict[str, Any]] = []
    for i, kind in enumerate(_kinds(spec.noise, spec.samples_per_shard, rng)):
        key = f"{shard:05d}{i:04d}"
        if kind == "duplicate" and not samples:
            kind = "clean"  # nothing earlier in the shard to copy
        label = int(rng.integers(len(CLASSES)))
        caption_label = label
        meta: dict[str, Any] = {}
        if kind == "duplicate":
            source = samples[int(rng.integers(len(samples)))]
            image_bytes, caption = source["jpg"], source["txt"]
            label, caption_label = source["json"]["jc_label"], source["json"]["jc_caption_label"]
            meta["jc_duplicate_of"] = source["__key__"]
        else:
            if kind == "mismatched":
                caption_label = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
            if kind == "blank":
                image_bytes = encode(blank_image(rng, spec.image_size))
            else:
                image_bytes = encode(draw_image(label, rng, spec.image_size))
            if kind == "junk":
                caption_label = -1
                caption = _JUNK[int(rng.integers(len(_JUNK)))].format(n=int(rng.integers(1e5)))
            else:
                caption = class_caption(caption_label, rng)
            if kind == "blank":
                label = -1
        meta = {
            "key": key,
            "url": f"https://images.example.invalid/{key}.jpg",
            "caption": caption,
            "uid": rng.bytes(16).hex(),
            "status": "success",
            "width": spec.image_size,
            "height": spec.image_size,
            "jc_kind": kind,
            "jc_label": label,
            "jc_caption_label": caption_label,
            **meta,
        }
        samples.append({"__key__": key, "jpg": image_bytes, "txt": caption, "json": meta})
    return samples


def write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """Write webdataset samples (values: bytes, str or JSON-able dict) to a tar, atomically."""
    import webdataset as wds

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, mtime=0)  # fixed mtime: same seed, same bytes
            for sample in samples:
                writer.write(
                    {
                        k: json.dumps(v).encode() if isinstance(v, dict) else v
                        for k, v in sample.items()
                    }
                )
            writer.close()

    atomic_write(path, write)


def write_corpus(out_dir: str | os.PathLike[str], spec: CorpusSpec) -> list[Path]:
    """Write spec.shards tars named 00000.tar, 00001.tar, ... (offset by first_shard)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(spec.first_shard, spec.first_shard + spec.shards):
        path = out / f"{shard:05d}.tar"
        write_tar(path, shard_samples(spec, shard))
        paths.append(path)
    return paths


# --- evaluation sets, in the layouts `jestcurate eval` reads ---------------------------------

# Stream tags: an evaluation set never repeats the images of a corpus made with the same seed.
_ZEROSHOT_STREAM = 0xE7A1
_RETRIEVAL_STREAM = 0xE7A2
_LOSSLESS = {"lossless": True, "method": 0}
EVAL_TEMPLATES = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture showing a {c}.",
    "a {c} on a plain background.",
)


def class_name(label: int) -> str:
    color, shape = CLASSES[label]
    return f"{color} {shape}"


def _lines(path: Path, lines: list[str] | tuple[str, ...]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_zeroshot_set(
    folder: str | os.PathLike[str],
    samples: int,
    seed: int,
    image_size: int = 64,
    per_shard: int = 1000,
) -> Path:
    """A zero-shot classification set in clip_benchmark's WebDataset layout, as its
    clip_benchmark_export_wds writes one: classnames.txt, zeroshot_classification_templates.txt,
    test/0.tar, 1.tar, ... (keys s0000000, ..., lossless .webp, .cls the label as text) and
    test/nshards.txt. Classes are balanced; returns the folder."""
    out = Path(folder)
    (out / "test").mkdir(parents=True, exist_ok=True)
    _lines(out / "classnames.txt", [class_name(i) for i in range(len(CLASSES))])
    _lines(out / "zeroshot_classification_templates.txt", EVAL_TEMPLATES)
    labels = np.random.default_rng([seed, _ZEROSHOT_STREAM]).permutation(
        np.arange(samples) % len(CLASSES)
    )
    shards = max(1, math.ceil(samples / per_shard))
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard, _ZEROSHOT_STREAM])
        records = [
            {
                "__key__": f"s{i:07d}",
                # Lossless, as clip_benchmark's converter writes; method 0: same pixels, 10x faster.
                "webp": encode(draw_image(int(labels[i]), rng, image_size), "WEBP", **_LOSSLESS),
                "cls": int(labels[i]),  # webdataset's cls encoder writes str(label)
            }
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard))
        ]
        write_tar(out / "test" / f"{shard}.tar", records)
    _lines(out / "test" / "nshards.txt", [str(shards)])
    return out


def write_retrieval_set(
    folder: str | os.PathLike[str],
    samples: int,
    seed: int,
    image_size: int = 64,
    per_shard: int = 1000,
) -> Path:
    """A held-out image-text split for retrieval: clean samples as write_corpus makes them
    (img2dataset layout, 00000.tar, ... in the folder itself, one caption per image), from a
    stream of their own so no corpus with the same seed contains them. Returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(max(1, math.ceil(samples / per_shard))):
        count = min(per_shard, samples - shard * per_shard)
        spec = CorpusSpec(1, count, seed, image_size, stream=_RETRIEVAL_STREAM)
        write_tar(out / f"{shard:05d}.tar", shard_samples(spec, shard))
    return out


# --- evaluation images planted in a pool, for the decontamination tests ----------------------


@dataclass(frozen=True)
class Plant:
    """Where write_plant put things: the evaluation tars, the pool's tars, and the pool's
    (shard path, key) of each planted near copy with the evaluation key it copies, and of every
    other pool sample by kind ("shapes": the synthetic corpus, "fields": colour fields that
    copy no evaluation image)."""

    eval_dir: Path
    pool_dir: Path
    planted: dict[tuple[str, str], str]
    others: dict[str, set[tuple[str, str]]]


def write_plant(
    out_dir: str | os.PathLike[str],
    eval_images: int = 200,
    planted: int = 100,
    fields: int = 200,
    shapes: CorpusSpec | None = None,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 100,
) -> Plant:
    """An evaluation set of `eval_images` colour fields (class captions, as a retrieval set's),
    and a pool of a shapes corpus plus `fields` other colour fields and near copies (near_copy:
    re-cropped, re-encoded at another quality) of `planted` evaluation images under captions
    of their own, copies and other fields shuffled together into their own shards."""
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 29])
    samples = []
    for i in range(eval_images):
        key = f"eval{i:06d}"
        caption = class_caption(int(rng.integers(len(CLASSES))), rng)
        image = encode(colour_field(rng, size))
        samples.append({"__key__": key, "jpg": image, "txt": caption, "json": {"key": key}})
    eval_dir, pool_dir = out / "eval", out / "pool"
    for dirs in (eval_dir, pool_dir):
        dirs.mkdir(parents=True, exist_ok=True)
    for n, first in enumerate(range(0, eval_images, samples_per_shard)):
        write_tar(eval_dir / f"{n:05d}.tar", samples[first : first + samples_per_shard])
    spec = shapes or CorpusSpec(shards=4, samples_per_shard=samples_per_shard, seed=seed,
                                image_size=size, noise=dict(PRESETS["noisy"]))  # fmt: skip
    others: dict[str, set[tuple[str, str]]] = {"shapes": set(), "fields": set()}
    for path in write_corpus(pool_dir, spec):
        keys = [s["__key__"] for s in shard_samples(spec, int(path.stem))]
        others["shapes"].update((str(path.resolve()), k) for k in keys)
    copies = rng.choice(eval_images, size=planted, replace=False)
    mixed: list[tuple[str, dict[str, Any]]] = []
    for i in copies.tolist():
        image = near_copy(samples[i]["jpg"], rng)
        mixed.append((samples[i]["__key__"], {"jpg": image, "txt": _JUNK[i % len(_JUNK)]}))
    for _ in range(fields):
        caption = class_caption(int(rng.integers(len(CLASSES))), rng)
        mixed.append(("", {"jpg": encode(colour_field(rng, size)), "txt": caption}))
    order = rng.permutation(len(mixed))
    found: dict[tuple[str, str], str] = {}
    first_shard = spec.first_shard + spec.shards
    for n, start in enumerate(range(0, len(mixed), samples_per_shard)):
        path = pool_dir / f"{first_shard + n:05d}.tar"
        shard = []
        for j in order[start : start + samples_per_shard].tolist():
            copied, sample = mixed[j]
            key = f"{first_shard + n:05d}{len(shard):04d}"
            shard.append({"__key__": key, **sample, "json": {"key": key}})
            if copied:
                found[(str(path.resolve()), key)] = copied
            else:
                others["fields"].add((str(path.resolve()), key))
        write_tar(path, shard)
    return Plant(eval_dir, pool_dir, found, others)


# --- hostile input, for the error-handling tests --------------------------------------------


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def hostile_samples(seed: int = 0, size: int = 48) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Samples covering every bad-input case, with the expected outcome per key: "ok" or the
    error reason the reader must report."""
    rng = np.random.default_rng(seed)

    def good(label: int = 0) -> Image.Image:
        return draw_image(label, rng, size)

    palette = good(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    valid_jpg = encode(good(1))
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ok", {"jpg": valid_jpg, "txt": "a green circle"}),
        ("image decode failed", {"jpg": valid_jpg[: len(valid_jpg) // 2], "txt": "cut short"}),
        ("image decode failed", {"jpg": rng.bytes(300), "txt": "random bytes"}),
        ("missing image", {"txt": "caption without an image"}),
        ("missing caption", {"jpg": encode(good(2))}),
        ("caption not utf-8", {"jpg": encode(good(4)), "txt": b"caf\xe9 \xff\xfe"}),
        ("image too large", {"png": png_with_header(100_000, 100_000), "txt": "bomb"}),
        ("image too large", {"png": png_with_header(10_000, 10_000), "txt": "big header"}),
        ("ok", {"png": encode(good(5).convert("RGBA"), "PNG"), "txt": "an rgba png"}),
        ("ok", {"jpg": encode(good(6).convert("CMYK")), "txt": "a cmyk jpeg"}),
        ("ok", {"jpg": encode(good(7).convert("L")), "txt": "a grayscale jpeg"}),
        ("ok", {"png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "txt": "one pixel"}),
        ("ok", {"png": encode(palette, "PNG"), "txt": "a palette png with transparency"}),
        ("ok", {"webp": encode(good(8), "WEBP"), "txt": "a webp"}),
        ("invalid json", {"jpg": encode(good(9)), "txt": "bad json", "json": b"{not json"}),
        ("ok", {"jpg": encode(good(10)), "json": {"caption": "caption only in the json"}}),
        ("ok", {"jpg": encode(good(11)), "txt": ""}),
    ]
    samples = []
    expected: dict[str, str] = {}
    for i, (outcome, files) in enumerate(cases):
        key = f"h{i:04d}"
        meta = files.pop("json", None)
        if meta is None:
            meta = {"key": key, "url": f"https://hostile.example.invalid/{key}", "uid": f"{i:032x}"}
        samples.append({"__key__": key, "json": meta, **files})
        expected[key] = outcome
    # A key seen again later in the shard: the second copy is an error row.
    samples.append({"__key__": "h0000", "jpg": valid_jpg, "txt": "same key again"})
    return samples, expected


def write_truncated_tar(path: Path, samples: list[dict[str, Any]], keep: float) -> None:
    """Write the tar, then cut it to `keep` of its size, as an interrupted download leaves it."""
    write_tar(path, samples)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- synthetic score sets, for select's tests and benchmarks --------------------------------


def write_score_set(
    out: str | os.PathLike[str],
    shards: int,
    rows_per_shard: int,
    dim: int = 64,
    seed: int = 0,
    role: str = "reference",
    loss: str = "softmax",
    logit_scale: float = 20.0,
    noisy_fraction: float = 0.5,
    error_fraction: float = 0.0,
    noise: float = 0.3,
    exact_losses: bool = True,
) -> set[str]:
    """Write a score set (the same files `score` writes) without any model: clean rows have a
    caption embedding near the image's, noisy rows an unrelated one. Shard and key layout match
    write_corpus's, so two sets made with different `role`/`seed` join. Returns the noisy keys.

    The corpus side (which rows are noisy, keys, uids) depends on `shards` and
    `rows_per_shard` only; `seed` changes the embeddings, as a different model would.
    `exact_losses=False` stores -logit_scale * clip_score as ref_loss instead of the shard-level
    loss (whose n x n cost dominates at benchmark sizes); meta.json says so.
    """
    from jestcurate.io.store import SCHEMA_VERSION, write_json_atomic, write_part

    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    bias = -10.0 if loss == "sigmoid" else None
    meta = {
        "schema_version": SCHEMA_VERSION,
        "role": role,
        "model": f"synthetic-{dim}",
        "model_config_path": None,
        "model_config_sha256": None,
        "pretrained": None,
        "pretrained_sha256": None,
        "init_seed": seed,
        "embed_dim": dim,
        "logit_scale": logit_scale,
        "logit_bias": bias,
        "loss": loss,
        "precision": "fp32",
        "preprocess": {},
        "context_length": 0,
        "ref_loss": "synthetic" if exact_losses else "synthetic stand-in: -logit_scale * clip",
        "tool": "jestcurate",
        "tool_version": "synthetic",
    }
    write_json_atomic(out / "meta.json", meta)
    noisy_keys: set[str] = set()
    for shard in range(shards):
        corpus = np.random.default_rng([shard, 1])  # what the data is
        model = np.random.default_rng([seed, shard, 2])  # how this "model" embeds it
        n = rows_per_shard
        noisy = corpus.random(n) < noisy_fraction
        errors = corpus.random(n) < error_fraction
        uids = corpus.bytes(16 * n).hex()
        concept = model.standard_normal((n, dim), dtype=np.float32)
        img = concept + noise * model.standard_normal((n, dim), dtype=np.float32)
        txt = concept + noise * model.standard_normal((n, dim), dtype=np.float32)
        txt[noisy] = model.standard_normal((int(noisy.sum()), dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        name = f"{shard:05d}"
        noisy_keys.update(f"{name}{i:04d}" for i in np.flatnonzero(noisy))
        rows = [
            {
                "key": f"{name}{i:04d}",
                "index": i,
                "uid": uids[32 * i : 32 * (i + 1)],
                "url": None,
                "caption": None,
                "sha256": None,
                "status": "error" if errors[i] else "ok",
                "error": "image decode failed: synthetic" if errors[i] else None,
            }
            for i in range(n)
        ]
        scores = (logit_scale, bias, loss, exact_losses)
        table = _synthetic_part(name, rows, img[~errors], txt[~errors], scores, dim)
        digest = write_part(out / "parts" / f"{name}.parquet", table)
        marker = {"shard": f"/synthetic/{name}.tar", "name": name, "status": "ok", "error": None,
                  **digest}  # fmt: skip
        write_json_atomic(out / "done" / f"{name}.json", marker)
    return noisy_keys


def _synthetic_part(
    name: str, rows: list[dict[str, Any]], img: np.ndarray, txt: np.ndarray, scores: tuple, dim: int
) -> Any:
    """A part table of the ok rows' float16 embeddings and the scores `score` would compute
    from them (or, without exact losses, -logit_scale * clip_score as ref_loss)."""
    import torch

    from jestcurate.io.store import part_table
    from jestcurate.math.scoring import clip_scores, example_losses

    logit_scale, bias, loss, exact_losses = scores
    img16 = torch.from_numpy(img).half()
    txt16 = torch.from_numpy(txt).half()
    clip = clip_scores(img16, txt16)
    if exact_losses:
        losses = example_losses(img16, txt16, logit_scale, bias, loss)
    else:
        losses = -logit_scale * clip
    table = part_table(
        f"/synthetic/{name}.tar", rows, img16.numpy(), txt16.numpy(), clip.numpy(),
        losses.numpy(), dim,
    )  # fmt: skip
    return table


def plant_duplicates(
    score_set: str | os.PathLike[str],
    exact: float,
    near: float,
    similarity: float = 0.98,
    seed: int = 0,
) -> list[set[tuple[str, str]]]:
    """Rewrite a synthetic score set so that a fraction `exact` of its ok rows are exact copies
    of other rows (same image hash, embeddings and scores) and a fraction `near` are near copies
    (an image embedding at cosine `similarity` to the source's, their own caption), sources and
    copies spread over all shards. Every ok row gets an image hash. For dedup tests and
    benchmarks; ref_loss of near copies is left as it was.

    Returns the planted groups, each the (shard, key) of a source and all its copies.
    """
    import pyarrow.parquet as pq

    from jestcurate.io.store import (
        embedding_column,
        embedding_matrix,
        score_column,
        write_json_atomic,
        write_part,
    )

    parts = sorted(Path(score_set, "parts").glob("*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    img = [embedding_matrix(t.column("img_emb")) for t in tables]
    txt = [embedding_matrix(t.column("txt_emb")) for t in tables]
    clip = [t.column("clip_score").to_numpy(zero_copy_only=False).copy() for t in tables]
    loss = [t.column("ref_loss").to_numpy(zero_copy_only=False).copy() for t in tables]
    sha = [
        [
            hashlib.sha256(f"{s}/{k}".encode()).hexdigest() if status == "ok" else None
            for s, k, status in zip(
                t.column("shard").to_pylist(),
                t.column("key").to_pylist(),
                t.column("status").to_pylist(),
                strict=True,
            )
        ]
        for t in tables
    ]
    where = [
        (p, i)
        for p, t in enumerate(tables)
        for i, status in enumerate(t.column("status").to_pylist())
        if status == "ok"
    ]
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(where))
    n_exact, n_near = int(exact * len(where)), int(near * len(where))
    pool = order[n_exact + n_near :]  # rows left as they were: the only sources
    sources = pool[rng.integers(0, len(pool), size=n_exact + n_near)]
    groups: dict[int, set[tuple[str, str]]] = {}

    def ident(row: int) -> tuple[str, str]:
        p, i = where[row]
        return tables[p].column("shard")[i].as_py(), tables[p].column("key")[i].as_py()

    for j, (copy, source) in enumerate(zip(order[: n_exact + n_near], sources, strict=True)):
        (cp, ci), (sp, si) = where[copy], where[source]
        if j < n_exact:
            img[cp][ci], txt[cp][ci] = img[sp][si], txt[sp][si]
            clip[cp][ci], loss[cp][ci], sha[cp][ci] = clip[sp][si], loss[sp][si], sha[sp][si]
        else:
            src = img[sp][si] / np.linalg.norm(img[sp][si])
            side = rng.standard_normal(len(src)).astype(np.float32)
            side -= (side @ src) * src  # orthogonal to the source
            side /= np.linalg.norm(side)
            new = similarity * src + math.sqrt(1 - similarity**2) * side
            img[cp][ci] = new
            clip[cp][ci] = float(new @ txt[cp][ci] / np.linalg.norm(txt[cp][ci]))
        groups.setdefault(int(source), {ident(source)}).add(ident(copy))

    for p, (path, table) in enumerate(zip(parts, tables, strict=True)):
        ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
        dim = img[p].shape[1]
        replace = {
            "sha256": pa.array(sha[p], pa.string()),
            "img_emb": embedding_column(img[p][ok], ok, dim),
            "txt_emb": embedding_column(txt[p][ok], ok, dim),
            "clip_score": score_column(clip[p][ok], ok),
            "ref_loss": score_column(loss[p][ok], ok),
        }
        for name, column in replace.items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        marker_path = Path(score_set, "done", f"{path.stem}.json")
        marker = json.loads(marker_path.read_text())
        write_json_atomic(marker_path, {**marker, **write_part(path, table)})
    return list(groups.values())
