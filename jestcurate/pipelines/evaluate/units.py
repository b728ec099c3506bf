"""One unit of an eval: a fresh model trained with the recipe on one arm's batches for one seed,
evaluated on every set at step 0, every `eval_every` steps and at the end. A finished unit is
OUT/units/ARM/seed-S.json, written atomically once, so a rerun (or another array task) skips
it; a unit file made under another recipe or other inputs is refused, not mixed in."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jestcurate.errors import JCError
from jestcurate.io.files import read_json, write_json_atomic
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines.evaluate import streams
from jestcurate.pipelines.evaluate.config import Arm, EvalConfig

log = logging.getLogger(__name__)

UNITS_DIR = "units"


def unit_path(out: Path, arm: Arm, seed: int) -> Path:
    return out / UNITS_DIR / arm.name / f"seed-{seed}.json"


def finished(cfg: EvalConfig, arm: Arm, seed: int) -> dict[str, Any] | None:
    """The unit's results if it finished under this eval's identity; another's is refused."""
    path = unit_path(cfg.out, arm, seed)
    if not path.is_file():
        return None
    try:
        found = read_json(path)
    except (OSError, ValueError):
        return None  # a damaged unit is trained again
    if found.get("fingerprint") != cfg.fingerprint():
        raise JCError(
            f"{cfg.out} holds an eval with another recipe, pool, selections or eval sets "
            f"({_difference(found.get('identity') or {}, cfg.identity())}); use another --out"
        )
    if found.get("selection") != trained_on(arm):  # the same selections, named otherwise
        raise JCError(
            f"{path} was trained on {found.get('selection') or 'the uniform pool'}, not on what "
            f"arm {arm.name} names now: keep each arm's name, or use another --out"
        )
    return found


def trained_on(arm: Arm) -> str | list[str] | None:
    """What a unit records it trained on: None (the uniform pool), a selection's path, or a
    chain's paths (one selection is its path, as before chains)."""
    if arm.uniform:
        return None
    paths = [str(p.resolve()) for p in arm.selections]
    return paths[0] if len(paths) == 1 else paths


def _difference(there: dict[str, Any], now: dict[str, Any]) -> str:
    """The first field that differs, as "recipe.lr: 0.001 there, 0.0005 now"."""
    for key in now:
        a, b = there.get(key), now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in b:
                if a.get(sub) != b[sub]:
                    return f"{key}.{sub}: {a.get(sub)!r} there, {b[sub]!r} now"
        elif a != b:
            return f"{key}: {a!r} there, {b!r} now"
    return "made by another version"


Evaluator = Callable[[torch.nn.Module, Any], dict[str, dict[str, float]]]


def train_unit(
    cfg: EvalConfig,
    arm: Arm,
    seed: int,
    shards: list[str],
    evaluate: Evaluator,
    on_step: Callable[[int, int, float], None] | None = None,
    skip: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one unit; write and return its results. `evaluate(net, tokenizer)`
    gives {eval set: {metric: value}}; `skip`: the pool rows the uniform arm leaves out."""
    r = cfg.recipe
    began = time.time()
    torch.manual_seed(seed)
    spec = ModelSpec(r.model, device=cfg.device, precision=r.precision, init_seed=seed)
    model = load_model(resolve_spec(spec), warn_random=False)
    from jestcurate.pipelines.train import Trainer

    trainer = Trainer(model, r.lr, r.weight_decay, r.warmup, r.steps)
    preprocess = model.train_transform()
    data = streams.batches_of(arm, shards, model, preprocess, r.batch_size, seed, cfg.workers, skip)
    curve = [_point(0, evaluate, trainer.net, model.tokenizer, arm, seed)]
    loss = float("nan")
    for step in range(r.steps):
        images, tokens = next(data)
        loss = trainer.step(step, images, tokens)
        done = step + 1
        if on_step is not None:
            on_step(done, r.steps, loss)
        if done % r.eval_every == 0 or done == r.steps:
            curve.append(_point(done, evaluate, trainer.net, model.tokenizer, arm, seed))
    result = {
        "fingerprint": cfg.fingerprint(),
        "identity": cfg.identity(),
        "arm": arm.name,
        "selection": trained_on(arm),
        "seed": seed,
        "steps": r.steps,
        "samples_seen": r.steps * r.batch_size,
        "final_loss": loss,
        "curve": curve,
        "seconds": time.time() - began,
    }
    path = unit_path(cfg.out, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def _point(
    step: int, evaluate: Evaluator, net: torch.nn.Module, tokenizer: Any, arm: Arm, seed: int
) -> dict[str, Any]:
    # a metric that is undefined for the set (acc5 under five classes) is null, not NaN
    metrics = {
        name: {k: (None if v != v else v) for k, v in values.items()}
        for name, values in evaluate(net, tokenizer).items()
    }
    shown = "; ".join(
        f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items() if v is not None)
        for name, values in metrics.items()
    )
    log.info("eval %s seed %d step %d: %s", arm.name, seed, step, shown)
    return {"step": step, "metrics": metrics}
