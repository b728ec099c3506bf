"""Caption length: words (runs of non-whitespace) or characters (Unicode code points, with
surrounding whitespace removed). A missing caption has length 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.io.eligible import Verdict


def caption_lengths(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Each row's caption length in words and in characters."""
    trimmed = pc.utf8_trim_whitespace(table.column("caption").fill_null(""))
    chars = pc.utf8_length(trimmed).to_numpy(zero_copy_only=False).astype(np.int64)
    words = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    words = words.to_numpy(zero_copy_only=False).astype(np.int64)
    words[chars == 0] = 0  # "" splits into one empty word
    return words, chars


@dataclass(frozen=True)
class CaptionLength:
    """Removes rows whose caption has fewer or more words or characters than the bounds; why:
    the first bound a row breaks (detail min_words, max_words, min_chars or max_chars), its
    length (value) and the bound (threshold)."""

    min_words: int | None = None
    max_words: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    name: str = "caption_length"
    fate: str = "filtered"
    columns: tuple[str, ...] = ("caption",)

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        words, chars = caption_lengths(table)
        n = len(words)
        removed = np.zeros(n, dtype=bool)
        detail = np.full(n, None, dtype=object)
        value, threshold = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        for values, bound, kind, broken in (
            (words, self.min_words, "min_words", np.less),
            (words, self.max_words, "max_words", np.greater),
            (chars, self.min_chars, "min_chars", np.less),
            (chars, self.max_chars, "max_chars", np.greater),
        ):
            if bound is None:
                continue
            first = broken(values, bound) & ~removed
            removed |= first
            detail[first], value[first], threshold[first] = kind, values[first], bound
        return Verdict(removed, None, detail, value, threshold)
