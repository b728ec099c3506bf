"""Partitioned select: one corpus selected as 1, 4 and 8 array tasks, run one after another.

    python benchmarks/select_tasks.py [--rows 10000000] [--dim 256] [--tasks 1 4 8]
        [--batch-size 4096] [--ratio 0.2] [--steps 16] [--workdir DIR]

Writes a synthetic reference score set (10,000 rows per part; kept in --workdir for reruns),
then for each N runs `jestcurate select --task-index I --num-tasks N` for every task in a child
process, twice (round 1 scatters, round 2 gathers and chooses; the last task merges), and
reports per task and round: wall time, the phases from the log, and the child's own peak
resident memory (wait4). Choosing examines --steps super-batches in all (--max-steps steps / N
per task), so the total choosing work is the same for every N; the choosing rate it measures
gives the full-partition projection. Compares kept-vs-dropped means across N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from select_speed import ensure_set

PHASES = {
    "scan": "checking score sets",
    "copy": "copying eligible rows",
    "scatter": "scattering rows to tasks",
    "gather": "gathering this task's rows",
    "choose": "selecting (",
    "merge": "merging task manifests",
}


def run_child(cmd: list[str]) -> dict[str, float]:
    """Run one select; its wall time, own peak RSS (MiB) and logged phase times."""
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's rusage, not all children's
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        err = log.read()
    if child.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    result = {
        "wall_s": round(time.perf_counter() - began, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }
    for name, label in PHASES.items():
        found = re.search(rf"{re.escape(label)}[\w-]*\)?: \d+ \w+ in ([\d.]+)s", err)
        if found:
            result[f"{name}_s"] = float(found.group(1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=16, help="super-batches chosen in all")
    parser.add_argument("--method", default="jest", help="random: no choosing cost (merge rate)")
    parser.add_argument("--all-steps", action="store_true", help="no --max-steps: every batch")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jc-tasks-bench"))
    args = parser.parse_args()
    base = args.workdir / f"rows{args.rows}-d{args.dim}"
    made = ensure_set(base / "ref", args.rows, args.dim, "reference", 1, 0.3)
    runs = []
    for count in args.tasks:
        if args.steps % count and not args.all_steps:
            parser.error(f"--steps must be a multiple of every task count ({count})")
        out = base / f"sel-{count}"
        shutil.rmtree(out, ignore_errors=True)
        select = [
            sys.executable, "-m", "jestcurate", "-v", "select", str(base / "ref"),
            "--out", str(out), "-b", str(args.batch_size), "--ratio", str(args.ratio),
            "--device", "cpu", "--method", args.method,
        ]  # fmt: skip
        if not args.all_steps:
            select += ["--max-steps", str(args.steps // count)]
        tasks = []
        rounds = [0] if count == 1 else [1, 2]
        for round_ in rounds:
            for i in range(count):
                flags = [] if count == 1 else ["--task-index", str(i), "--num-tasks", str(count)]
                if round_ == 2 and i == count - 1:
                    continue  # the last task already chose in round 1 (all had scattered)
                tasks.append({"task": i, "round": round_, **run_child(select + flags)})
                print(json.dumps({"num_tasks": count, **tasks[-1]}), file=sys.stderr)
        summary = json.loads((out / "summary.json").read_text())
        runs.append(
            {
                "num_tasks": count,
                "tasks": tasks,
                "steps": summary["counts"]["steps"],
                "kept": summary["counts"]["kept"],
                "means": summary["means"],
                "manifest_bytes": (out / "manifest.parquet").stat().st_size,
            }
        )
        shutil.rmtree(out, ignore_errors=True)
    report = {
        "rows": args.rows,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "ratio": args.ratio,
        "method": args.method,
        "super_batches_chosen": None if args.all_steps else args.steps,
        "score_set_written_s": round(made, 1),
        "runs": runs,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
