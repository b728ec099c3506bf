"""What `jestcurate eval` is asked to do: the training recipe every arm shares, the arms (the
uniform pool and each selection) and the evaluation sets; and the checks made before any
training starts."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.files import read_json
from jestcurate.io.remote import is_url


@dataclass(frozen=True)
class Recipe:
    """One training recipe for every arm and seed: a fresh model, AdamW and open_clip_train's
    cosine schedule (pipelines/train's Trainer), `steps` optimizer steps of `batch_size`."""

    model: str = "jc-tiny"
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.1
    eval_every: int = 25
    precision: str | None = None


# DataComp's fixed recipes per scale (its SCALE_CONFIGS: samples seen / batch size = steps; lr,
# warm-up and model as there; open_clip_train's default weight decay 0.2), and "tiny", the
# shipped CPU model for a first look in minutes.
SCALES: dict[str, Recipe] = {
    "tiny": Recipe(),
    "small": Recipe("ViT-B-32", 12_800_000 // 4096, 4096, 5e-4, 500, 0.2, 250),
    "medium": Recipe("ViT-B-32", 128_000_000 // 4096, 4096, 5e-4, 500, 0.2, 2500),
    "large": Recipe("ViT-B-16", 1_280_000_000 // 8192, 8192, 5e-4, 500, 0.2, 10000),
}


@dataclass(frozen=True)
class Arm:
    """What one arm trains on: the pool, uniformly (no selections), or the batches of one or
    more selections in step order, one after another (successive selections of one pool, as a
    learner that keeps filtering fresh super-batches would see them), then again."""

    name: str
    selections: tuple[Path, ...] = ()

    @property
    def uniform(self) -> bool:
        return not self.selections


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_arm(spec: str) -> Arm:
    """`-s [NAME=]SEL[,SEL...]`: an arm of one selection, or of several chained; unnamed, it is
    named after its first selection's folder. A spec that is itself an existing folder is one
    selection, whatever '=' or ',' its path holds."""
    if Path(spec).is_dir():
        return Arm("", (Path(spec),))
    name, _, paths = spec.partition("=") if "=" in spec else ("", "", spec)
    parts = tuple(Path(p) for p in paths.split(",") if p)
    if not parts:
        raise JCError(f"-s {spec!r} names no selection: give -s [NAME=]SELECTION[,SELECTION...]")
    if name and (not _NAME.fullmatch(name) or name.lower() == "uniform"):
        raise JCError(
            f"-s {spec!r}: an arm name starts with a letter or digit, then letters, digits, '.', "
            "'_' or '-', and is not 'uniform'"
        )
    return Arm(name, parts)


@dataclass(frozen=True)
class EvalConfig:
    pool: tuple[str, ...]  # the pool's shards (INPUTS as score takes them) or its score set
    out: Path
    selections: tuple[Arm, ...] = ()  # the arms besides uniform (parse_arm)
    eval_sets: tuple[str, ...] = ()
    recipe: Recipe = field(default_factory=Recipe)
    seeds: tuple[int, ...] = (0,)
    eval_samples: int | None = None  # per eval set, its first N (all: None)
    exclude: tuple[Path, ...] = ()  # decontaminate outputs whose rows the uniform arm skips
    device: str = "auto"
    workers: int = 1
    task_index: int | None = None
    num_tasks: int | None = None

    def arms(self) -> list[Arm]:
        """The uniform arm, then each given arm, named as given or by its first selection's
        folder (made unique)."""
        arms, seen = [Arm("uniform")], {"uniform"}
        named = [a.name for a in self.selections if a.name]
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise JCError(f"two arms are named {twice[0]!r}: give each -s its own NAME=")
        seen |= set(named)
        for arm in self.selections:
            if arm.name:
                arms.append(arm)
                continue
            name = _slug(arm.selections[0].resolve().name) or "selection"
            unique, k = name, 2
            while unique in seen:
                unique, k = f"{name}-{k}", k + 1
            seen.add(unique)
            arms.append(Arm(unique, arm.selections))
        return arms

    def identity(self) -> dict[str, Any]:
        """What every unit of one eval shares; a unit written under another is not reused.
        Paths are resolved (a rerun from another folder is the same eval); --workers is in it
        because the data loading processes draw the augmentation."""
        return {
            "recipe": asdict(self.recipe),
            "workers": self.workers,
            "pool": [p if is_url(p) else os.path.realpath(p) for p in self.pool],
            # an arm of one selection is its path (as before chains), a chain the list of them
            "selections": [
                [str(p.resolve()) for p in a.selections]
                if len(a.selections) > 1
                else str(a.selections[0].resolve())
                for a in self.selections
            ],
            "eval_sets": [str(Path(e).resolve()) for e in self.eval_sets],
            "eval_samples": self.eval_samples,
            # only when given, so evals made before --exclude keep their fingerprint; with its
            # summary's hash, so an output rewritten in place is another eval
            **({"exclude": [_fingerprint_of(p) for p in self.exclude]} if self.exclude else {}),
        }

    def fingerprint(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint_of(output: Path) -> dict[str, str]:
    summary = output / "summary.json"
    digest = hashlib.sha256(summary.read_bytes()).hexdigest() if summary.is_file() else ""
    return {"path": str(output.resolve()), "summary_sha256": digest}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def with_scale(recipe: Recipe, scale: str | None, **given: Any) -> Recipe:
    """The recipe of `scale` (a name of SCALES), with the options the user gave on top."""
    if scale is not None and scale not in SCALES:
        raise JCError(f"--scale takes {', '.join(SCALES)}, not {scale!r}")
    base = SCALES[scale] if scale else recipe
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def check(cfg: EvalConfig) -> None:
    """Bad options, one line each, before any model is built."""
    r = cfg.recipe
    if not cfg.eval_sets:
        raise JCError("give at least one --eval set (zero-shot or retrieval, WebDataset)")
    if r.steps < 1 or r.eval_every < 1:
        raise JCError("--steps and --eval-every must be at least 1")
    if r.batch_size < 2:
        raise JCError("--batch-size must be at least 2 (contrastive losses need negatives)")
    if r.lr <= 0:
        raise JCError("--lr must be positive")
    if not cfg.seeds:
        raise JCError("--seeds needs at least one seed")
    if cfg.eval_samples is not None and cfg.eval_samples < 10:
        raise JCError("--eval-samples must be at least 10 (recall@10 needs ten images)")
    for arm in cfg.arms()[1:]:
        for path in arm.selections:
            _check_selection(path, r.batch_size)


def _check_selection(path: Path, batch_size: int) -> None:
    summary_path = path / "summary.json"
    if not summary_path.is_file() or not (path / "manifest.parquet").is_file():
        raise JCError(f"{path} is not a finished selection (no summary.json)")
    try:
        b = int(read_json(summary_path)["parameters"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise JCError(f"{path} is not a selection (its summary.json has no batch size): "
                      "give -s the folders `select` wrote") from None  # fmt: skip
    if b != batch_size:
        raise JCError(
            f"{path} holds batches of b = {b}, the recipe trains batches of {batch_size}: "
            f"give --batch-size {b}, or select again with -b {batch_size}"
        )
