"""The search: every status-ok pool row against each evaluation set with exact faiss inner
products (IndexFlatIP on unit vectors: cosines), the pool streamed part by part and searched in
chunks, so memory holds one part and the evaluation sets, whatever the pool's size.

A row is a hit on an evaluation set when its image's cosine to one of the set's images is at
least the threshold, or, for a set with captions, when the mean of its image's cosine to an
evaluation image and its caption's cosine to a caption of that same image is (a near copy of
the pair, which tolerates a heavier edit of the image when the caption came along)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.io.schema import embedding_matrix
from jestcurate.io.store import ScoreSet
from jestcurate.pipelines.decontam.config import IMAGE, PAIR
from jestcurate.pipelines.decontam.evalsets import EvalSet, pair_vectors, unit
from jestcurate.pipelines.decontam.output import SCHEMA

CHUNK = 1 << 15  # pool rows per faiss search
SAMPLE = 200_000  # about this many pool rows' closest cosines are kept for the quantiles
EXAMPLES = 5  # hits kept for the summary: the closest, and the closest to the threshold
SHOWN_AT = (0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999)


def gpu_resources(gpu: bool) -> Any:
    """faiss's GPU resources, made once and shared by every index (None on the CPU)."""
    if not gpu:
        return None
    import faiss

    return faiss.StandardGpuResources()


