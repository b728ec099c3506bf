"""`jestcurate report` and `jestcurate info`: look at a score set (and a selection) by eye.

The report is one self-contained HTML file: counts per shard and status, errors by reason,
histograms of clip_score and ref_loss (kept vs dropped with a selection) as inline SVG, and
thumbnail grids (inline JPEG data) of the highest, lowest and random samples among kept and
dropped. Only small columns are read for every row; captions and images are read back for the
few samples shown, by position (a header scan of a local tar) or by streaming a remote one.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from jestcurate import __version__, ui
from jestcurate.errors import JCError
from jestcurate.io.reader import (
    IMAGE_EXTS,
    ShardReadError,
    error_reason,
    iter_raw_samples,
    load_image,
)
from jestcurate.io.remote import is_url
from jestcurate.io.shards import open_shard
from jestcurate.io.store import ScoreSet, open_score_set, read_json, read_markers, read_output
from jestcurate.trainer.loader import TarIndex


@dataclass
class Stats:
    """Small columns of every row, and counts; what both info and report need."""

    scores: ScoreSet
    shards: list[str]  # part id -> shard path or URL
    part: np.ndarray  # per row: part id
    row: np.ndarray  # per row: row in its part (== index in the shard)
    ok: np.ndarray
    clip: np.ndarray
    loss: np.ndarray
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)


def gather(scores: ScoreSet) -> Stats:
    parts, rows, oks, clips, losses = [], [], [], [], []
    shards: list[str] = []
    per_shard = []
    reasons: Counter[str] = Counter()
    markers = read_markers(scores.path)
    for part_id, name in enumerate(scores.part_names()):
        table = scores.read_part(name, ["shard", "status", "error", "clip_score", "ref_loss"])
        n = table.num_rows
        shards.append(table.column("shard")[0].as_py() if n else name)
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False)) == "ok"
        errors = table.filter(pc.invert(pc.equal(table.column("status"), "ok")))
        reasons.update(error_reason(e) for e in errors.column("error").to_pylist())
        parts.append(np.full(n, part_id, dtype=np.int32))
        rows.append(np.arange(n, dtype=np.int32))
        oks.append(ok)
        clips.append(table.column("clip_score").fill_null(np.nan).to_numpy().astype(np.float32))
        losses.append(table.column("ref_loss").fill_null(np.nan).to_numpy().astype(np.float32))
        marker = markers.get(name, {})
        per_shard.append(
            {
                "name": name,
                "samples": n,
                "ok": int(ok.sum()),
                "errors": int(n - ok.sum()),
                "status": marker.get("status", "no marker"),
            }
        )
    return Stats(
        scores,
        shards,
        np.concatenate(parts) if parts else np.empty(0, np.int32),
        np.concatenate(rows) if rows else np.empty(0, np.int32),
        np.concatenate(oks) if oks else np.empty(0, bool),
        np.concatenate(clips) if clips else np.empty(0, np.float32),
        np.concatenate(losses) if losses else np.empty(0, np.float32),
        per_shard,
        reasons,
        markers,
    )


def kept_mask(stats: Stats, selection: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Which rows of the score set a selection kept (joined on shard and index)."""
    summary_path = selection / "summary.json"
    if not summary_path.is_file():
        raise JCError(f"{selection} is not a finished selection (no summary.json)")
    summary = read_json(summary_path)
    manifest = read_output(selection / "manifest.parquet", ["shard", "index"])
    part_of = {shard: i for i, shard in enumerate(stats.shards)}
    starts = np.zeros(len(stats.shards) + 1, dtype=np.int64)
    np.cumsum([s["samples"] for s in stats.per_shard], out=starts[1:])
    kept = np.zeros(len(stats.ok), dtype=bool)
    missing = 0
    for shard, index in zip(
        manifest.column("shard").to_pylist(), manifest.column("index").to_pylist(), strict=True
    ):
        part = part_of.get(shard)
        if part is None or index >= stats.per_shard[part]["samples"]:
            missing += 1
            continue
        kept[starts[part] + index] = True
    if missing:
        raise JCError(
            f"{missing} rows of {selection}/manifest.parquet are not in {stats.scores.path}: "
            "the selection was made from another score set"
        )
    return kept, summary


def quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    qs = np.quantile(values, [0.0, 0.05, 0.5, 0.95, 1.0])
    return dict(zip(("min", "p5", "median", "p95", "max"), map(float, qs), strict=True))


# --- thumbnails -----------------------------------------------------------------------------


def _thumbnail(data: bytes, size: int = 112) -> str:
    image = load_image(data)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fetch_samples(stats: Stats, rows: np.ndarray) -> dict[int, dict[str, Any]]:
    """Caption, key and thumbnail of the given rows (global row numbers)."""
    wanted: dict[int, dict[int, int]] = {}  # part -> row in part -> global row
    for g in rows.tolist():
        wanted.setdefault(int(stats.part[g]), {})[int(stats.row[g])] = g
    out: dict[int, dict[str, Any]] = {}
    names = stats.scores.part_names()
    for part, need in wanted.items():
        table = stats.scores.read_part(names[part], ["key", "caption", "uid"])
        meta = table.take(sorted(need)).to_pylist()
        for (_row, g), info in zip(sorted(need.items()), meta, strict=True):
            out[g] = {**info, "thumbnail": None}
        shard = stats.shards[part]
        if not is_url(shard) and not shard.endswith((".gz", ".tgz")):
            try:
                index = TarIndex(shard)
            except JCError:
                continue
            for row, g in need.items():
                if row < len(index.samples):
                    sample = index.read(row)
                    out[g]["thumbnail"] = _image_of(sample)
            continue
        try:
            with open_shard(shard) as f:
                for raw in iter_raw_samples(f):
                    if raw.index in need:
                        out[need[raw.index]]["thumbnail"] = _image_of(raw.files)
        except (ShardReadError, OSError):  # a shard gone or damaged since scoring
            continue
    return out


def _image_of(files: dict[str, Any]) -> str | None:
    data = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if data is None:
        return None
    try:
        return _thumbnail(data)
    except Exception:  # the report shows a placeholder rather than failing
        return None


# --- HTML -----------------------------------------------------------------------------------


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


def render(
    stats: Stats,
    samples: dict[int, dict[str, Any]],
    groups: list[tuple[str, np.ndarray]],
    kept: np.ndarray | None,
    summary: dict[str, Any] | None,
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
    scores_dir: Path, out: Path, selection: Path | None, per_group: int = 12, seed: int = 0
) -> dict[str, Any]:
    began = time.time()
    if per_group < 1:
        raise JCError("--thumbnails must be at least 1")
    scores = open_score_set(scores_dir)
    stats = gather(scores)
    kept, summary = kept_mask(stats, selection) if selection else (None, None)
    groups = choose_groups(stats, kept, per_group, seed)
    wanted = np.unique(np.concatenate([rows for _, rows in groups])) if groups else np.empty(0)
    if not scores.has_images:  # an imported set: counts and histograms, no thumbnails
        wanted = np.empty(0)
    samples = fetch_samples(stats, wanted.astype(np.int64))
    page = render(stats, samples, groups, kept, summary)
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


def describe(path: Path) -> dict[str, Any]:
    """What `jestcurate info` shows, for a score set, a selection or a dedup output."""
    if not (path / "summary.json").is_file() and not (path / "meta.json").is_file():
        raise JCError(
            f"{path} is not a score set (meta.json), a selection or a dedup output (summary.json)"
        )
    if (path / "dedup.parquet").is_file():
        return {"kind": "dedup", "summary": read_json(path / "summary.json")}
    if (path / "summary.json").is_file():
        summary = read_json(path / "summary.json")
        export = path / "shards" / "export.json"
        return {
            "kind": "selection",
            "summary": summary,
            "export": read_json(export) if export.is_file() else None,
        }
    scores = open_score_set(path)
    stats = gather(scores)
    states = Counter(s["status"] for s in stats.per_shard)
    return {
        "kind": "score set",
        "meta": scores.meta,
        "shards": len(stats.per_shard),
        "shard_states": dict(states),
        "samples": len(stats.ok),
        "ok": int(stats.ok.sum()),
        "errors": int((~stats.ok).sum()),
        "reasons": dict(stats.reasons.most_common()),
        "clip_score": quantiles(stats.clip[stats.ok]),
        "ref_loss": quantiles(stats.loss[stats.ok]),
        "failed": [s["name"] for s in stats.per_shard if s["status"] == "failed"],
    }


