"""Synthetic img2dataset-style corpora for tests, benchmarks and the demo: no downloads.

Each image shows one coloured shape; the class of a sample is its (colour, shape) pair. A clean
sample's caption names that class, so a tiny CLIP model can learn the pairing in minutes. Noisy
kinds copy what makes web data hard: captions of another class ("mismatched"), boilerplate that
names nothing ("junk"), blank images with a class caption ("blank") and exact copies of an
earlier sample ("duplicate"). The kind and true class of every sample are in its .json, so a
curation method can be scored against the truth.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
