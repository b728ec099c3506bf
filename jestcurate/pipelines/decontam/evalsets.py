"""The evaluation sets a pool is checked against: each one's unit image embeddings and, where its
samples have captions, its (image, caption) pairs. An evaluation set is a score set made by
`jestcurate score` with the pool's model, or WebDataset tars (a folder of them, clip_benchmark's
layout with its test/ folder, a pattern, a list) embedded here with the pool's model."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.identity import MODEL_FIELDS, identity_mismatches
from jestcurate.io.reader import ShardReadError, iter_raw_samples, parse_sample
from jestcurate.io.schema import META_NAME, embedding_matrix
from jestcurate.io.shards import expand_inputs, open_shard, shard_size
from jestcurate.io.store import ScoreSet, fingerprint, model_difference, open_score_set

SCORE_SET, SHARDS = "score set", "shards"
CLIP_BENCHMARK_SPLIT = "test"  # clip_benchmark's webdataset layout: NAME/test/*.tar


@dataclass(frozen=True)
class Located:
    """An --against location: what it is and what identifies its content (for reruns)."""

    name: str
    location: str
    kind: str  # SCORE_SET or SHARDS
    shards: tuple[str, ...] = ()  # SHARDS: the tars
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    """One evaluation set's vectors, float32 with unit rows."""

    located: Located
    shards: list[str]  # per item: its shard
    keys: list[str]  # per item: its key
    images: np.ndarray  # (M, D)
    pair_item: np.ndarray  # (P,): the item each caption belongs to
    pairs: np.ndarray  # (P, 2D): [image, caption] / sqrt(2), so a dot is the mean of two cosines
    skipped: int = 0  # samples without a usable image (error rows, missing or broken images)

    @property
    def name(self) -> str:
        return self.located.name


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def pair_vectors(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """[image, caption] / sqrt(2) of unit rows: the dot of two is the mean of the two cosines."""
    return np.ascontiguousarray(np.concatenate([images, captions], axis=1) / math.sqrt(2))


def locate(locations: tuple[str, ...], pool: ScoreSet) -> list[Located]:
    """What each --against names, checked: a score set of the pool's model, or tars."""
    if not locations:
        raise JCError("give at least one --against evaluation set")
    found = []
    for location in locations:
        path = Path(location.removeprefix("file://"))
        if (path / META_NAME).is_file():
            found.append(_score_set(location, path, pool))
        else:
            found.append(_tars(location, path))
    names = [f.name for f in found]
    return [f if names.count(f.name) == 1 else _renamed(f) for f in found]


def _renamed(found: Located) -> Located:
    """Two sets of one name (evals/a/test, evals/b/test) get a short hash of their location."""
    digest = hashlib.sha1(found.location.encode()).hexdigest()[:8]
    return dataclasses.replace(found, name=f"{found.name}-{digest}")


def _score_set(location: str, path: Path, pool: ScoreSet) -> Located:
    scores = open_score_set(path)
    shown = model_difference(pool, scores)
    if shown:
        raise JCError(
            f"--against {location} was scored with another model than {pool.path} ({shown}); "
            "score the evaluation images with the pool's model and checkpoint, or give their tars"
        )
    return Located(path.resolve().name, str(path.resolve()), SCORE_SET,
                   identity={"scores": fingerprint(scores)})  # fmt: skip


def _tars(location: str, path: Path) -> Located:
    split = path / CLIP_BENCHMARK_SPLIT
    looked = location
    if path.is_dir() and not any(path.glob("*.tar")) and split.is_dir():
        looked = str(split)  # clip_benchmark: NAME/test/0.tar, NAME/classnames.txt
    try:
        urls = expand_inputs([looked])
    except JCError as exc:
        raise JCError(
            f"--against {location} is neither a score set (no {META_NAME}) nor WebDataset tars "
            f"({exc})"
        ) from None
    name = path.name if path.is_dir() else Path(urls[0]).parent.name
    sizes = [[url, shard_size(url)] for url in urls]
    return Located(name or "eval", location, SHARDS, tuple(urls), {"shards": sizes})


def read_score_set(found: Located) -> EvalSet:
    """The ok rows of an evaluation score set: image embeddings, and each row's caption pair."""
    scores = open_score_set(Path(found.location))
    shards: list[str] = []
    keys: list[str] = []
    images, captions, skipped = [], [], 0
    for name in scores.part_names():
        table = scores.read_part(name, ["key", "shard", "status", "img_emb", "txt_emb"])
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        skipped += table.num_rows - ok.num_rows
        img = embedding_matrix(ok.column("img_emb"))
        usable = np.isfinite(img).all(axis=1)
        skipped += int((~usable).sum())
        keep = np.flatnonzero(usable)
        names, row_keys = ok.column("shard").to_pylist(), ok.column("key").to_pylist()
        shards += [names[i] for i in keep.tolist()]
        keys += [row_keys[i] for i in keep.tolist()]
        images.append(img[keep])
        captions.append(embedding_matrix(ok.column("txt_emb"))[keep])
    if not keys:
        raise JCError(f"--against {found.location} has no rows with status ok")
    image = unit(np.concatenate(images))
    caption = np.concatenate(captions)
    has = np.flatnonzero(np.isfinite(caption).all(axis=1))
    pairs = pair_vectors(image[has], unit(caption[has]))
    return EvalSet(found, shards, keys, image, has.astype(np.int64), pairs, skipped)


class Embedder:
    """Embeds tars with the pool's model: images through its eval preprocessing, each caption
    line (a .txt or the json's caption; several lines are several captions) through its text
    tower. One process; evaluation sets are small beside a pool."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size

    def embed(self, found: Located, tick: Callable[[], None]) -> EvalSet:
        import torch

        shards: list[str] = []
        keys: list[str] = []
        images: list[np.ndarray] = []
        captions: list[np.ndarray] = []
        pair_item: list[int] = []
        pending: list[Any] = []
        texts: list[str] = []
        skipped = 0

        def flush() -> None:
            if pending:
                batch = torch.stack(pending)
                images.append(self.model.encode_image(batch).cpu().numpy())
                pending.clear()
            for first in range(0, len(texts), self.batch_size):
                tokens = self.model.tokenizer(texts[first : first + self.batch_size])
                captions.append(self.model.encode_text(tokens).cpu().numpy())
            texts.clear()

        for url in found.shards:
            seen: set[str] = set()
            try:
                with open_shard(url) as f:
                    for raw in iter_raw_samples(f):
                        row, image = parse_sample(raw, seen, need_caption=False)
                        if image is None:
                            skipped += 1
                            continue
                        item = len(keys)
                        shards.append(url)
                        keys.append(row["key"])
                        pending.append(self.model.preprocess(image))
                        lines = (row["caption"] or "").splitlines()
                        for line in (t.strip() for t in lines):
                            if line:
                                texts.append(line)
                                pair_item.append(item)
                        if len(pending) >= self.batch_size:
                            flush()
            except (ShardReadError, OSError) as exc:
                raise JCError(
                    f"--against {found.location}: {url} is unreadable ({exc}); every evaluation "
                    "image must be checked, so fix or remove it"
                ) from None
            tick()
        flush()
        if not keys:
            raise JCError(f"--against {found.location} holds no readable images")
        image = unit(np.concatenate(images))
        items = np.array(pair_item, dtype=np.int64)
        dim = image.shape[1]
        caption = unit(np.concatenate(captions)) if captions else np.zeros((0, dim), np.float32)
        pairs = pair_vectors(image[items], caption)
        return EvalSet(found, shards, keys, image, items, pairs, skipped)


def load(
    found: list[Located], pool: ScoreSet, device: str, batch_size: int | None
) -> list[EvalSet]:
    """Every evaluation set's vectors; the pool's model is rebuilt (once) only for tars."""
    sets: list[EvalSet | None] = [read_score_set(f) if f.kind == SCORE_SET else None for f in found]
    tars = [f for f in found if f.kind == SHARDS]
    if tars:
        embedder = Embedder(*_pool_model(pool, device, batch_size))
        total = sum(len(f.shards) for f in tars)
        with ui.step_progress("embedding evaluation tars", total, "shards") as tick:
            for i, f in enumerate(found):
                if f.kind == SHARDS:
                    sets[i] = embedder.embed(f, tick)
    return [s for s in sets if s is not None]


def _pool_model(pool: ScoreSet, device: str, batch_size: int | None) -> tuple[Any, int]:
    """The model the pool was scored with, rebuilt from its meta.json, and a batch size."""
    from jestcurate.model.openclip import load_model, resolve_spec, spec_from_meta

    if pool.meta.get("model_source") == "given":
        raise JCError(
            f"{pool.path} was imported with the model named, not loaded; embed the evaluation "
            "images with `jestcurate score` and that model, and give that score set to --against"
        )
    resolved = resolve_spec(spec_from_meta(pool.meta, device))
    differs = identity_mismatches(pool.meta, resolved.identity(), MODEL_FIELDS)
    if differs:
        raise JCError(
            f"the model {pool.path}/meta.json records is not the one found now "
            f"({'; '.join(differs)}); the evaluation tars must be embedded with the pool's model"
        )
    model = load_model(resolved, warn_random=False)
    if model.embed_dim != pool.dim:
        raise JCError(f"the rebuilt model embeds in {model.embed_dim} dimensions, the pool in "
                      f"{pool.dim}")  # fmt: skip
    return model, batch_size or (256 if model.device.type == "cuda" else 64)
