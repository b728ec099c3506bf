"""`jestcurate eval` as a user runs it, on the synthetic corpus with the tiny model (CPU):

    python benchmarks/eval_synthetic.py [--workdir DIR] [--out docs/eval-synthetic] [--seeds 2]

1. a clean guide split, a noisy pool and clean held-out splits (synth.py), a reference trained
   on the guide split and a proxy learner on a tenth of the pool (`jestcurate train`), the pool
   scored with both (`jestcurate score`);
2. selections of b 32 at ratio 0.2: jest (learnability) and the CLIP-score filter;
3. `jestcurate eval` with its tiny recipe on the uniform pool and both selections, evaluated
   on a zero-shot set in clip_benchmark's layout and a retrieval split.
Every step is the CLI; the eval's results.json, results.md and curves.png are copied to --out.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jestcurate.pipelines.synth import (
    PRESETS,
    CorpusSpec,
    write_corpus,
    write_retrieval_set,
    write_zeroshot_set,
)


def cli(*args: object) -> None:
    command = [sys.executable, "-m", "jestcurate", *map(str, args)]
    print("$ jestcurate " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-eval-synthetic"))
    parser.add_argument("--out", type=Path, default=Path("docs/eval-synthetic"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    work = args.workdir
    began = time.time()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "pool").is_dir():
        write_corpus(work / "guide", CorpusSpec(4, 1000, 11, 64, PRESETS["clean"]))
        write_corpus(work / "pool", CorpusSpec(40, 500, 12, 64, PRESETS["noisy"], first_shard=100))
        write_zeroshot_set(work / "zeroshot", samples=640, seed=13)
        write_retrieval_set(work / "retrieval", samples=500, seed=14)
    common = ["-m", "jc-tiny", "--batch-size", 64, "--lr", "1e-3"]
    if not (work / "reference.pt").is_file():
        cli("train", work / "guide", "--out", work / "reference.pt", "--steps", 300, *common)
    if not (work / "learner.pt").is_file():
        slice_ = f"{work}/pool/{{00100..00103}}.tar"
        cli("train", slice_, "--out", work / "learner.pt", "--steps", 60, *common)
    for role in ("reference", "learner"):
        cli("score", work / "pool", "--out", work / "scores" / role, "-m", "jc-tiny",
            "--pretrained", work / f"{role}.pt", "--role", role)  # fmt: skip
    selections = {
        "jest-learnability": ["--learner", work / "scores" / "learner", "--method", "jest"],
        "clip-score": ["--method", "clip-score"],
    }
    for name, how in selections.items():
        cli("select", work / "scores" / "reference", "--out", work / name, *how, "-b", 32,
            "--ratio", 0.2)  # fmt: skip
    picked = [a for name in selections for a in ("-s", work / name)]
    cli("eval", work / "pool", "--out", work / "eval", *picked, "--eval", work / "zeroshot",
        "--eval", work / "retrieval", "--scale", "tiny", "--steps", args.steps, "-b", 32,
        "--seeds", args.seeds)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "curves.png", "results.json"):
        shutil.copy(work / "eval" / name, args.out / name)
    print(f"{time.time() - began:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
