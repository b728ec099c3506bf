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
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from batch_composition import labels, row_ids

from jestcurate.io.derived import file_digests
from jestcurate.io.files import atomic_write, file_digest, read_json, write_json_atomic
from jestcurate.pipelines.select.config import MANIFEST, SUMMARY, UIDS

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
        ids = row_ids(table["shard"], table["key"])
        for row, emb in zip(ids, table["txt_emb"], strict=True):
            if emb is not None:
                found[row] = np.asarray(emb, dtype=np.float32)
    return found


def recompose(selection: Path, out: Path, how: str, known: dict, seed: int) -> None:
    """One selection's manifest with its rows dealt into batches again (same rows, same b),
    written as select writes one (a row group per step, page checksums, atomically, the
    summary last, with fresh file digests and what it was recomposed from); skipped when OUT
    already holds this recomposition. `known`: known_for(how, workdir)."""
    recomposed = {"of": str(selection.resolve()), "how": how, "seed": seed,
                  "of_summary_sha256": file_digest(selection / SUMMARY)["sha256"]}  # fmt: skip
    if (out / SUMMARY).is_file() and read_json(out / SUMMARY).get("recomposed") == recomposed:
        return
    table = pq.read_table(selection / MANIFEST)
    summary = read_json(selection / SUMMARY)
    b, steps = summary["parameters"]["batch_size"], summary["counts"]["steps"]
    if len(table) != steps * b:
        raise SystemExit(f"{selection}: {len(table)} rows is not {steps} batches of {b}")
    step = deal(table, how, known, b, steps, seed)
    position = np.empty(len(step), dtype=np.int32)
    for s in range(steps):  # positions within each new batch, in manifest order
        position[np.flatnonzero(step == s)] = np.arange(b)
    schema = table.schema
    for name, values in (("step", step), ("position", position)):
        field = schema.field(name)  # its type and not-null kept
        table = table.set_column(schema.get_field_index(name), field, pa.array(values, field.type))
    table = table.sort_by([("step", "ascending"), ("position", "ascending")])

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd",
                              write_page_checksum=True) as writer:  # fmt: skip
            for s in range(steps):
                writer.write_table(table.slice(s * b, b))

    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)  # no finished-looking folder while it is rewritten
    atomic_write(out / MANIFEST, write)
    if (selection / UIDS).is_file():  # the same rows, so the same DataComp subset
        atomic_write(out / UIDS, lambda tmp: shutil.copyfile(selection / UIDS, tmp))
    summary["files"] = file_digests(out, list(summary.get("files", {})))
    write_json_atomic(out / SUMMARY, {**summary, "recomposed": recomposed})


def deal(table: pa.Table, how: str, known: dict, b: int, steps: int, seed: int) -> np.ndarray:
    """Each row's new step: by group (class or caption cluster) dealt round-robin over the
    batches, or a seeded shuffle."""
    if how == "shuffled":
        return np.random.default_rng(seed).permutation(len(table)) // b
    rows = row_ids(table.column("shard").to_pylist(), table.column("key").to_pylist())
    group = (
        np.array([known[row][0] for row in rows])
        if how == "spread"
        else caption_clusters(rows, known, b, seed)
    )
    order = np.argsort(group, kind="stable")  # then dealt: row r of it to batch r % steps
    step = np.empty(len(order), dtype=np.int64)
    step[order] = np.arange(len(order)) % steps
    return step


def known_for(how: str, workdir: Path) -> dict:
    """What `how` deals by: the corpus's labels (spread), the reference's caption embeddings
    (captions), nothing (shuffled)."""
    if how == "captions":
        return reference_captions(workdir / "scores" / "reference")
    return labels(workdir / "pool") if how == "spread" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("arm")
    parser.add_argument("--how", choices=HOW, required=True)
    parser.add_argument("--folder", default="selections")
    args = parser.parse_args()
    known = known_for(args.how, args.workdir)
    base = args.workdir / args.folder
    chain = sorted((base / args.arm).glob("seed-*"), key=lambda p: int(p.name[len("seed-") :]))
    for seed, selection in enumerate(chain):
        recompose(selection, base / f"{args.arm}-{args.how}" / selection.name, args.how, known,
                  seed)  # fmt: skip
        print(f"wrote {base / f'{args.arm}-{args.how}' / selection.name}")


if __name__ == "__main__":
    main()