class Indexes:
    """An evaluation set's faiss indexes: its images, and its (image, caption) pairs."""

    def __init__(self, evalset: EvalSet, resources: Any) -> None:
        self.resources = resources
        self.images = self._index(evalset.images)
        self.pairs = self._index(evalset.pairs) if len(evalset.pairs) else None

    def _index(self, vectors: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        if self.resources is not None:
            index = faiss.index_cpu_to_gpu(self.resources, 0, index)
        return index


def nearest_other(evalset: EvalSet, indexes: Indexes) -> np.ndarray:
    """Each evaluation image's cosine to its most similar other evaluation image: how close
    distinct images of this set sit in this model's space."""
    n = len(evalset.images)
    if n < 2:
        return np.zeros(0, dtype=np.float32)
    sims, ids = indexes.images.search(evalset.images, 2)
    itself = ids[:, 0] == np.arange(n)
    return np.where(itself, sims[:, 1], sims[:, 0]).astype(np.float32)


@dataclass
class Tally:
    """What one evaluation set found in the pool: hits, examples, and for the summary how many
    rows other thresholds would flag (exactly) and a sample of the rows' closest cosines."""

    thresholds: np.ndarray  # rows_at counts the rows whose closest cosine reaches each
    image_hits: int = 0
    pair_hits: int = 0
    at: np.ndarray = field(init=False)
    largest: float = -np.inf
    sample: list[np.ndarray] = field(default_factory=list)
    closest: list[dict[str, Any]] = field(default_factory=list)
    borderline: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.at = np.zeros(len(self.thresholds), dtype=np.int64)

    @property
    def hits(self) -> int:
        return self.image_hits + self.pair_hits

    def count(self, closest: np.ndarray, sampled: np.ndarray) -> None:
        """A chunk's closest cosines (image, or the pair's mean where higher)."""
        self.at += (closest[:, None] >= self.thresholds[None, :]).sum(axis=0)
        self.sample.append(closest[sampled])
        if len(closest):
            self.largest = max(self.largest, float(closest.max()))

    def add_examples(self, found: list[dict[str, Any]]) -> None:
        self.closest = sorted(self.closest + found, key=lambda e: -e["cosine"])[:EXAMPLES]
        self.borderline = sorted(self.borderline + found, key=lambda e: e["cosine"])[:EXAMPLES]

    def rows_at(self, threshold: float) -> int:
        """Pool rows whose closest cosine is at least `threshold` (one of `thresholds`)."""
        return int(self.at[np.flatnonzero(self.thresholds == threshold)[0]])

    def quantiles(self) -> dict[str, Any] | None:
        """Quantiles of the sampled pool rows' closest cosine to this set, and the largest."""
        values = np.concatenate(self.sample) if self.sample else np.zeros(0)
        if not len(values):
            return None
        qs = np.quantile(values.astype(np.float64), [0.5, 0.9, 0.99, 0.999])
        out = {k: round(float(v), 6) for k, v in zip(_QUANTILES, qs, strict=True)}
        return {"sample": len(values), **out, "max": round(self.largest, 6)}


_QUANTILES = ("median", "p90", "p99", "p99.9")


@dataclass
class Totals:
    rows: int = 0  # every row of the pool, errors included
    ok_rows: int = 0
    searched: int = 0  # ok rows with an image embedding
    excluded: int = 0


@dataclass
class _Best:
    """Per pool row of a chunk: the evaluation set, item, match and cosine that decide."""

    cosine: np.ndarray
    image_cosine: np.ndarray
    evalset: np.ndarray
    item: np.ndarray
    pair: np.ndarray

    @classmethod
    def none(cls, n: int) -> _Best:
        unset = np.full(n, -1, np.int64)
        cosines = np.full(n, -np.inf, np.float32), np.full(n, np.nan, np.float32)
        return cls(*cosines, unset, unset.copy(), np.zeros(n, bool))


class Search:
    """The pool against every evaluation set at one threshold."""

    def __init__(
        self,
        evalsets: list[EvalSet],
        indexes: list[Indexes],
        threshold: float,
        counted: list[list[float]],
        rows: int,
    ) -> None:
        """`counted`: per evaluation set, the thresholds whose pool rows its tally counts
        (besides SHOWN_AT and `threshold`); `rows`: about how many rows the pool has, for the
        rate of the cosine sample."""
        self.evalsets = evalsets
        self.indexes = indexes
        self.threshold = threshold
        self.tallies = [
            Tally(np.array(sorted({*SHOWN_AT, threshold, *extra}), dtype=np.float64))
            for extra in counted
        ]
        self.totals = Totals()
        self.pairs = any(ix.pairs is not None for ix in indexes)
        self.rate = min(1.0, SAMPLE / max(rows, 1))
        self.rng = np.random.default_rng(0)

    def part(self, scores: ScoreSet, name: str) -> pa.Table | None:
        """One part's rows against every evaluation set; its hits as a table (None if none)."""
        columns = [
            "key",
            "shard",
            "index",
            "status",
            "img_emb",
            *(["txt_emb"] if self.pairs else []),
        ]
        table = scores.read_part(name, columns)
        self.totals.rows += table.num_rows
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        self.totals.ok_rows += ok.num_rows
        image = embedding_matrix(ok.column("img_emb"))
        rows = np.flatnonzero(np.isfinite(image).all(axis=1))
        self.totals.searched += len(rows)
        caption = embedding_matrix(ok.column("txt_emb"))[rows] if self.pairs else None
        image = image[rows]
        shard = table.column("shard")[0].as_py() if table.num_rows else name
        found = []
        for first in range(0, len(rows), CHUNK):
            stop = first + CHUNK
            text = None if caption is None else caption[first:stop]
            best = self._chunk(image[first:stop], text, ok, rows[first:stop], shard)
            hit = np.flatnonzero(best.cosine >= self.threshold)
            if len(hit):
                found.append((rows[first:stop][hit], best, hit))
        if not found:
            return None
        hits = sum(len(h) for _, _, h in found)
        self.totals.excluded += hits
        return self._table(ok, shard, name, found)

    def _chunk(
        self, image: np.ndarray, caption: np.ndarray | None, ok: pa.Table, rows: np.ndarray,
        shard: str,
    ) -> _Best:  # fmt: skip
        x = unit(image)
        best = _Best.none(len(x))
        sampled = self.rng.random(len(x)) < self.rate
        paired = None
        if caption is not None:
            t = np.nan_to_num(caption, nan=0.0)  # no caption: the pair's mean stays low
            paired = pair_vectors(x, unit(t))
        for s, (evalset, ix) in enumerate(zip(self.evalsets, self.indexes, strict=True)):
            sims, ids = ix.images.search(x, 1)
            cosine, item = sims[:, 0], ids[:, 0].astype(np.int64)
            image_cosine = cosine.copy()
            is_pair = np.zeros(len(x), dtype=bool)
            closest = cosine
            if ix.pairs is not None and paired is not None:
                psims, pids = ix.pairs.search(paired, 1)
                pair_cosine = psims[:, 0]
                pair_item = evalset.pair_item[pids[:, 0]]
                # The pair decides only where the image alone does not.
                is_pair = (cosine < self.threshold) & (pair_cosine >= self.threshold)
                where = np.flatnonzero(is_pair)
                cosine = np.where(is_pair, pair_cosine, cosine)
                item = np.where(is_pair, pair_item, item)
                image_cosine[where] = np.einsum(
                    "ij,ij->i", x[where], evalset.images[pair_item[where]]
                )
                closest = np.maximum(closest, pair_cosine)
            tally = self.tallies[s]
            tally.count(closest, sampled)
            hit = cosine >= self.threshold
            tally.pair_hits += int((hit & is_pair).sum())
            tally.image_hits += int((hit & ~is_pair).sum())
            if hit.any():
                tally.add_examples(self._examples(s, hit, cosine, item, is_pair, ok, rows, shard))
            better = hit & (cosine > best.cosine)
            best.cosine[better] = cosine[better]
            best.image_cosine[better] = image_cosine[better]
            best.evalset[better] = s
            best.item[better] = item[better]
            best.pair[better] = is_pair[better]
        return best

    def _examples(
        self, s: int, hit: np.ndarray, cosine: np.ndarray, item: np.ndarray, is_pair: np.ndarray,
        ok: pa.Table, rows: np.ndarray, shard: str,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The chunk's hits that could be among the set's closest or borderline examples."""
        where = np.flatnonzero(hit)
        order = where[np.argsort(-cosine[where], kind="stable")]
        picks = np.unique(np.concatenate([order[:EXAMPLES], order[-EXAMPLES:]]))
        evalset = self.evalsets[s]
        return [
            {
                "pool_shard": shard,
                "pool_key": ok.column("key")[int(rows[p])].as_py(),
                "eval_shard": evalset.shards[int(item[p])],
                "eval_key": evalset.keys[int(item[p])],
                "match": PAIR if is_pair[p] else IMAGE,
                "cosine": round(float(cosine[p]), 6),
            }
            for p in picks.tolist()
        ]

    def _table(
        self, ok: pa.Table, shard: str, name: str, found: list[tuple[np.ndarray, _Best, np.ndarray]]
    ) -> pa.Table:
        at = np.concatenate([r for r, _, _ in found])
        pick = [(b, h) for _, b, h in found]
        cosine = np.concatenate([b.cosine[h] for b, h in pick])
        image_cosine = np.concatenate([b.image_cosine[h] for b, h in pick])
        sets = np.concatenate([b.evalset[h] for b, h in pick])
        items = np.concatenate([b.item[h] for b, h in pick])
        is_pair = np.concatenate([b.pair[h] for b, h in pick])
        names = [self.evalsets[s].name for s in sets.tolist()]
        eval_shards = [
            self.evalsets[s].shards[i] for s, i in zip(sets.tolist(), items.tolist(), strict=True)
        ]
        eval_keys = [
            self.evalsets[s].keys[i] for s, i in zip(sets.tolist(), items.tolist(), strict=True)
        ]
        index = pa.array(at)
        columns = {
            "shard": pa.array([shard] * len(at), pa.string()),
            "part": pa.array([name] * len(at), pa.string()),
            "key": ok.column("key").take(index),
            "index": ok.column("index").take(index).cast(pa.int32()),
            "match": pa.array([PAIR if p else IMAGE for p in is_pair.tolist()], pa.string()),
            "cosine": pa.array(cosine, pa.float32()),
            "image_cosine": pa.array(image_cosine, pa.float32()),
            "eval_set": pa.array(names, pa.string()),
            "eval_shard": pa.array(eval_shards, pa.string()),
            "eval_key": pa.array(eval_keys, pa.string()),
        }
        return pa.table(columns, schema=SCHEMA)
