"""The report's "Training on the selections" section: a `jestcurate eval` folder's results
table and its curves (the PNG embedded, so the page still opens from disk alone)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.files import read_json


def eval_section(folder: Path) -> str:
    """The section for the eval in `folder`; one line of error if it has no results yet."""
    path = folder / "results.json"
    if not path.is_file():
        raise JCError(f"{folder} holds no finished eval (no results.json); run jestcurate eval")
    found: dict[str, Any] = read_json(path)
    summary = found["summary"]
    on = summary["compared_on"]
    rows = [
        "<h2>Training on the selections (jestcurate eval)</h2>",
        f"<p class='muted'>{html.escape(on['eval_set'])} {html.escape(on['metric'])}; the uniform "
        f"arm ends at {summary['uniform_final']:.3f} after {summary['steps']} steps of "
        f"{summary['batch_size']}</p>",
        "<table id='eval'><tr><th>arm</th><th>final (mean ± std)</th><th>steps to uniform's "
        "final</th><th>speed-up</th><th>learner TFLOP to it</th><th>+ scoring TFLOP</th></tr>",
    ]
    for row in summary["arms"]:
        arm = row["arm"]
        final = row["final"][on["eval_set"]][on["metric"]]
        reach = ", ".join("—" if r is None else str(r) for r in row["steps_to_uniform_final"])
        speed = "not reached" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        learner, total = (
            row["learner_tflops_to_uniform_final"],
            row["with_scoring_tflops_to_uniform_final"],
        )
        rows.append(
            f"<tr data-arm='{html.escape(arm)}'><td>{html.escape(arm)}</td>"
            f"<td data-value='{final['mean']:.6f}'>{final['mean']:.3f} ± {final['std']:.3f}</td>"
            f"<td>{reach}</td><td>{speed}</td>"
            f"<td>{'—' if learner is None else f'{learner:.3g}'}</td>"
            f"<td>{'—' if total is None else f'{total:.3g}'}</td></tr>"
        )
    rows.append("</table>")
    png = folder / (found.get("plot") or "")
    if found.get("plot") and png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        rows.append(f"<img alt='eval curves' src='data:image/png;base64,{data}'>")
    return "".join(rows)
