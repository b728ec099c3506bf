"""A controlled test of what a batch's make-up is worth: one selection's kept rows, dealt into
batches again, so that only the batches change, not which rows are trained on:

    python benchmarks/recompose_batches.py WORKDIR ARM --how spread|captions|shuffled
                                           [--folder selections]

Writes WORKDIR/FOLDER/ARM-{how}/seed-K for every seed-K of ARM, which `jestcurate eval -s
NAME=SEED0,SEED1,...` trains like any chain of selections.
* spread: an oracle from the synthetic corpus's labels (benchmarks/batch_composition.py):
  the rows sorted by their image's class and dealt round-robin over the batches, so that a
  batch repeats a class only when it must (the fewest false negatives these rows allow).
* captions: the same dealing by clusters of the reference's caption embeddings (faiss
  spherical k-means, b clusters, over the selection's rows), which needs no labels.
* shuffled: the rows in a seeded random order, as a trainer that shuffles an export reads them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from batch_composition import labels

HOW = ("spread", "captions", "shuffled")


def caption_clusters(rows: list[tuple[str, str]], captions: dict, k: int, seed: int):
    """Each row's nearest of k spherical k-means centroids of its caption embedding."""
    from jestcurate.pipelines.dedup.passes import kmeans

    x = np.stack([captions[row] for row in rows]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = kmeans(x, k, seed, iterations=20, gpu=False)
    return np.argmax(x @ centroids.T, axis=1)


def reference_captions(scores: Path) -> dict[tuple[str, str], np.ndarray]:
    """(resolved shard, key) -> the reference's caption embedding, from its score set."""
    found = {}
    for part in sorted((scores / "parts").glob("*.parquet")):
        table = pq.read_table(part, columns=["shard", "key", "txt_emb"]).to_pydict()
        for shard, key, emb in zip(table["shard"], table["key"], table["txt_emb"], strict=True):
            if emb is not None:
                found[(str(Path(shard).resolve()), key)] = np.asarray(emb, dtype=np.float32)
    return found


def recompose(selection: Path, out: Path, how: str, known: dict, seed: int) -> None:
    """One selection's manifest with its rows dealt into batches again (same rows, same b).
    `known`: labels() for spread, reference_captions() for captions."""
    table = pq.read_table(selection / "manifest.parquet")
    summary = json.loads((selection / "summary.json").read_text())
    b, steps = summary["parameters"]["batch_size"], summary["counts"]["steps"]
    if how in ("spread", "captions"):
        shards = table.column("shard").to_pylist()
        keys = table.column("key").to_pylist()
        resolved = {s: str(Path(s).resolve()) for s in set(shards)}
        rows = [(resolved[s], k) for s, k in zip(shards, keys, strict=True)]
        group = (
            np.array([known[row][0] for row in rows])
            if how == "spread"
            else caption_clusters(rows, known, b, seed)
        )
        order = np.argsort(group, kind="stable")  # then dealt: row r of it to batch r % steps
        step = np.empty(len(order), dtype=np.int64)
        step[order] = np.arange(len(order)) % steps
    else:
        step = np.random.default_rng(seed).permutation(len(table)) // b
    position = np.empty(len(step), dtype=np.int32)
    for s in range(steps):  # positions within each new batch, in manifest order
        rows = np.flatnonzero(step == s)
        position[rows] = np.arange(len(rows))
    table = table.set_column(0, "step", pa.array(step)).set_column(
        1, "position", pa.array(position)
    )
    table = table.sort_by([("step", "ascending"), ("position", "ascending")])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "manifest.parquet")
    for name in ("summary.json", "uids.npy"):
        if (selection / name).is_file():
            shutil.copy(selection / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("arm")
    parser.add_argument("--how", choices=HOW, required=True)
    parser.add_argument("--folder", default="selections")
    args = parser.parse_args()
    if args.how == "captions":
        known = reference_captions(args.workdir / "scores" / "reference")
    else:
        known = labels(args.workdir / "pool")
    base = args.workdir / args.folder
    chain = sorted((base / args.arm).glob("seed-*"), key=lambda p: int(p.name[len("seed-") :]))
    for seed, selection in enumerate(chain):
        recompose(selection, base / f"{args.arm}-{args.how}" / selection.name, args.how, known,
                  seed)  # fmt: skip
        print(f"wrote {base / f'{args.arm}-{args.how}' / selection.name}")


if __name__ == "__main__":
    main()
