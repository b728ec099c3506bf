"""An eval's results from its finished units: per arm and metric the final value (mean ± std
over seeds); on the first set's primary metric, the steps each arm takes to reach the uniform
arm's final value and the speed-up; learner FLOPs, and FLOPs with the scoring passes that made
each selection, counted as docs/benchmarks.md counts them. Written as results.json,
results.md and curves.png (the first set's primary metric; one panel per set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jestcurate.io.files import atomic_write, read_json, write_json_atomic

RESULTS = "results.json"


def curve(unit: dict[str, Any], eval_set: str, metric: str) -> list[float]:
    """A unit's values of one metric (NaN where the set leaves it undefined)."""
    values = [p["metrics"][eval_set][metric] for p in unit["curve"]]
    return [float("nan") if v is None else float(v) for v in values]


def steps_to_reach(points: list[dict[str, Any]], values: list[float], target: float) -> int | None:
    """The first evaluated step after step 0 at or above `target`."""
    for point, value in zip(points[1:], values[1:], strict=True):
        if value >= target:
            return int(point["step"])
    return None


def summarise(
    units: dict[str, list[dict[str, Any]]],
    primary: dict[str, str],
    flops: dict[str, Any],
) -> dict[str, Any]:
    """`units`: arm -> its seeds' unit results; `primary`: eval set -> its primary metric;
    `flops`: forward FLOPs per sample of the learner ("learner") and, per selection arm, of
    its scoring passes ("scoring": {arm: total FLOPs})."""
    first = next(iter(primary))
    key = primary[first]
    uniform = units["uniform"]
    steps = int(uniform[0]["steps"])
    batch = int(uniform[0]["samples_seen"]) // steps
    baseline = float(np.mean([curve(u, first, key)[-1] for u in uniform]))
    step_flops = 3 * flops["learner"] * batch
    arms: list[dict[str, Any]] = []  # in the eval's order (the uniform arm first)
    for arm, runs in units.items():
        finals: dict[str, dict[str, Any]] = {}
        for eval_set in runs[0]["curve"][-1]["metrics"]:
            for metric in runs[0]["curve"][-1]["metrics"][eval_set]:
                values = [curve(u, eval_set, metric)[-1] for u in runs]
                defined = not any(np.isnan(values))
                finals.setdefault(eval_set, {})[metric] = {
                    "mean": float(np.mean(values)) if defined else None,
                    "std": float(np.std(values)) if defined else None,
                }
        if arm == "uniform":  # the baseline itself: its final is where it ends, by definition
            reach: list[int | None] = [steps] * len(runs)
        else:
            reach = [steps_to_reach(u["curve"], curve(u, first, key), baseline) for u in runs]
        mean_reach = float(np.mean(reach)) if all(r is not None for r in reach) else None
        scoring = float(flops.get("scoring", {}).get(arm, 0.0))
        arms.append(
            {
                "arm": arm,
                "seeds": [int(u["seed"]) for u in runs],
                "final": finals,
                "steps_to_uniform_final": reach,
                "steps_to_uniform_final_mean": mean_reach,
                "speedup": steps / mean_reach if mean_reach else None,
                "learner_tflops_to_uniform_final": None
                if mean_reach is None
                else mean_reach * step_flops / 1e12,
                "with_scoring_tflops_to_uniform_final": None
                if mean_reach is None
                else (mean_reach * step_flops + scoring) / 1e12,
                "scoring_tflops": scoring / 1e12,
            }
        )
    return {
        "compared_on": {"eval_set": first, "metric": key},
        "uniform_final": baseline,
        "steps": steps,
        "batch_size": batch,
        "learner_forward_flops_per_sample": flops["learner"],
        "train_tflops": steps * step_flops / 1e12,
        "arms": arms,
    }


COLUMNS = ("arm", "final (mean ± std)", "steps to uniform's final (per seed)", "speed-up",
           "learner TFLOP to it", "+ scoring TFLOP")  # fmt: skip


def table(summary: dict[str, Any]) -> list[tuple[str, float, list[str]]]:
    """Per arm: its name, its final mean on the compared metric, and the cells of COLUMNS
    after the name, as results.md and the report show them."""
    on = summary["compared_on"]
    rows = []
    for row in summary["arms"]:
        final = row["final"][on["eval_set"]][on["metric"]]
        reach = ", ".join("—" if r is None else str(r) for r in row["steps_to_uniform_final"])
        learner = row["learner_tflops_to_uniform_final"]
        total = row["with_scoring_tflops_to_uniform_final"]
        cells = [
            f"{final['mean']:.3f} ± {final['std']:.3f}",
            reach,
            "not reached" if row["speedup"] is None else f"{row['speedup']:.1f}x",
            "—" if learner is None else f"{learner:.3g}",
            "—" if total is None else f"{total:.3g}",
        ]
        rows.append((row["arm"], float(final["mean"]), cells))
    return rows


def headline(summary: dict[str, Any]) -> str:
    on = summary["compared_on"]
    return (
        f"Compared on {on['eval_set']} {on['metric']}; the uniform arm ends at "
        f"{summary['uniform_final']:.3f} after {summary['steps']} steps of "
        f"{summary['batch_size']}."
    )


def markdown(summary: dict[str, Any]) -> str:
    lines = [headline(summary), "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * 6]
    lines += [f"| {arm} | " + " | ".join(cells) + " |" for arm, _, cells in table(summary)]
    return "\n".join(lines) + "\n"


def plot(units: dict[str, list[dict[str, Any]]], primary: dict[str, str], path: Path) -> bool:
    """curves.png, one panel per eval set (its primary metric, mean ± std over seeds); False
    where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(primary), figsize=(6.5 * len(primary), 4.2), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, (eval_set, metric) in zip(axes, primary.items(), strict=True):
        for arm, runs in units.items():
            data = np.array([curve(u, eval_set, metric) for u in runs])
            x = [p["step"] for p in runs[0]["curve"]]
            mean, std = data.mean(0), data.std(0)
            ax.plot(x, mean, label=arm, linewidth=2.2 if arm != "uniform" else 1.4)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{eval_set}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(path, save)
    plt.close(fig)
    return True


def write(out: Path, results: dict[str, Any], units: dict[str, Any], primary: dict[str, str]):
    """results.md and curves.png, then results.json last (it says the eval finished)."""
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(results["summary"])))
    results["plot"] = "curves.png" if plot(units, primary, out / "curves.png") else None
    write_json_atomic(out / RESULTS, results)


def read(out: Path) -> dict[str, Any] | None:
    path = out / RESULTS
    return read_json(path) if path.is_file() else None