def print_info(path: Any, info: dict[str, Any], console: Console = ui.stdout) -> None:
    table = Table(
        title=f"{path} ({info['kind']})", show_header=False, box=None, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    if info["kind"] == "dedup":
        s = info["summary"]
        table.add_row("scores", f"{s['scores']['path']} ({s['scores']['rows']:,} rows)")
        for key, value in s["params"].items():
            if key == "clusters":  # the clusters used; the option is None by default
                used = f"{s['clusters_used']:,}"
                if value is None:
                    value = f"{used} (default: sqrt of rows)"
                else:
                    value = used if value == s["clusters_used"] else f"{used} (asked {value:,})"
            table.add_row(f"  {key}", str(value))
        table.add_row("ok rows", f"{s['ok_rows']:,}")
        table.add_row("kept", f"{s['kept']:,}")
        table.add_row("dropped", f"{s['dropped_exact']:,} exact, {s['dropped_semantic']:,} near")
        table.add_row(
            "cluster sizes",
            f"largest {s['largest_cluster']:,}, median {s['median_cluster']:,.0f} rows",
        )
        nn = s.get("nn_cosine")  # older dedup outputs have none
        if nn:
            table.add_row(
                "nearest-neighbour cosine",
                f"p1 {nn['p1']:.6g}  p10 {nn['p10']:.6g}  median {nn['median']:.6g}  "
                f"p90 {nn['p90']:.6g} ({nn['sample']:,} rows sampled)",
            )
        if s.get("warning"):
            table.add_row("warning", s["warning"])
        table.add_row("took", f"{s['seconds']:.1f} s on {s['device']}")
        console.print(table)
        return
    if info["kind"] == "selection":
        s = info["summary"]
        table.add_row("method", s["method"] + (f" ({s['score']})" if s.get("score") else ""))
        for key, value in s["parameters"].items():
            if value is not None:
                table.add_row(f"  {key}", str(value))
        ref = s["inputs"]["reference"]
        table.add_row("reference", f"{ref['path']} ({ref['model']}, {ref['rows']:,} rows)")
        if s["inputs"].get("learner"):
            learner = s["inputs"]["learner"]
            table.add_row("learner", f"{learner['path']} ({learner['model']})")
        if s.get("partition"):
            steps = [t["steps"] for t in s.get("tasks", [])]
            spread = f" ({min(steps):,}-{max(steps):,} batches each)" if steps else ""
            table.add_row("array tasks", f"{s['partition']['num_tasks']:,}, merged{spread}")
        for key, value in s["counts"].items():
            if value is not None:
                table.add_row(key.replace("_", " "), f"{value:,}")
        for name, kept in s["means"]["kept"].items():
            dropped = s["means"]["dropped"].get(name)
            if kept is not None and dropped is not None:
                table.add_row(f"mean {name}", f"{kept:.4f} kept, {dropped:.4f} dropped")
        export = info.get("export")
        table.add_row(
            "export",
            f"{export['shards']} shards: {export['pattern']}"
            if export and "shards" in export
            else "none",
        )
        console.print(table)
        return
    meta = info["meta"]
    table.add_row(
        "model", f"{meta.get('model')} ({meta.get('loss')} loss, {meta.get('precision')})"
    )
    table.add_row(
        "pretrained", str(meta.get("pretrained") or f"random, seed {meta.get('init_seed')}")
    )
    table.add_row("role", str(meta.get("role")))
    table.add_row(
        "embedding", f"{meta.get('embed_dim')} dims, logit scale {meta.get('logit_scale'):.3f}"
    )
    states = ", ".join(f"{n} {state}" for state, n in sorted(info["shard_states"].items()))
    table.add_row("shards", f"{info['shards']:,} ({states})")
    table.add_row("samples", f"{info['samples']:,} ({info['ok']:,} ok, {info['errors']:,} errors)")
    for reason, count in info["reasons"].items():
        table.add_row(f"  {reason}", f"{count:,}")
    for column in ("clip_score", "ref_loss"):
        q = info[column]
        if q:
            table.add_row(column, "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    if info["failed"]:
        table.add_row("failed shards", ", ".join(info["failed"][:10]))
    console.print(table)
