"""Throughput of `jestcurate score` against the model-only ceiling, same model, batch and device.

    python benchmarks/throughput.py [--model jc-tiny] [--shards 16] [--samples 512]
        [--batch-size 256] [--workers N] [--device auto] [--image-size 256]
        [--decode auto|pil|pil-draft|torch]

Writes a synthetic corpus (img2dataset-sized 256 px JPEGs by default) to a temp dir, then
1. model only: encode_image + encode_text on already-preprocessed batches held in memory;
2. score: the full pipeline (read tars, decode, preprocess, tokenize, encode, score, write Parquet).
Prints samples/s for both and their ratio; steady state excludes model loading and worker start.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines.synth import CLASSES, PRESETS, CorpusSpec, draw_image, write_corpus


class Clock:
    """A score Progress that notes when the first chunk arrives and when the last shard ends."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.samples_seen = 0

    def start(self, total: int, skipped: int) -> None:
        pass

    def samples(self, n: int) -> None:
        self.first = self.first or time.perf_counter()
        self.samples_seen += n

    def shard_done(self, result: object) -> None:
        self.last = time.perf_counter()


def model_only(args: argparse.Namespace, rounds: int, threads: int | None = None) -> float:
    """Samples/s of encode_image + encode_text alone; `threads` caps torch's CPU threads."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _model_only(args, rounds)
    finally:
        torch.set_num_threads(before)


def _model_only(args: argparse.Namespace, rounds: int) -> float:
    resolved = resolve_spec(ModelSpec(args.model, args.pretrained, args.device, args.precision))
    model = load_model(resolved)
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [
        model.preprocess(draw_image(int(rng.integers(len(CLASSES))), rng, size))
        for _ in range(args.batch_size)
    ]
    batch = torch.stack(images)
    tokens = model.tokenizer([f"a photo of shape number {i}" for i in range(args.batch_size)])
    if model.device.type == "cuda":
        batch, tokens = batch.pin_memory(), tokens.pin_memory()
    for _ in range(3):  # warm-up
        model.encode_image(batch), model.encode_text(tokens)
    _sync(model.device)
    began = time.perf_counter()
    for _ in range(rounds):
        model.encode_image(batch), model.encode_text(tokens)
    _sync(model.device)
    return rounds * args.batch_size / (time.perf_counter() - began)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jc-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--decode", default="auto", choices=["auto", "pil", "pil-draft", "torch"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        spec = CorpusSpec(
            shards=args.shards,
            samples_per_shard=args.samples,
            image_size=args.image_size,
            noise=PRESETS["noisy"],
        )
        write_corpus(pool, spec)
        total = args.shards * args.samples
        rounds = max(3, total // args.batch_size)
        ceiling = model_only(args, rounds)
        workers = args.workers
        if workers is None:
            workers = score_mod.default_workers("cuda" if torch.cuda.is_available() else "cpu")
        # On a CPU, score gives the model only the cores its decoding workers leave.
        shared = None
        if args.device == "cpu" or not torch.cuda.is_available():
            shared = model_only(args, rounds, threads=max(1, score_mod._cores() - workers))

        clock = Clock()
        cfg = score_mod.ScoreConfig(
            inputs=(str(pool),),
            out=Path(tmp) / "scores",
            model=args.model,
            pretrained=args.pretrained,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            workers=args.workers,
            decode=args.decode,
        )
        began = time.perf_counter()
        report = score_mod.run(cfg, clock)
        end_to_end = report.samples / (time.perf_counter() - began)
        steady = report.samples / (clock.last - (clock.first or began))

    device = report.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    result = {
        "model": args.model,
        "device": device,
        "device_name": name or platform.machine(),
        "batch_size": args.batch_size,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "decode": args.decode,
        "samples": total,
        "model_only_samples_per_s": round(ceiling, 1),
        "model_only_with_threads_score_leaves_samples_per_s": shared and round(shared, 1),
        "score_steady_samples_per_s": round(steady, 1),
        "score_end_to_end_samples_per_s": round(end_to_end, 1),
        "steady_ratio": round(steady / ceiling, 3),
    }
    print(f"model only : {ceiling:9.1f} samples/s ({torch.get_num_threads()} torch threads)")
    if shared:
        print(f"             {shared:9.1f} samples/s with the threads score leaves the model")
    print(f"score      : {steady:9.1f} samples/s steady, {end_to_end:.1f} end to end")
    print(f"ratio      : {steady / ceiling:.3f} of model-only")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
