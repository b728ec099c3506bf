"""Speed and peak memory of `jestcurate select` on synthetic score sets.

    python benchmarks/select_speed.py --rows 1000000 [--dim 512] [--batch-size 4096]
        [--ratio 0.2] [--method jest] [--learner] [--max-steps 4] [--workdir DIR]
        [--select-args "--sampler paper"]

Writes a synthetic score set of --rows rows (10,000 per part; kept in --workdir for reruns),
then runs `jestcurate select` in a child process and reports:
* the cache pass (reading the score set, copying eligible rows): rows/s;
* choosing: candidates/s over --max-steps super-batches (each step examines B = b / ratio);
* the child's peak resident memory (ru_maxrss).
Disk: about 2 * 2 * dim bytes per row for the score set and the same again, briefly, for the
selection's cache (x2 with --learner).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from jestcurate.pipelines.synth import write_score_set

ROWS_PER_PART = 10_000


def ensure_set(path: Path, rows: int, dim: int, role: str, seed: int, noise: float) -> float:
    """Write the synthetic set unless a finished one is there; returns seconds spent."""
    done = path / "benchmark.json"
    wanted = {"rows": rows, "dim": dim, "role": role, "seed": seed}
    if done.exists() and json.loads(done.read_text()) == wanted:
        return 0.0
    began = time.perf_counter()
    write_score_set(
        path,
        shards=rows // ROWS_PER_PART,
        rows_per_shard=ROWS_PER_PART,
        dim=dim,
        seed=seed,
        role=role,
        noise=noise,
        exact_losses=False,
    )
    done.write_text(json.dumps(wanted))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="jest")
    parser.add_argument("--learner", action="store_true")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-bench"))
    parser.add_argument(
        "--select-args", default="", help='more select options, e.g. "--sampler paper"'
    )
    args = parser.parse_args()
    if args.rows % ROWS_PER_PART:
        parser.error(f"--rows must be a multiple of {ROWS_PER_PART}")

    base = args.workdir / f"rows{args.rows}-d{args.dim}"
    made = ensure_set(base / "ref", args.rows, args.dim, "reference", 1, 0.3)
    if args.learner:
        made += ensure_set(base / "learner", args.rows, args.dim, "learner", 2, 3.0)
    out = base / f"sel-{args.method}-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "jestcurate", "-v", "select", str(base / "ref"), "--out", str(out),
        "--method", args.method, "-b", str(args.batch_size), "--ratio", str(args.ratio),
        "--max-steps", str(args.max_steps), "--device", "cpu",
    ]  # fmt: skip
    if args.learner:
        cmd += ["--learner", str(base / "learner")]
    cmd += shlex.split(args.select_args)
    began = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    log = result.stderr

    def phase(label: str) -> float:
        found = re.search(rf"{re.escape(label)}: \d+ \w+(?: \w+)? in ([\d.]+)s", log)
        return float(found.group(1)) if found else float("nan")

    scan, copy = phase("checking score sets"), phase("copying eligible rows")
    choose = phase(f"selecting ({args.method})")
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["counts"]["steps"]
    big = round(args.batch_size / args.ratio)
    report = {
        "rows": args.rows,
        "dim": args.dim,
        "method": args.method,
        "select_args": args.select_args,
        "learner": args.learner,
        "batch_size": args.batch_size,
        "super_batch": big,
        "steps_run": steps,
        "score_set_written_s": round(made, 1),
        "scan_s": scan,
        "cache_copy_s": copy,
        "cache_rows_per_s": round(args.rows / (scan + copy)),
        "choose_s": choose,
        "choose_candidates_per_s": round(steps * big / choose),
        "select_wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_mib),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
