"""Throughput of `jestcurate score` against the model-only ceiling, same model, batch and device.

    python benchmarks/throughput.py [--model jc-tiny] [--shards 16] [--samples 512]
        [--batch-size B] [--workers N] [--device auto] [--image-size 256]
        [--decode auto|pil|pil-draft|torch] [--rounds 3] [--baseline CHECKOUT] [--pool DIR]

Writes a synthetic corpus (img2dataset-sized 256 px JPEGs by default) to a temp dir (or scores
the shards in --pool, made beforehand, e.g. by `jestcurate synth`), then, in
each of --rounds rounds, one after the other so that a VM's drifting speed hits both alike:
1. model only: encode_image + encode_text on already-preprocessed batches held in memory, in a
   fresh process with this environment as it is (OpenMP's default wait policy: the best case);
2. score: the `jestcurate score` command, as a user runs it, in a fresh process (read tars,
   decode, preprocess, tokenize, encode, score, write Parquet). "Steady" is its own summary's
   throughput (from the first chunk on); "end to end" is the whole process, start-up included.
3. with --baseline, the same `score` command from another checkout of jestcurate (a git
   worktree of an earlier commit, run with PYTHONPATH set to it), in the same rounds.
Prints samples/s for each round, the medians and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def model_only(args: argparse.Namespace) -> float:
    """Samples/s of encode_image + encode_text alone, in this process."""
    import numpy as np
    import torch

    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
    from jestcurate.pipelines.synth import CLASSES, draw_image

    spec = ModelSpec(args.model, args.pretrained, args.device, args.precision)
    model = load_model(resolve_spec(spec), warn_random=False)
    rng = np.random.default_rng(0)
    images = [
        model.preprocess(draw_image(int(rng.integers(len(CLASSES))), rng, args.image_size))
        for _ in range(args.batch_size)
    ]
    batch = torch.stack(images).to(model.device)
    tokens = model.tokenizer([f"a photo of shape number {i}" for i in range(args.batch_size)])
    tokens = tokens.to(model.device)
    rounds = max(3, args.shards * args.samples // args.batch_size)
    for _ in range(3):  # warm-up
        model.encode_image(batch), model.encode_text(tokens)
    _sync(model.device)
    began = time.perf_counter()
    for _ in range(rounds):
        model.encode_image(batch), model.encode_text(tokens)
    _sync(model.device)
    return rounds * args.batch_size / (time.perf_counter() - began)


def _sync(device: object) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize()


def score_once(
    args: argparse.Namespace, pool: Path, out: Path, checkout: Path | None = None
) -> dict:
    cmd = [
        sys.executable, "-m", "jestcurate", "score", str(pool), "--out", str(out),
        "-m", args.model, "--batch-size", str(args.batch_size), "--device", args.device,
        "--decode", args.decode,
    ]  # fmt: skip
    for flag, value in (("--pretrained", args.pretrained), ("--precision", args.precision)):
        if value:
            cmd += [flag, value]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    began = time.perf_counter()
    # `python -m` puts the working directory first on sys.path: run the baseline from inside its
    # checkout, or this checkout's package would shadow it.
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"score failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    steady = re.search(r"throughput\s+([\d,.]+) samples/s on (\S+)", done.stdout)
    samples = re.search(r"samples read\s+([\d,]+)", done.stdout)
    if steady is None or samples is None:
        sys.exit(f"no throughput in score's summary:\n{done.stdout[-3000:]}")
    n = int(samples.group(1).replace(",", ""))
    return {
        "steady": float(steady.group(1).replace(",", "")),
        "end_to_end": n / seconds,
        "wall_s": seconds,
        "device": steady.group(2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jc-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None, help="default: score's own")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--decode", default="auto", choices=["auto", "pil", "pil-draft", "torch"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time")
    parser.add_argument(
        "--pool", type=Path, default=None, help="score these shards instead of new ones"
    )
    parser.add_argument("--model-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size is None:  # score's default for the device, given to both measurements
        from jestcurate.model.openclip import resolve_device
        from jestcurate.pipelines.score import DEFAULT_BATCH

        args.batch_size = DEFAULT_BATCH.get(resolve_device(args.device).type, 64)
    if args.model_only:  # the child process of step 1
        print(model_only(args))
        return

    from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus

    ceilings: list[float] = []
    runs: list[dict] = []
    baseline: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = args.pool or Path(tmp) / "pool"
        if args.pool is None:
            spec = CorpusSpec(
                shards=args.shards,
                samples_per_shard=args.samples,
                image_size=args.image_size,
                noise=PRESETS["noisy"],
            )
            write_corpus(pool, spec)
        child = [sys.executable, __file__, "--model-only", *sys.argv[1:]]
        for r in range(args.rounds):
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            ceilings.append(float(done.stdout.strip().splitlines()[-1]))
            runs.append(score_once(args, pool, Path(tmp) / f"scores-{r}"))
            line = (
                f"round {r + 1}: model only {ceilings[-1]:8.1f} samples/s | score "
                f"{runs[-1]['steady']:8.1f} steady, {runs[-1]['end_to_end']:8.1f} end to end "
                f"({runs[-1]['wall_s']:.1f} s)"
            )
            if args.baseline:
                old = score_once(args, pool, Path(tmp) / f"baseline-{r}", args.baseline)
                baseline.append(old)
                line += f" | baseline {old['steady']:8.1f} steady ({old['wall_s']:.1f} s)"
            print(line, flush=True)

    import torch

    ceiling = statistics.median(ceilings)
    steady = statistics.median(r["steady"] for r in runs)
    device = runs[0]["device"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    result = {
        "model": args.model,
        "device": device,
        "device_name": name or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": args.image_size,
        "decode": args.decode,
        "samples": args.shards * args.samples,
        "omp_wait_policy_here": os.environ.get("OMP_WAIT_POLICY"),
        "model_only_samples_per_s": [round(c, 1) for c in ceilings],
        "score_steady_samples_per_s": [round(r["steady"], 1) for r in runs],
        "score_end_to_end_samples_per_s": [round(r["end_to_end"], 1) for r in runs],
        "steady_ratio_per_round": [
            round(r["steady"] / c, 3) for r, c in zip(runs, ceilings, strict=True)
        ],
        "steady_ratio_of_medians": round(steady / ceiling, 3),
    }
    if baseline:
        result["baseline"] = str(args.baseline)
        result["baseline_steady_samples_per_s"] = [round(r["steady"], 1) for r in baseline]
        result["baseline_end_to_end_samples_per_s"] = [round(r["end_to_end"], 1) for r in baseline]
        result["baseline_steady_ratio_of_medians"] = round(
            statistics.median(r["steady"] for r in baseline) / ceiling, 3
        )
    print(f"model only : {ceiling:9.1f} samples/s (median of {args.rounds})")
    print(f"score      : {steady:9.1f} samples/s steady (median)")
    print(f"ratio      : {steady / ceiling:.3f} of model-only")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
