"""decontam.parquet: written one row group per pool part that has hits, and read back for
`select --exclude`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from jestcurate.errors import JCError
from jestcurate.io.derived import read_output
from jestcurate.pipelines.decontam.config import OUTPUT

SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # the pool row's shard, as its score set names it
        ("part", pa.string()),  # the part of the score set that holds the row
        ("key", pa.string()),
        ("index", pa.int32()),  # the row's position in its shard
        ("match", pa.string()),  # "image" or "pair"
        ("cosine", pa.float32()),  # what made it a hit: image cosine, or the pair's mean
        ("image_cosine", pa.float32()),  # to the matched evaluation image
        ("eval_set", pa.string()),
        ("eval_shard", pa.string()),
        ("eval_key", pa.string()),
    ]
)


def load_excluded(directory: Path) -> dict[str, np.ndarray]:
    """For select --exclude: shard -> sorted indexes of the rows the decontamination names."""
    path = directory / OUTPUT
    if not path.is_file():
        raise JCError(
            f"{directory} is not a decontamination output (no {OUTPUT}); run jestcurate "
            "decontaminate"
        )
    table = read_output(path, ["shard", "index"])
    encoded = table.column("shard").combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy()
    index = table.column("index").to_numpy().astype(np.int64)
    order = np.lexsort((index, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {
        shard: np.unique(index[order[bounds[code] : bounds[code + 1]]])
        for code, shard in enumerate(encoded.dictionary.to_pylist())
    }
