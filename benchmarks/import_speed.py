"""Throughput of `jestcurate import` on a synthetic pool in DataComp's layout.

    python benchmarks/import_speed.py [--rows 1000000] [--dim 768] [--rows-per-file 10000]

Writes --rows rows as DataComp pool files (NAME.parquet with uid, url, text; NAME.npz with
float16 `l14_img`, `l14_txt` of width --dim, and `b32_*` of width 512), kept in --workdir for
reruns, then runs `jestcurate import --format datacomp --logit-scale 100` in a child process and
reports rows/s, the child's peak memory and the score set's size on disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def ensure_pool(folder: Path, rows: int, dim: int, per_file: int) -> float:
    done = folder / "benchmark.json"
    wanted = {"rows": rows, "dim": dim, "per_file": per_file}
    if done.exists() and json.loads(done.read_text()) == wanted:
        return 0.0
    began = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(rows // per_file):
        name = f"{f:08d}"
        uids = [f"{f:08x}{i:024x}" for i in range(per_file)]
        pq.write_table(
            pa.table(
                {
                    "uid": uids,
                    "url": [f"https://example.com/{f}/{i}.jpg" for i in range(per_file)],
                    "text": [f"a photo number {i} of file {f}" for i in range(per_file)],
                }
            ),
            folder / f"{name}.parquet",
        )
        img = rng.standard_normal((per_file, dim), dtype=np.float32)
        txt = img + rng.standard_normal((per_file, dim), dtype=np.float32)
        small = rng.standard_normal((per_file, 512), dtype=np.float32).astype(np.float16)
        np.savez(
            folder / f"{name}.npz",
            l14_img=img.astype(np.float16),
            l14_txt=txt.astype(np.float16),
            b32_img=small,
            b32_txt=small,
        )
    done.write_text(json.dumps(wanted))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-import-bench"))
    args = parser.parse_args()
    if args.rows % args.rows_per_file:
        parser.error("--rows must be a multiple of --rows-per-file")
    pool = args.workdir / f"pool-{args.rows}-d{args.dim}"
    made = ensure_pool(pool, args.rows, args.dim, args.rows_per_file)
    out = args.workdir / f"scores-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "jestcurate", "import", str(pool), "--format", "datacomp",
        "--out", str(out), "-m", "ViT-L-14", "--logit-scale", "100",
    ]  # fmt: skip
    began = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    size = sum(p.stat().st_size for p in (out / "parts").glob("*.parquet"))
    print(
        json.dumps(
            {
                "rows": args.rows,
                "dim": args.dim,
                "files": args.rows // args.rows_per_file,
                "pool_written_s": round(made, 1),
                "import_wall_s": round(wall, 1),
                "rows_per_s": round(args.rows / wall),
                "peak_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                ),
                "score_set_bytes_per_row": round(size / args.rows, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
