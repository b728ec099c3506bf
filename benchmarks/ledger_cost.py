"""What select's ledger costs: bytes per row on disk, and select's time with and without it.

    python benchmarks/ledger_cost.py [--rows 20000] [--rows-per-part 2000] [--dim 64]
        [--batch-size 256] [--repeats 3] [--methods jest,clip-score] [--workdir DIR]

Writes a synthetic score set (jestcurate.pipelines.synth.write_score_set: the shard and key
layout of write_corpus's shards, 2 % error rows, half the pairs noisy; kept in --workdir for
reruns), then runs select in this process (imports warm) with and without the ledger,
alternating, --repeats times each, with --min-clip-score 0 so that a filter takes rows too.
Prints the fastest wall time of each (the machine may be shared: the minimum is the least
disturbed), the overhead, the time spent writing the ledger itself (the fastest of the runs
with it; as a share of the fastest run without) and the ledger's bytes per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines.select import runner
from jestcurate.pipelines.synth import write_score_set


def ensure_set(path: Path, rows: int, per_part: int, dim: int) -> None:
    done = path / "benchmark.json"
    wanted = {"rows": rows, "per_part": per_part, "dim": dim}
    if done.exists() and json.loads(done.read_text()) == wanted:
        return
    shutil.rmtree(path, ignore_errors=True)
    write_score_set(path, shards=rows // per_part, rows_per_shard=per_part, dim=dim, seed=1,
                    error_fraction=0.02, exact_losses=False)  # fmt: skip
    done.write_text(json.dumps(wanted))


LEDGER_SECONDS: list[float] = []


def _timed(write):
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return write(*args, **kwargs)
        finally:
            LEDGER_SECONDS.append(time.perf_counter() - began)

    return timed


runner._write_ledger = _timed(runner._write_ledger)


def one(scores: Path, out: Path, method: str, b: int, ledger: bool) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = select_mod.SelectConfig(reference=scores, out=out, method=method,
                                  sampling=SamplerOptions(b, ratio=0.2), device="cpu",
                                  min_clip_score=0.0, ledger=ledger)  # fmt: skip
    began = time.perf_counter()
    summary = select_mod.run(cfg).summary
    return time.perf_counter() - began, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rows-per-part", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="jest,clip-score")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-bench-ledger"))
    args = parser.parse_args()
    scores = args.workdir / f"scores-{args.rows}-{args.rows_per_part}-{args.dim}"
    ensure_set(scores, args.rows, args.rows_per_part, args.dim)
    for method in args.methods.split(","):
        times: dict[bool, list[float]] = {True: [], False: []}
        LEDGER_SECONDS.clear()
        facts = {}
        for _ in range(args.repeats):
            for ledger in (False, True):
                seconds, summary = one(scores, args.workdir / "out", method, args.batch_size,
                                       ledger)  # fmt: skip
                times[ledger].append(seconds)
                facts = summary.get("ledger", facts)
        without, with_ = min(times[False]), min(times[True])
        writing = min(LEDGER_SECONDS)
        print(json.dumps({
            "method": method, "rows": args.rows, "rows_per_part": args.rows_per_part,
            "dim": args.dim, "batch_size": args.batch_size,
            "seconds_without": round(without, 3), "seconds_with": round(with_, 3),
            "overhead": f"{(with_ - without) / without:+.1%}",
            "ledger_write_seconds": round(writing, 3),
            "ledger_write_share": f"{writing / without:.1%}",
            "runs_without": [round(t, 3) for t in times[False]],
            "runs_with": [round(t, 3) for t in times[True]],
            "ledger_bytes": facts.get("bytes"), "bytes_per_row": facts.get("bytes_per_row"),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
