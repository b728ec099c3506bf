"""Why a filter made a row ineligible, as data, for the ledger (ledger.py): each filter's result
on one part is a Verdict (the rows it took, its reason, the value it compared and with what,
and the other row it points at). A new filter is one more Verdict in `verdicts`' list.

The dedup and decontamination outputs are read one shard at a time (their row groups hold one
shard each: their statistics say which), so memory holds one part's evidence, not the pool's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jestcurate.errors import JCError, first_line
from jestcurate.io.files import read_json

MIN_CLIP_SCORE = "min_clip_score"


@dataclass(frozen=True)
class Verdict:
    """One filter's rows of a part (`mask`, over the part's rows) and why, per row or for all:
    `reason` (a string, or an object array of strings), the row's `value` and the `threshold`
    it was held to, and the row it points at (`other_shard`, `other_key`, `other_set`)."""

    fate: str  # "filtered", "duplicate" or "excluded"
    mask: np.ndarray
    reason: str | np.ndarray
    value: np.ndarray | None = None
    threshold: float | np.ndarray | None = None
    other_shard: np.ndarray | None = None
    other_key: np.ndarray | None = None
    other_set: np.ndarray | None = None


class ByShard:
    """A derived output's rows, one shard at a time, found by its row groups' statistics."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.columns = ["shard", "index", *columns]
        try:
            self.file = pq.ParquetFile(path, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise JCError(f"{path} is unreadable ({first_line(exc)})") from None
        meta = self.file.metadata
        at = self.file.schema_arrow.get_field_index("shard")
        self.groups: dict[str, list[int]] = {}
        self.mixed: list[int] = []  # row groups whose statistics do not name one shard
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(at).statistics
            if stats is not None and stats.has_min_max and stats.min == stats.max:
                self.groups.setdefault(str(stats.min), []).append(g)
            else:
                self.mixed.append(g)

    def rows(self, shard: str) -> pa.Table | None:
        groups = sorted(self.groups.get(shard, []) + self.mixed)
        if not groups:
            return None
        table = self.file.read_row_groups(groups, columns=self.columns)
        if self.mixed:
            table = table.filter(pc.equal(table.column("shard"), shard))
        return table


def _spread(n: int, index: np.ndarray, values: list[object]) -> np.ndarray:
    """An object array over a part's n rows holding `values` at the rows `index` names."""
    out = np.full(n, None, dtype=object)
    inside = index < n
    out[index[inside]] = np.array(values, dtype=object)[inside]
    return out


def _floats(n: int, index: np.ndarray, column: pa.ChunkedArray) -> np.ndarray:
    """A float32 array over a part's n rows holding `column` at the rows `index` names."""
    out = np.full(n, np.nan, dtype=np.float32)
    inside = index < n
    out[index[inside]] = column.fill_null(np.nan).to_numpy()[inside]
    return out


class Dedup:
    """A dedup output's duplicates: reason (exact or semantic), the kept row it duplicates and
    their cosine; the threshold is 1 - eps for semantic duplicates."""

    def __init__(self, directory: Path) -> None:
        from jestcurate.pipelines.dedup import OUTPUT

        columns = ["kept", "duplicate_of", "duplicate_of_shard", "similarity", "reason"]
        self.rows = ByShard(directory / OUTPUT, columns)
        eps = read_json(directory / "summary.json").get("params", {}).get("eps")
        self.cosine = None if eps is None else 1.0 - float(eps)

    def verdict(self, shard: str, mask: np.ndarray) -> Verdict:
        n = len(mask)
        found = self.rows.rows(shard) if mask.any() else None
        if found is None:
            return Verdict("duplicate", mask, "dedup")
        found = found.filter(pc.invert(found.column("kept")))
        index = found.column("index").to_numpy().astype(np.int64)
        reason = _spread(n, index, found.column("reason").to_pylist())
        similarity = _floats(n, index, found.column("similarity"))
        cosine = np.nan if self.cosine is None else self.cosine
        threshold = np.where(reason == "semantic", cosine, np.nan)
        return Verdict(
            "duplicate",
            mask,
            reason,
            similarity,
            threshold.astype(np.float32),
            _spread(n, index, found.column("duplicate_of_shard").to_pylist()),
            _spread(n, index, found.column("duplicate_of").to_pylist()),
        )


class Exclusions:
    """The decontamination outputs' hits: for a row several name, the closest match (the first
    output, in path order, on a tie). Reason: the match kind (image or pair)."""

    def __init__(self, directories: tuple[Path, ...]) -> None:
        from jestcurate.pipelines.decontam import OUTPUT

        columns = ["match", "cosine", "eval_set", "eval_shard", "eval_key"]
        ordered = sorted(directories, key=lambda d: str(d.resolve()))
        self.outputs = [ByShard(d / OUTPUT, columns) for d in ordered]
        self.thresholds = [
            float(read_json(d / "summary.json")["params"]["threshold"]) for d in ordered
        ]

    def verdict(self, shard: str, mask: np.ndarray) -> Verdict:
        n = len(mask)
        tables = []
        for i, output in enumerate(self.outputs):
            found = output.rows(shard) if mask.any() else None
            if found is not None and found.num_rows:
                thresholds = pa.array(np.full(found.num_rows, self.thresholds[i], np.float32))
                tables.append(found.append_column("threshold", thresholds))
        if not tables:
            return Verdict("excluded", mask, "exclude")
        found = pa.concat_tables(tables)
        index = found.column("index").to_numpy().astype(np.int64)
        cosine = found.column("cosine").fill_null(-np.inf).to_numpy()
        order = np.lexsort((np.arange(len(index)), -cosine, index))  # best first per row
        first = order[np.r_[True, index[order][1:] != index[order][:-1]]]
        best = found.take(pa.array(first))
        index = index[first]
        cosine, threshold = (_floats(n, index, best.column(c)) for c in ("cosine", "threshold"))
        return Verdict(
            "excluded",
            mask,
            _spread(n, index, best.column("match").to_pylist()),
            cosine,
            threshold,
            _spread(n, index, best.column("eval_shard").to_pylist()),
            _spread(n, index, best.column("eval_key").to_pylist()),
            _spread(n, index, best.column("eval_set").to_pylist()),
        )


@dataclass(frozen=True)
class Evidence:
    """Where each filter's evidence comes from, opened once per selection."""

    min_clip: float | None
    dedup: Dedup | None
    exclusions: Exclusions | None

    @classmethod
    def open(
        cls, min_clip: float | None, dedup: Path | None, exclude: tuple[Path, ...]
    ) -> Evidence:
        return cls(min_clip, Dedup(dedup) if dedup else None,
                   Exclusions(exclude) if exclude else None)  # fmt: skip

    def verdicts(self, shard: str, clip: np.ndarray, masks: dict[str, np.ndarray]) -> list[Verdict]:
        """The filters' verdicts on one part, in the order they apply (a row goes to the
        first that takes it). `masks`: eligible_masks' removed rows by filter name."""
        found = [
            Verdict("filtered", masks["below_min_clip_score"], MIN_CLIP_SCORE,
                    clip.astype(np.float32),
                    np.float32(self.min_clip if self.min_clip is not None else np.nan)),
        ]  # fmt: skip
        if self.dedup is not None:
            found.append(self.dedup.verdict(shard, masks["duplicates"]))
        if self.exclusions is not None:
            found.append(self.exclusions.verdict(shard, masks["excluded"]))
        fixed = ("below_min_clip_score", "duplicates", "excluded")
        found += [Verdict("filtered", m, name) for name, m in masks.items() if name not in fixed]
        return found
