"""Evaluation sets in the layouts `jestcurate eval` reads, and evaluation images planted in a
pool for the decontamination tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jestcurate.pipelines.synth.corpus import (
    _JUNK,
    CLASSES,
    PRESETS,
    CorpusSpec,
    class_caption,
    colour_field,
    draw_image,
    encode,
    near_copy,
    shard_samples,
    write_corpus,
    write_tar,
)

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
    templates: tuple[str, ...] = EVAL_TEMPLATES,
) -> Path:
    """A zero-shot classification set in clip_benchmark's WebDataset layout, as its
    clip_benchmark_export_wds writes one: classnames.txt, zeroshot_classification_templates.txt,
    test/0.tar, 1.tar, ... (keys s0000000, ..., lossless .webp, .cls the label as text) and
    test/nshards.txt. Classes are balanced; returns the folder."""
    out = Path(folder)
    (out / "test").mkdir(parents=True, exist_ok=True)
    _lines(out / "classnames.txt", [class_name(i) for i in range(len(CLASSES))])
    _lines(out / "zeroshot_classification_templates.txt", templates)
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
