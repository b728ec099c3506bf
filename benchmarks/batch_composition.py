"""What the quality benchmark's selections put in a batch, read against the synthetic corpus's
own labels (each sample's .json names its kind and true class):

    python benchmarks/batch_composition.py WORKDIR [ARM[@SEED] ...] [--batch 32]
                                           [--folder selections] [--scores SET ...]

For each arm's selection (WORKDIR/FOLDER/ARM/seed-SEED, seed 0 unless given), and for
uniform batches drawn from the pool: the share of matched pairs (the caption names the image's
class: clean samples and their duplicates), the same-class others per row (a pair whose image
shows the class another row's caption names: a false negative for the contrastive loss), the
classes per batch, and over the whole selection the classes holding under 1 % of its rows and
the perplexity of its class shares (32 = every class alike). A duplicate counts as what it
copies.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

Label = tuple[int, int, str]  # image class, the class its caption names (-1: none), kind


def labels(pool: Path) -> dict[tuple[str, str], Label]:
    """(shard path, key) -> the sample's image class, caption class and kind."""
    found = {}
    for shard in sorted(pool.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    key = (str(shard.resolve()), member.name[: -len(".json")])
                    found[key] = (meta["jc_label"], meta["jc_caption_label"], meta["jc_kind"])
    return found


def row_ids(shards: list[str], keys: list[str]) -> list[tuple[str, str]]:
    """(shard, key) pairs with each shard path resolved, as labels() keys them (a workdir may
    reach its pool through links)."""
    resolved = {s: str(Path(s).resolve()) for s in set(shards)}
    return [(resolved[s], k) for s, k in zip(shards, keys, strict=True)]


def batch_stats(batch: list[Label]) -> tuple[float, float, int]:
    """Matched share (the caption names the image's class), same-class others per row, and
    classes in the batch."""
    image = np.array([row[0] for row in batch])
    caption = np.array([row[1] for row in batch])
    same = (image[:, None] == caption[None, :]) & (image[:, None] >= 0)
    np.fill_diagonal(same, False)
    clean = float(np.mean((image == caption) & (image >= 0)))
    return clean, float(same.sum()) / len(batch), len(set(image[image >= 0].tolist()))


def describe(name: str, batches: list[list[Label]], classes: int) -> str:
    stats = np.array([batch_stats(batch) for batch in batches])
    image = np.array([row[0] for batch in batches for row in batch])
    shares = np.bincount(image[image >= 0], minlength=classes) / max(1, int((image >= 0).sum()))
    nonzero = shares[shares > 0]
    perplexity = float(np.exp(-(nonzero * np.log(nonzero)).sum()))
    return (
        f"| {name} | {stats[:, 0].mean():.1%} | {stats[:, 1].mean():.2f} | "
        f"{stats[:, 2].mean():.1f} | {int((shares < 0.01).sum())} | {perplexity:.1f} |"
    )


def losses_by_kind(scores: Path, known: dict[tuple[str, str], Label]) -> str:
    """A score set's mean own loss (its ref_loss column) and clip_score per kind of pair."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for part in sorted((scores / "parts").glob("*.parquet")):
        table = pq.read_table(part, columns=["shard", "key", "ref_loss", "clip_score"])
        rows = table.to_pydict()
        ids = row_ids(rows["shard"], rows["key"])
        for row, loss, clip in zip(ids, rows["ref_loss"], rows["clip_score"], strict=True):
            by_kind.setdefault(known[row][2], []).append((loss, clip))
    means = {kind: np.mean(values, axis=0) for kind, values in sorted(by_kind.items())}
    return f"| {scores.name} | " + " | ".join(f"{m[0]:.2f} ({m[1]:.2f})" for m in means.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("arms", nargs="*", help="ARM or ARM@SEED under WORKDIR/selections")
    parser.add_argument("--batch", type=int, default=32, help="b of the uniform batches")
    parser.add_argument(
        "--folder", default="selections", help="the arms' folder under WORKDIR (selections-bB)"
    )
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument(
        "--scores", nargs="*", default=(),
        help="score sets under WORKDIR/scores: their mean loss and clip_score per kind of pair",
    )  # fmt: skip
    args = parser.parse_args()
    known = labels(args.workdir / "pool")
    if args.scores:
        kinds = sorted({label[2] for label in known.values()})
        print("| score set | " + " | ".join(f"{kind}: loss (cosine)" for kind in kinds) + " |")
        print("|" + " --- |" * (len(kinds) + 1))
        for name in args.scores:
            print(losses_by_kind(args.workdir / "scores" / name, known) + " |")
        print()
    rng = np.random.default_rng(0)
    keys = list(known)
    uniform = [
        [known[keys[i]] for i in rng.choice(len(keys), args.batch, replace=False)]
        for _ in range(len(keys) // (5 * args.batch))
    ]
    print("| selection | matched pairs | same-class others per row | classes per batch "
          "| classes under 1 % | class perplexity |")  # fmt: skip
    print("|" + " --- |" * 6)
    print(describe("uniform batches", uniform, args.classes))
    for arm in args.arms:
        name, _, seed = arm.partition("@")
        path = args.workdir / args.folder / name / f"seed-{seed or 0}" / "manifest.parquet"
        table = pq.read_table(path, columns=["step", "shard", "key"]).to_pydict()
        steps: dict[int, list[Label]] = {}
        for step, row in zip(table["step"], row_ids(table["shard"], table["key"]), strict=True):
            steps.setdefault(step, []).append(known[row])
        print(describe(arm, list(steps.values()), args.classes))


if __name__ == "__main__":
    main()
