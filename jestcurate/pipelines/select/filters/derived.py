"""--dedup and --exclude as RowFilters (io/eligible.py): the rows a dedup output dropped, and the
rows decontamination outputs name, with why as data (a duplicate's kind, its cosine to the kept
row, the threshold; an exclusion's match kind, cosine and threshold), and the row each points
at (`others`: the kept row, the evaluation item) for the ledger.

Both outputs are read one shard at a time (their row groups hold one shard each: their
statistics say which), so memory holds one part's rows of them, not the pool's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jestcurate.errors import JCError, first_line
from jestcurate.io.eligible import Verdict
from jestcurate.io.files import read_json

Others = dict[str, np.ndarray]  # other_shard, other_key, other_set: object arrays over a part


class ByShard:
    """A derived output's rows, one shard at a time, found by its row groups' statistics."""

    def __init__(self, path: Path, missing: str) -> None:
        if not path.is_file():
            raise JCError(missing)
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

    def rows(self, shard: str, columns: list[str]) -> pa.Table | None:
        groups = sorted(self.groups.get(shard, []) + self.mixed)
        if not groups:
            return None
        try:
            table = self.file.read_row_groups(groups, columns=["shard", "index", *columns])
        except (OSError, pa.ArrowException) as exc:
            raise JCError(f"{self.file} is unreadable ({first_line(exc)})") from None
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


def _mask(n: int, index: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[index[index < n]] = True
    return mask


class Dedup:
    """A dedup output's dropped rows: reason exact or semantic, value the cosine to the kept
    row, threshold 1 - eps for semantic duplicates."""

    name, fate, columns = "duplicates", "duplicate", ()

    def __init__(self, directory: Path) -> None:
        from jestcurate.pipelines.dedup import OUTPUT

        missing = f"{directory} is not a dedup output (no {OUTPUT}); run jestcurate dedup"
        self.output = ByShard(directory / OUTPUT, missing)
        eps = read_json(directory / "summary.json").get("params", {}).get("eps")
        self.cosine = np.nan if eps is None else 1.0 - float(eps)

    def _dropped(self, shard: str, columns: list[str]) -> pa.Table | None:
        found = self.output.rows(shard, ["kept", *columns])
        return None if found is None else found.filter(pc.invert(found.column("kept")))

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        n = len(candidate)
        found = self._dropped(shard, ["reason", "similarity"])
        if found is None:
            return Verdict(np.zeros(n, dtype=bool))
        index = found.column("index").to_numpy().astype(np.int64)
        reason = _spread(n, index, found.column("reason").to_pylist())
        threshold = np.where(reason == "semantic", self.cosine, np.nan).astype(np.float32)
        value = _floats(n, index, found.column("similarity"))
        return Verdict(_mask(n, index), reason, None, value, threshold)

    def others(self, shard: str, n: int) -> Others:
        """Each dropped row's kept row (shard, key)."""
        found = self._dropped(shard, ["duplicate_of_shard", "duplicate_of"])
        if found is None:
            return {}
        index = found.column("index").to_numpy().astype(np.int64)
        return {
            "other_shard": _spread(n, index, found.column("duplicate_of_shard").to_pylist()),
            "other_key": _spread(n, index, found.column("duplicate_of").to_pylist()),
        }


class Exclusions:
    """Decontamination outputs' hits: for a row several name, the closest match (the first
    output, in path order, on a tie). Reason: the match kind (image or pair); value its cosine,
    threshold that output's."""

    name, fate, columns = "excluded", "excluded", ()

    def __init__(self, directories: tuple[Path, ...]) -> None:
        from jestcurate.pipelines.decontam import OUTPUT

        ordered = sorted(directories, key=lambda d: str(d.resolve()))
        said = "is not a decontamination output (no {}); run jestcurate decontaminate"
        self.outputs = [ByShard(d / OUTPUT, f"{d} {said.format(OUTPUT)}") for d in ordered]
        self.thresholds = [
            float(read_json(d / "summary.json")["params"]["threshold"]) for d in ordered
        ]

    def _best(self, shard: str, columns: list[str]) -> pa.Table | None:
        """The closest hit of each row of the shard that some output names."""
        tables = []
        for i, output in enumerate(self.outputs):
            found = output.rows(shard, ["cosine", *columns])
            if found is not None and found.num_rows:
                thresholds = pa.array(np.full(found.num_rows, self.thresholds[i], np.float32))
                tables.append(found.append_column("threshold", thresholds))
        if not tables:
            return None
        found = pa.concat_tables(tables)
        index = found.column("index").to_numpy().astype(np.int64)
        cosine = found.column("cosine").fill_null(-np.inf).to_numpy()
        order = np.lexsort((np.arange(len(index)), -cosine, index))  # best first per row
        first = order[np.r_[True, index[order][1:] != index[order][:-1]]]
        return found.take(pa.array(first))

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        n = len(candidate)
        best = self._best(shard, ["match"])
        if best is None:
            return Verdict(np.zeros(n, dtype=bool))
        index = best.column("index").to_numpy().astype(np.int64)
        cosine, threshold = (_floats(n, index, best.column(c)) for c in ("cosine", "threshold"))
        reason = _spread(n, index, best.column("match").to_pylist())
        return Verdict(_mask(n, index), reason, None, cosine, threshold)

    def others(self, shard: str, n: int) -> Others:
        """Each named row's closest evaluation item (shard, key, set)."""
        best = self._best(shard, ["eval_shard", "eval_key", "eval_set"])
        if best is None:
            return {}
        index = best.column("index").to_numpy().astype(np.int64)
        return {
            f"other_{c}": _spread(n, index, best.column(f"eval_{c}").to_pylist())
            for c in ("shard", "key", "set")
        }
