"""Time and peak memory of `jestcurate dedup` on a synthetic score set with planted duplicates.

    python benchmarks/dedup_speed.py --rows 1000000 [--dim 512] [--exact 0.02] [--near 0.02]
        [--clusters K] [--device cpu|cuda] [--neighbors N] [--workdir DIR]

Writes a synthetic score set of --rows rows (10,000 per part) and plants exact and near
(cosine 0.98) copies of other rows in it (kept in --workdir for reruns), then runs
`jestcurate dedup` in a child process and reports its phases (copying the embeddings and the
exact-duplicate pass, k-means training, assigning every row, the per-cluster SemDeDup pass,
writing dedup.parquet), its peak resident memory (VmHWM: ru_maxrss of a child also counts what
this process held when it forked), and recall and precision of the
planted duplicates. Disk: about 2 * 2 * dim bytes per row for the set, and 2 * dim, briefly,
for dedup's cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from jestcurate.pipelines.synth import plant_duplicates, write_score_set

ROWS_PER_PART = 10_000


def ensure_set(path: Path, rows: int, dim: int, exact: float, near: float) -> tuple[float, Path]:
    """The set with planted duplicates, written unless a finished one is there; returns the
    seconds spent and the file holding the planted groups."""
    done = path / "benchmark.json"
    groups_file = path / "planted.json"
    wanted = {"rows": rows, "dim": dim, "exact": exact, "near": near}
    if done.exists() and json.loads(done.read_text()) == wanted:
        return 0.0, groups_file
    began = time.perf_counter()
    write_score_set(
        path,
        shards=rows // ROWS_PER_PART,
        rows_per_shard=ROWS_PER_PART,
        dim=dim,
        seed=1,
        exact_losses=False,
    )
    groups = plant_duplicates(path, exact=exact, near=near, similarity=0.98, seed=0)
    groups_file.write_text(json.dumps([sorted(g) for g in groups]))
    done.write_text(json.dumps(wanted))
    return time.perf_counter() - began, groups_file


def accuracy(scores: Path, out: Path, groups_file: Path) -> dict[str, float]:
    """Recall and precision of the dropped rows against the planted groups (all members but
    the best by clip_score, ties to the first in shard order, should go)."""
    table = pq.read_table(scores / "parts", columns=["shard", "key", "index", "clip_score"])
    columns = [table.column(n).to_pylist() for n in table.column_names]
    info = {(s, k): (-c, s, i) for s, k, i, c in zip(*columns, strict=True)}
    want = set()
    for group in json.loads(groups_file.read_text()):
        members = [tuple(m) for m in group]
        keeper = min(members, key=info.__getitem__)
        want |= {m for m in members if m != keeper}
    result = pq.read_table(out / "dedup.parquet", columns=["shard", "key", "kept"])
    columns = [result.column(n).to_pylist() for n in result.column_names]
    dropped = {(s, k) for s, k, kept in zip(*columns, strict=True) if not kept}
    true = len(dropped & want)
    return {
        "planted_dropped": len(want),
        "recall": round(true / max(1, len(want)), 4),
        "precision": round(true / max(1, len(dropped)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--exact", type=float, default=0.02)
    parser.add_argument("--near", type=float, default=0.02)
    parser.add_argument("--clusters", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--neighbors", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-bench"))
    args = parser.parse_args()
    if args.rows % ROWS_PER_PART:
        parser.error(f"--rows must be a multiple of {ROWS_PER_PART}")

    base = args.workdir / f"dups{args.rows}-d{args.dim}"
    made, groups_file = ensure_set(base / "ref", args.rows, args.dim, args.exact, args.near)
    out = base / f"dedup-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "jestcurate", "-v", "dedup", str(base / "ref"), "--out", str(out),
        "--device", args.device, "--neighbors", str(args.neighbors),
    ]  # fmt: skip
    if args.clusters:
        cmd += ["--clusters", str(args.clusters)]
    began = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    summary = json.loads((out / "summary.json").read_text())
    report = {
        "rows": args.rows,
        "dim": args.dim,
        "device": args.device,
        "neighbors": args.neighbors,
        "clusters": summary["clusters_used"],
        "largest_cluster": summary["largest_cluster"],
        "score_set_written_s": round(made, 1),
        **{f"{k}_s": v for k, v in summary["seconds_by_phase"].items()},
        "dedup_s": summary["seconds"],
        "wall_s": round(wall, 1),
        "peak_rss_mib": summary["peak_rss_mib"],
        "dropped_exact": summary["dropped_exact"],
        "dropped_semantic": summary["dropped_semantic"],
        **accuracy(base / "ref", out, groups_file),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
