"""What the filters said of each row, kept by the pass that runs them (io/eligible.py's scan,
io/scatter.py's scatter) for select's ledger (pipelines/select/ledger.py), so that no filter
runs again when the ledger is written.

Per part, two arrays over its rows: a uint8 code (0: no filter removed the row; c: the row's
fate, reason, detail and threshold are `reasons[c - 1]`) and a float32 value (what the filter
compared: NaN where it has none). That is 5 bytes per row of the score set: held in memory by
one run from its first pass until the ledger is written, saved in each scatter folder by
array tasks (notes-code.npy, notes-value.npy; the reasons in done.json) for the merge.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jestcurate.errors import JCError

# (fate, reason, detail, threshold): the ledger's columns that a code stands for
Reason = tuple[str, str, str | None, float | None]
CODE_FILE, VALUE_FILE = "notes-code.npy", "notes-value.npy"
MOST = 255  # distinct reasons one pass can tell apart in a uint8


def _codes(given: Any, rows: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """`given` (one value for every row, or an array over the part's rows) at `rows`, as
    codes into a list of distinct values (None for a missing one)."""
    if not isinstance(given, np.ndarray):
        return np.zeros(len(rows), dtype=np.int64), [given]
    picked = given[rows]
    if picked.dtype.kind == "f":
        found, inverse = np.unique(picked, return_inverse=True)
        return inverse, [None if np.isnan(v) else float(v) for v in found.tolist()]
    encoded = pa.array(picked.tolist(), pa.string()).dictionary_encode()
    words = [*encoded.dictionary.to_pylist(), None]
    return encoded.indices.fill_null(len(words) - 1).to_numpy().astype(np.int64), words


@dataclass
class Notes:
    """The codes and values of each part, in part order, and the reasons their codes name."""

    reasons: list[Reason] = field(default_factory=list)
    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _known: dict[Reason, int] = field(default_factory=dict)

    def start(self, n: int) -> None:
        """A new part of n rows: none removed yet."""
        self.parts.append((np.zeros(n, dtype=np.uint8), np.full(n, np.nan, dtype=np.float32)))

    def note(self, fate: str, verdict: Any, gone: np.ndarray) -> None:
        """The rows `gone` (a mask over the current part) that a filter of `fate` took, with
        its verdict's reason, detail, threshold and value (io/eligible.py's Verdict)."""
        rows = np.flatnonzero(gone)
        if not len(rows):
            return
        code, value = self.parts[-1]
        if verdict.value is not None:
            value[rows] = np.asarray(verdict.value, dtype=np.float32)[rows]
        threshold = verdict.threshold
        if threshold is not None and not isinstance(threshold, np.ndarray):
            threshold = float(threshold)
        columns = [_codes(given, rows) for given in (verdict.reason, verdict.detail, threshold)]
        combos, inverse = np.unique(np.stack([c for c, _ in columns]), axis=1,
                                    return_inverse=True)  # fmt: skip
        for i, combo in enumerate(combos.T.tolist()):
            reason, detail, bound = (words[c] for (_, words), c in zip(columns, combo, strict=True))
            bound = None if bound is None or np.isnan(bound) else bound
            code[rows[inverse.reshape(-1) == i]] = self._code((fate, reason, detail, bound))

    def _code(self, reason: Reason) -> int:
        if reason not in self._known:
            if len(self.reasons) >= MOST:
                raise JCError(
                    f"the filters gave more than {MOST} distinct reasons (fate, reason, detail, "
                    "threshold), more than the ledger's notes can keep: run without --ledger"
                )
            self.reasons.append(reason)
            self._known[reason] = len(self.reasons)
        return self._known[reason]

    def part(self, part_id: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= part_id < len(self.parts):
            raise JCError(
                f"the score set has more parts than the {len(self.parts):,} select noted when "
                "it first read them: it changed meanwhile; rerun"
            )
        return self.parts[part_id]

    def save(self, directory: Path) -> dict[str, Any]:
        """Into a (scatter) folder: the arrays, parts one after another; returns what done.json
        records (the reasons, each part's rows)."""
        for name, k in ((CODE_FILE, 0), (VALUE_FILE, 1)):
            arrays = [p[k] for p in self.parts]
            np.save(directory / name, np.concatenate(arrays) if arrays else np.zeros(0))
        return {"reasons": [list(r) for r in self.reasons],
                "rows": [len(c) for c, _ in self.parts]}  # fmt: skip

    @classmethod
    def load(cls, directory: Path, facts: dict[str, Any]) -> Notes:
        """What `save` wrote (the arrays memory-mapped)."""
        code, value = (np.load(directory / n, mmap_mode="r") for n in (CODE_FILE, VALUE_FILE))
        bounds = np.concatenate([[0], np.cumsum(facts["rows"], dtype=np.int64)]).tolist()
        parts = [(code[a:b], value[a:b]) for a, b in itertools.pairwise(bounds)]
        reasons: list[Reason] = [tuple(r) for r in facts["reasons"]]  # type: ignore[misc]
        return cls(reasons, parts)
