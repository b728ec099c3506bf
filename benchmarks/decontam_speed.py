"""What `jestcurate decontaminate` costs per pool row, and what the synthetic plant finds.

    python benchmarks/decontam_speed.py speed [--rows 200000] [--dim 512] [--evals 1000 10000]
    python benchmarks/decontam_speed.py plant [--size 128] [--seeds 1 2] [--thresholds ...]

`speed`: a synthetic pool score set (`synth.write_score_set`, no model) searched against
synthetic evaluation score sets of each size; reports the search's pool rows per second and
the multiply-adds per row (M·D for the images and P·2D for the caption pairs of an evaluation
set of M images and P captions), on the CPU unless faiss sees a GPU.

`plant`: `synth.write_plant` (1,000 colour-field evaluation images, near copies of 500 of them
in a pool of 2,000 shapes and 1,000 other colour fields), pool and evaluation set scored with
jc-tiny (random weights, seed 0), then decontaminate at each threshold: recall on the planted
copies (matched to the image they copy) and the share of other fields and of shapes flagged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from jestcurate.pipelines import decontam
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_plant, write_score_set


def speed(args: argparse.Namespace, root: Path) -> None:
    shards = max(1, args.rows // 10_000)
    write_score_set(root / "pool", shards, args.rows // shards, dim=args.dim, exact_losses=False)
    for m in args.evals:
        evalset = root / f"eval-{m}"
        write_score_set(evalset, 1, m, dim=args.dim, seed=0, exact_losses=False)
        out = root / f"dc-{m}"
        done = decontam.run(decontam.DecontamConfig(root / "pool", (str(evalset),), out, 0.95))
        seconds = done["seconds_by_phase"]["search"]
        print(json.dumps({
            "pool_rows": done["searched"], "dim": args.dim, "eval_images": m,
            "eval_captions": done["sets"][0]["captions"],
            "multiply_adds_per_row": done["multiply_adds_per_row"], "device": done["device"],
            "search_seconds": seconds, "rows_per_second": round(done["searched"] / seconds),
        }))  # fmt: skip


def plant(args: argparse.Namespace, root: Path) -> None:
    for seed in args.seeds:
        where = root / f"seed{seed}"
        shapes = CorpusSpec(shards=20, samples_per_shard=100, seed=seed, image_size=args.size,
                            noise=dict(PRESETS["noisy"]))  # fmt: skip
        found = write_plant(where, eval_images=1000, planted=500, fields=1000, shapes=shapes,
                            size=args.size, seed=seed)  # fmt: skip
        for inputs, out in ((found.pool_dir, "pool-scores"), (found.eval_dir, "eval-scores")):
            cfg = score_mod.ScoreConfig(inputs=(str(inputs),), out=where / out, model="jc-tiny")
            score_mod.run(cfg)
        for threshold in args.thresholds:
            out = where / f"dc-{threshold}"
            against = (str(where / "eval-scores"),)
            done = decontam.run(
                decontam.DecontamConfig(where / "pool-scores", against, out, threshold)
            )
            rows = pq.read_table(out / decontam.OUTPUT).to_pylist()
            hits = {(r["shard"], r["key"]): r["eval_key"] for r in rows}
            recall = sum(hits.get(k) == v for k, v in found.planted.items()) / len(found.planted)
            false = {
                kind: sum(k in hits for k in keys) / len(keys)
                for kind, keys in found.others.items()
            }
            print(json.dumps({
                "size": args.size, "seed": seed, "threshold": threshold,
                "recall": round(recall, 4), "false_fields": round(false["fields"], 4),
                "false_shapes": round(false["shapes"], 4),
                "suggested": done["sets"][0]["suggested_threshold"],
            }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--evals", type=int, nargs="+", default=[1000, 10_000])
    p = sub.add_parser("plant")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--thresholds", type=float, nargs="+",
                   default=[0.95, 0.998, 0.999, 0.9992, 0.9993, 0.9995, 0.9996])  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="decontam-"))
    began = time.time()
    try:
        {"speed": speed, "plant": plant}[args.what](args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
