"""The eval job: check everything, train this task's unfinished units (arm x seed, split
round-robin over array tasks like shards), and once every unit of the eval is finished, write
its results. Safe to rerun: finished units are skipped, results are rewritten from the units
alone (the same units give the same bytes)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.io.files import read_json
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines.evaluate import results as results_mod
from jestcurate.pipelines.evaluate import sets as sets_mod
from jestcurate.pipelines.evaluate import streams, units
from jestcurate.pipelines.evaluate.config import Arm, EvalConfig, check
from jestcurate.scale.tasks import for_task, resolve_task

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    out: Path
    units: int  # of the whole eval
    mine: int  # this task's
    trained: int  # by this run
    results: dict[str, Any] | None  # once every unit is finished
    seconds: float


def run(cfg: EvalConfig) -> EvalReport:
    began = time.time()
    check(cfg)
    # The precision as the device resolves it (bf16 on CUDA, fp32 on a CPU when unset): units
    # trained at another precision are another eval.
    resolved = resolve_spec(ModelSpec(cfg.recipe.model, device=cfg.device,
                                      precision=cfg.recipe.precision), fetch=False)  # fmt: skip
    cfg = replace(cfg, recipe=replace(cfg.recipe, precision=resolved.precision))
    shards = streams.pool_shards(cfg.pool)
    arms = cfg.arms()
    for arm in arms[1:]:
        for path in arm.selections:
            streams.check_from_pool(path, shards)
    skip = streams.excluded_rows(cfg.exclude, shards)
    opened = [sets_mod.open_eval_set(e) for e in cfg.eval_sets]
    names = [s.name for s in opened]
    if len(set(names)) != len(names):
        raise_duplicate(names)
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    every = [(arm, seed) for arm in arms for seed in cfg.seeds]
    mine = for_task(every, index, count)
    todo = [(arm, seed) for arm, seed in mine if units.finished(cfg, arm, seed) is None]
    undecontaminated = not_decontaminated(arms, opened, cfg.exclude)
    for arm, missing in undecontaminated.items():
        log.warning(
            "%s was not decontaminated against %s: near copies of their images may be in its "
            "training data and lift its scores (jestcurate decontaminate, then select --exclude)",
            "the uniform pool" if arm == "uniform" else f"selection {arm}",
            ", ".join(missing),
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    if todo:
        evaluate = _evaluator(cfg, opened)
        for arm, seed in todo:
            with ui.training_progress(f"{arm.name}, seed {seed}") as tick:
                units.train_unit(cfg, arm, seed, shards, evaluate, tick, skip)
    done = {(a.name, s): units.finished(cfg, a, s) for a, s in every}
    found = None
    if all(v is not None for v in done.values()):
        excluded = sum(len(rows) for rows in (skip or {}).values())
        found = _write_results(cfg, arms, opened, done, undecontaminated, excluded)
    return EvalReport(cfg.out, len(every), len(mine), len(todo), found, time.time() - began)


def raise_duplicate(names: list[str]) -> None:
    from jestcurate.errors import JCError

    raise JCError(f"two --eval sets share a folder name ({', '.join(names)}): rename one")


def not_decontaminated(
    arms: list[Arm], opened: list[sets_mod.EvalSet], exclude: tuple[Path, ...] = ()
) -> dict[str, list[str]]:
    """Per arm, the eval sets its data was not decontaminated against: a selection made with
    `select --exclude` of `jestcurate decontaminate` outputs that searched that set's folder
    is clean of it (a chain, when each of its selections is); the uniform arm, when eval's own
    --exclude outputs searched it."""
    found: dict[str, list[str]] = {}
    for arm in arms:
        if arm.uniform:
            covered = _searched(exclude)
        else:
            each = [_searched(_exclusions_of(path)) for path in arm.selections]
            covered = set.intersection(*each)
        missing = [s.name for s in opened if os.path.realpath(s.path) not in covered]
        if missing:
            found[arm.name] = missing
    return found


def _exclusions_of(selection: Path) -> tuple[Path, ...]:
    summary = read_json(selection / "summary.json")
    given = summary.get("parameters", {}).get("exclude") or []
    return tuple(Path(e["path"]) for e in given if isinstance(e, dict) and "path" in e)


def _searched(exclusions: tuple[Path, ...]) -> set[str]:
    """The eval set folders these decontaminate outputs searched (resolved)."""
    covered: set[str] = set()
    for exclusion in exclusions:
        try:
            made = read_json(exclusion / "summary.json")
        except (OSError, ValueError):
            continue
        searched = made.get("against") if isinstance(made, dict) else None
        for against in searched if isinstance(searched, list) else []:
            if isinstance(against, dict):
                covered.add(os.path.realpath(str(against.get("location", ""))))
    return covered


def _evaluator(cfg: EvalConfig, opened: list[sets_mod.EvalSet]) -> Any:
    """evaluate(net, tokenizer) over every set, each decoded once with the recipe model's
    eval transform."""
    spec = ModelSpec(cfg.recipe.model, device=cfg.device, precision=cfg.recipe.precision)
    model = load_model(resolve_spec(spec), warn_random=False)
    device = str(model.device)
    loaded = [(s.name, sets_mod.load(s, model.preprocess, cfg.eval_samples)) for s in opened]

    def evaluate(net: Any, tokenizer: Any) -> dict[str, dict[str, float]]:
        return {name: sets_mod.evaluate(net, tokenizer, data, device) for name, data in loaded}

    return evaluate


def _write_results(
    cfg: EvalConfig,
    arms: list[Arm],
    opened: list[sets_mod.EvalSet],
    done: dict[tuple[str, int], dict[str, Any] | None],
    undecontaminated: dict[str, list[str]],
    excluded: int,
) -> dict[str, Any]:
    by_arm = {a.name: [done[(a.name, s)] for s in cfg.seeds] for a in arms}
    primary = {s.name: sets_mod.primary_metric(s.kind) for s in opened}
    flops = {"learner": _forward_flops(cfg.recipe.model), "scoring": _scoring_flops(arms)}
    summary = results_mod.summarise(by_arm, primary, flops)  # type: ignore[arg-type]
    found = {
        "tool_version": __version__,
        "identity": cfg.identity(),
        "fingerprint": cfg.fingerprint(),
        "eval_sets": [{"name": s.name, "kind": s.kind, "path": str(s.path)} for s in opened],
        "primary_metrics": primary,
        "not_decontaminated": undecontaminated,  # arm -> eval sets its data may overlap
        "excluded_rows": excluded,  # pool rows --exclude left out of the uniform arm
        "summary": summary,
        "units": {a: [u["curve"] for u in us] for a, us in by_arm.items()},  # type: ignore[index]
    }
    results_mod.write(cfg.out, found, by_arm, primary)
    return found


_FLOPS: dict[str, int] = {}


def _forward_flops(model: str) -> int:
    if model not in _FLOPS:
        loaded = load_model(resolve_spec(ModelSpec(model, device="cpu")), warn_random=False)
        _FLOPS[model] = loaded.forward_flops()
    return _FLOPS[model]


def _scoring_flops(arms: list[Arm]) -> dict[str, float]:
    """Per selection arm, the forward passes that scored its pool: every row of its reference
    score set, of its learner score set when it has one, and of a target-set filter's score set,
    through the model that scored it (trainings of the reference and learner are not counted
    here)."""
    found: dict[str, float] = {}
    for arm in arms[1:]:
        total, seen = 0.0, set()
        for path in arm.selections:  # a chain's selections of one score set count it once
            summary = read_json(path / "summary.json")
            inputs = dict(summary.get("inputs", {}))
            target = ((summary.get("parameters") or {}).get("filters") or {}).get("target")
            if isinstance(target, dict) and target.get("scores"):
                inputs["target"] = target["scores"]  # the filter's target set was scored too
            for role in ("reference", "learner", "target"):
                scored = inputs.get(role)
                if not scored or json.dumps(scored, sort_keys=True) in seen:
                    continue
                seen.add(json.dumps(scored, sort_keys=True))
                try:
                    total += float(scored["rows"]) * _forward_flops(str(scored["model"]))
                except Exception as exc:  # a model config no longer at hand: say so, count 0
                    log.warning("cannot count the %s scoring FLOPs of %s: %s", role, arm.name, exc)
        found[arm.name] = total
    return found


def print_summary(report: EvalReport, console: Console = ui.stdout) -> None:
    table = ui.facts("jestcurate eval")
    table.add_row("units (arm x seed)", f"{report.units}, {report.mine} in this task")
    table.add_row("trained now", str(report.trained))
    table.add_row("elapsed", f"{report.seconds:.0f} s")
    console.print(table)
    if report.results is None:
        ui.note(f"units of other tasks are unfinished; results follow when all are ({report.out})")
        return
    console.print(results_mod.markdown(report.results["summary"]), highlight=False)
    for arm, missing in report.results.get("not_decontaminated", {}).items():
        ui.note(f"{arm}: not decontaminated against {', '.join(missing)}")
    ui.say(f"results: {report.out / results_mod.RESULTS}")
