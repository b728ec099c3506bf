"""The report's "Training on the selections" section: a `jestcurate eval` folder's results
table and its curves (the PNG embedded, so the page still opens from disk alone)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.files import read_json
from jestcurate.pipelines.evaluate.results import COLUMNS, headline, table


def eval_section(folder: Path) -> str:
    """The section for the eval in `folder`; one line of error if it has no results yet."""
    path = folder / "results.json"
    if not path.is_file():
        raise JCError(f"{folder} holds no finished eval (no results.json); run jestcurate eval")
    found: dict[str, Any] = read_json(path)
    summary = found["summary"]
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = [
        "<h2>Training on the selections (jestcurate eval)</h2>",
        f"<p class='muted'>{html.escape(headline(summary))}</p>",
        f"<table id='eval'><tr>{header}</tr>",
    ]
    for arm, mean, cells in table(summary):
        name = html.escape(arm)
        shown = "".join(f"<td>{html.escape(c)}</td>" for c in cells[1:])
        rows.append(
            f"<tr data-arm='{name}'><td>{name}</td>"
            f"<td data-value='{mean:.6f}'>{html.escape(cells[0])}</td>{shown}</tr>"
        )
    rows.append("</table>")
    png = folder / (found.get("plot") or "")
    if found.get("plot") and png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        rows.append(f"<img alt='eval curves' src='data:image/png;base64,{data}'>")
    return "".join(rows)
