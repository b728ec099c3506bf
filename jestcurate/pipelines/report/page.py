"""`jestcurate report`: one self-contained HTML page (inline SVG histograms, inline JPEG
thumbnails, no network) of a score set, and of a selection's kept and dropped rows."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.store import open_score_set
from jestcurate.pipelines.report.stats import Stats, gather, kept_mask
from jestcurate.pipelines.report.thumbnails import fetch_samples


def _svg_histogram(series: dict[str, np.ndarray], title: str, bins: int = 40) -> str:
    colours = {"kept": "#2a9d8f", "dropped": "#e76f51", "all": "#457b9d"}
    values = [v[np.isfinite(v)] for v in series.values()]
    values = [v for v in values if len(v)]
    if not values:
        return f"<p>No {html.escape(title)} values.</p>"
    # The 0.5th to 99.5th percentile: a few extreme losses would squash everything else.
    low, high = (float(q) for q in np.quantile(np.concatenate(values), [0.005, 0.995]))
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    width, height, pad = 520, 180, 30
    densities = {}
    for name, v in series.items():
        v = np.clip(v[np.isfinite(v)], low, high)
        counts, _ = np.histogram(v, edges)
        densities[name] = counts / max(1, len(v))
    top = max(float(d.max()) for d in densities.values()) or 1.0
    bar = (width - 2 * pad) / bins
    shapes = []
    for name, dens in densities.items():
        for i, d in enumerate(dens):
            h = (height - 2 * pad) * d / top
            x = pad + i * bar
            shapes.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colours.get(name, "#888")}" fill-opacity="0.55"/>'
            )
    legend = " ".join(
        f'<tspan fill="{colours.get(n, "#888")}">■ {html.escape(n)} ({np.isfinite(v).sum():,})'
        "</tspan>"
        for n, v in series.items()
    )
    return (
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">'
        f'<text x="{pad}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>'
        f'<text x="{width - pad}" y="16" font-size="11" text-anchor="end">{legend}</text>'
        + "".join(shapes)
        + f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#333"/>'
        f'<text x="{pad}" y="{height - 10}" font-size="11">{low:.3g}</text>'
        f'<text x="{width - pad}" y="{height - 10}" font-size="11" text-anchor="end">'
        f"{high:.3g}</text></svg>"
    )


def _grid(title: str, rows: np.ndarray, stats: Stats, samples: dict[int, dict[str, Any]]) -> str:
    cards = []
    for g in rows.tolist():
        info = samples.get(g, {})
        thumb = info.get("thumbnail")
        image = (
            f'<img src="{thumb}" alt="" class="thumb">'
            if thumb
            else '<div class="thumb missing">image unavailable</div>'
        )
        caption = html.escape((info.get("caption") or "")[:160])
        cards.append(
            f'<figure class="card">{image}<figcaption><span class="cap">{caption}</span>'
            f'<span class="scores">clip {stats.clip[g]:.3f} · loss {stats.loss[g]:.3f}</span>'
            f'<span class="key">{html.escape(str(info.get("key", "")))}</span></figcaption>'
            "</figure>"
        )
    body = "".join(cards) or "<p>none</p>"
    return f'<h3>{html.escape(title)}</h3><div class="grid">{body}</div>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:right}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:132px;margin:0;font-size:11px}
.thumb{width:112px;height:112px;object-fit:contain;background:#f3f3f3;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#999;text-align:center}
figcaption span{display:block}.cap{color:#111}.scores{color:#555}.key{color:#999}
.hist{margin:8px 16px 8px 0}.muted{color:#777}
"""
# Records script errors and whether every thumbnail decoded, for anyone (or any test) checking.
_CHECK = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.querySelectorAll('img.thumb'));
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.thumbnails = imgs.length;
  document.body.dataset.thumbnailsBroken = bad;
  document.body.dataset.errors = window.__errors.length;
  document.body.dataset.loaded = 'yes';
});
</script>
"""


def _count(name: str, value: int) -> str:
    return f'<td id="count-{name}" data-value="{value}">{value:,}</td>'


def slug(text: str) -> str:
    """Text as an HTML id's part: runs of anything but letters, digits, _ and - as one -."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "-"


def _fates(summary: dict[str, Any] | None) -> list[str]:
    """A selection's rows by fate and reason (from its ledger; older selections have none)."""
    fates = (summary or {}).get("fates")
    if not fates:
        return []
    rows = ["<h2>Fates by reason</h2><table><tr><th>fate</th><th>reason</th><th>rows</th></tr>"]
    for fate, reasons in fates.items():
        for reason, count in reasons.items():
            rows.append(
                f"<tr><td>{html.escape(fate)}</td><td>{html.escape(reason)}</td>"
                f'<td id="fate-{slug(fate)}-{slug(reason)}">{count:,}</td></tr>'
            )
    rows.append("</table>")
    return rows


