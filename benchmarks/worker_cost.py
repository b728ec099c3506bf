"""What one decoding worker spends per sample, stage by stage, on one thread.

    python benchmarks/worker_cost.py [--model jc-tiny] [--shards 4] [--samples 512]
        [--image-size 256]

Writes synthetic shards, then times, in this process and without a profiler: reading the tars;
reading plus parsing (hash, JSON, caption, image header); the same plus PIL's decode;
tokenising; and a whole ShardStream pass (what a `score` worker does) with each decoder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from jestcurate.io.reader import iter_raw_samples, parse_sample
from jestcurate.io.shards import assign_names, expand_inputs, open_shard
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines import score
from jestcurate.pipelines.score.decoding import choose_decoding
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jc-tiny")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    spec = ModelSpec(args.model, None, "cpu", "fp32")
    model = load_model(resolve_spec(spec), warn_random=False)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = CorpusSpec(shards=args.shards, samples_per_shard=args.samples,
                            image_size=args.image_size, noise=PRESETS["noisy"])  # fmt: skip
        write_corpus(Path(tmp), corpus)
        shards = assign_names(expand_inputs([tmp]))

        def samples(decode: bool | None) -> int:
            n, captions = 0, []
            for shard in shards:
                with open_shard(shard.url) as f:
                    seen: set[str] = set()
                    for raw in iter_raw_samples(f):
                        n += 1
                        if decode is not None:
                            row, _ = parse_sample(raw, seen, 10**9, defer_jpeg=not decode)
                            captions.append(row["caption"])
            return n

        def tokens() -> int:
            captions = ["a photo of a small red circle on a noisy field"] * 2048
            for i in range(0, len(captions), 256):
                model.tokenizer(captions[i : i + 256])
            return len(captions)

        def stream(decode: str) -> int:
            decoding = choose_decoding(decode, decode, model, workers=1)  # as a worker runs it
            it = score.ShardStream(shards, model.preprocess, model.tokenizer, 256, 10**9, decoding)
            return sum(len(chunk.rows) for chunk in it)

        stages = {
            "read tars": lambda: samples(None),
            "read + parse (no decode)": lambda: samples(False),
            "read + parse + PIL decode": lambda: samples(True),
            "tokenize": tokens,
            "worker, pil": lambda: stream("pil"),
            "worker, pil-draft": lambda: stream("pil-draft"),
            "worker, torch": lambda: stream("torch"),
        }
        result = {"model": args.model, "image_size": args.image_size}
        for name, run in stages.items():
            began = time.perf_counter()
            n = run()
            result[name] = round(1000 * (time.perf_counter() - began) / n, 3)
            print(f"{name:28s} {result[name]:.3f} ms/sample")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
