"""`jestcurate info`: a terminal summary of a score set, a selection, a dedup or a
decontamination output."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jestcurate import ui
from jestcurate.errors import JCError
from jestcurate.io.files import read_json
from jestcurate.io.store import open_score_set
from jestcurate.pipelines.report.stats import gather, quantiles


def describe(path: Path) -> dict[str, Any]:
    """What `jestcurate info` shows, for a score set, a selection or a dedup output."""
    if not (path / "summary.json").is_file() and not (path / "meta.json").is_file():
        raise JCError(
            f"{path} is not a score set (meta.json), a selection or a dedup output (summary.json)"
        )
    if (path / "dedup.parquet").is_file():
        return {"kind": "dedup", "summary": read_json(path / "summary.json")}
    if (path / "decontam.parquet").is_file():
        return {"kind": "decontamination", "summary": read_json(path / "summary.json")}
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
    rows = {
        "dedup": _dedup_rows,
        "decontamination": _decontam_rows,
        "selection": _selection_rows,
        "score set": _score_set_rows,
    }
    rows[info["kind"]](table, info)
    console.print(table)


def _dedup_rows(table: Table, info: dict[str, Any]) -> None:
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


def _decontam_rows(table: Table, info: dict[str, Any]) -> None:
    s = info["summary"]
    table.add_row("scores", f"{s['scores']['path']} ({s['scores']['rows']:,} rows)")
    table.add_row("  threshold", f"{s['params']['threshold']:g}")
    table.add_row("excluded", f"{s['excluded']:,} of {s['searched']:,} searched rows")
    for e in s["sets"]:
        table.add_row(
            e["name"],
            f"{e['hits']:,} hits ({e['image_hits']:,} image, {e['pair_hits']:,} pair) against "
            f"{e['images']:,} images ({e['kind']}: {e['location']})",
        )
        own = e.get("own_nearest_cosine")
        if own:
            table.add_row("  own nearest cosine", f"p1 {own['p1']:.6g}  median {own['median']:.6g}"
                          f"  p99 {own['p99']:.6g}")  # fmt: skip
        pool = e.get("pool_closest_cosine")
        if pool:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in pool.items())
            table.add_row("  pool closest cosine", shown)
        if e.get("warning"):
            table.add_row("  warning", e["warning"])
    table.add_row("took", f"{s['seconds']:.1f} s on {s['device']}")


def _selection_rows(table: Table, info: dict[str, Any]) -> None:
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
    if s.get("ledger"):  # selections with a ledger
        facts = s["ledger"]
        per_row = facts.get("bytes_per_row")
        size = "no rows" if per_row is None else f"{per_row} bytes per row"
        shown = f"{size}; by fate and reason:"
        if facts.get("status") == "pending":  # array tasks still writing its parts
            shown = "still being written (the fates once every part is)"
        table.add_row("ledger", f"{facts['folder']}/: {facts['parts']:,} parts, {shown}")
    for fate, reasons in s.get("fates", {}).items():
        shown = ", ".join(f"{reason} {count:,}" for reason, count in reasons.items())
        table.add_row(f"  {fate.replace('_', ' ')}", shown)
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


def _score_set_rows(table: Table, info: dict[str, Any]) -> None:
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