def render(
    stats: Stats,
    samples: dict[int, dict[str, Any]],
    groups: list[tuple[str, np.ndarray]],
    kept: np.ndarray | None,
    summary: dict[str, Any] | None,
    sections: tuple[str, ...] = (),
) -> str:
    meta = stats.scores.meta
    n, ok = len(stats.ok), int(stats.ok.sum())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>jestcurate report: {html.escape(str(stats.scores.path))}</title>",
        f"<style>{_STYLE}</style>{_CHECK}</head><body>",
        f"<h1>jestcurate report: {html.escape(str(stats.scores.path))}</h1>",
        f"<p class='muted'>model {html.escape(str(meta.get('model')))} · role "
        f"{html.escape(str(meta.get('role')))} · {meta.get('loss')} loss · precision "
        f"{meta.get('precision')} · jestcurate {__version__}</p>",
        "<h2>Counts</h2><table>",
        f"<tr><th>shards</th>{_count('shards', len(stats.per_shard))}</tr>",
        f"<tr><th>samples</th>{_count('samples', n)}</tr>",
        f"<tr><th>status ok</th>{_count('ok', ok)}</tr>",
        f"<tr><th>status error</th>{_count('errors', n - ok)}</tr>",
    ]
    if kept is not None and summary is not None:
        parts.append(f"<tr><th>kept by {html.escape(summary['method'])}</th>")
        parts.append(f"{_count('kept', int(kept.sum()))}</tr>")
        parts.append(
            f"<tr><th>dropped (ok, not kept)</th>{_count('dropped', ok - int(kept.sum()))}</tr>"
        )
    parts.append("</table>")
    parts.extend(_fates(summary))
    if stats.reasons:
        parts.append("<h2>Errors by reason</h2><table><tr><th>reason</th><th>samples</th></tr>")
        for reason, count in stats.reasons.most_common():
            parts.append(f"<tr><td>{html.escape(reason)}</td><td>{count:,}</td></tr>")
        parts.append("</table>")
    shown = sorted(stats.per_shard, key=lambda s: (-s["errors"], s["name"]))[:200]
    note = "" if len(shown) == len(stats.per_shard) else f" (the {len(shown)} with most errors)"
    parts.append(f"<h2>Shards{note}</h2><table><tr><th>shard</th><th>samples</th><th>ok</th>")
    parts.append("<th>errors</th><th>marker</th></tr>")
    for s in shown:
        parts.append(
            f"<tr><td>{html.escape(s['name'])}</td><td>{s['samples']:,}</td><td>{s['ok']:,}</td>"
            f"<td>{s['errors']:,}</td><td>{html.escape(s['status'])}</td></tr>"
        )
    parts.append("</table><h2>Scores</h2>")
    for label, values in (("clip_score", stats.clip), ("ref_loss", stats.loss)):
        if kept is not None:
            series = {"kept": values[kept], "dropped": values[stats.ok & ~kept]}
        else:
            series = {"all": values[stats.ok]}
        parts.append(_svg_histogram(series, label))
    parts.extend(sections)
    parts.append("<h2>Samples</h2>")
    for title, rows in groups:
        parts.append(_grid(title, rows, stats, samples))
    parts.append("</body></html>")
    return "".join(parts)


def choose_groups(
    stats: Stats, kept: np.ndarray | None, per_group: int, seed: int
) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scored = stats.ok & np.isfinite(stats.clip)
    sets = (
        [("kept", kept & scored), ("dropped", ~kept & scored)]
        if kept is not None
        else [("all", scored)]
    )
    groups = []
    for name, mask in sets:
        rows = np.flatnonzero(mask)
        if not len(rows):
            continue
        order = rows[np.argsort(-stats.clip[rows], kind="stable")]
        random_rows = rng.choice(rows, size=min(per_group, len(rows)), replace=False)
        groups += [
            (f"{name}: highest clip_score", order[:per_group]),
            (f"{name}: lowest clip_score", order[::-1][:per_group]),
            (f"{name}: random", np.sort(random_rows)),
        ]
    return groups


def write_report(
    scores_dir: Path,
    out: Path,
    selection: Path | None,
    per_group: int = 12,
    seed: int = 0,
    evals: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """The page; `evals`: `jestcurate eval` folders whose results it shows too."""
    from jestcurate.pipelines.report.training import eval_section

    began = time.time()
    if per_group < 1:
        raise JCError("--thumbnails must be at least 1")
    sections = tuple(eval_section(folder) for folder in evals)
    scores = open_score_set(scores_dir)
    stats = gather(scores)
    kept, summary = kept_mask(stats, selection) if selection else (None, None)
    groups = choose_groups(stats, kept, per_group, seed)
    wanted = np.unique(np.concatenate([rows for _, rows in groups])) if groups else np.empty(0)
    if not scores.has_images:  # an imported set: counts and histograms, no thumbnails
        wanted = np.empty(0)
    samples = fetch_samples(stats, wanted.astype(np.int64))
    page = render(stats, samples, groups, kept, summary, sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return {
        "samples": len(stats.ok),
        "thumbnails": sum(1 for s in samples.values() if s["thumbnail"]),
        "missing_thumbnails": sum(1 for s in samples.values() if not s["thumbnail"]),
        "bytes": out.stat().st_size,
        "seconds": time.time() - began,
    }


def print_written(done: dict[str, Any], out: Path) -> None:
    """The one line `jestcurate report` prints: the page, its size, thumbnails and time."""
    missing = (
        f", {done['missing_thumbnails']} images unavailable" if done["missing_thumbnails"] else ""
    )
    ui.say(
        f"wrote {out} ({done['bytes'] / 1024:,.0f} KiB, {done['thumbnails']} thumbnails{missing}, "
        f"{done['seconds']:.1f} s)",
    )
