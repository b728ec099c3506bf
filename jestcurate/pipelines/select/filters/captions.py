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
    """Removes rows whose caption has fewer or more words or characters than the bounds."""

    min_words: int | None = None
    max_words: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    name: str = "caption_length"
    columns: tuple[str, ...] = ("caption",)

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        words, chars = caption_lengths(table)
        removed = np.zeros(len(words), dtype=bool)
        for values, low, high in (
            (words, self.min_words, self.max_words),
            (chars, self.min_chars, self.max_chars),
        ):
            if low is not None:
                removed |= values < low
            if high is not None:
                removed |= values > high
        return Verdict(removed)
