"""`jestcurate decontaminate`: find the pool's near copies of evaluation images, with faiss.

Each status-ok row of the pool's score set is compared with every image of each evaluation set
(exact inner products of unit vectors, faiss IndexFlatIP: evaluation sets are small) and is a
hit when its image's cosine to one is at least the threshold; for an evaluation set whose
samples have captions (retrieval sets), also when the mean of its image's and its caption's
cosines to one evaluation pair is. The pool is streamed part by part, so memory holds one part
and the evaluation sets. An evaluation set is a score set made with the pool's model
(`jestcurate score`; another model is refused) or WebDataset tars, embedded here with the
model the pool's meta.json records (images alone suffice: clip_benchmark's classification
sets have no captions).

Output: OUT/decontam.parquet, one row per excluded pool row (shard, part, key, index, match,
cosine, image_cosine, eval_set, eval_shard, eval_key: the closest evaluation item that made it
a hit), and OUT/summary.json, written last: the pool's fingerprint, the evaluation sets and
the threshold (a rerun with the same ones reuses the output), counts and examples per set,
the pool's closest cosines, how close each set's own images sit to each other, and a warning
with a suggested threshold when the embedding space looks collapsed. `select --exclude OUT`
makes the rows ineligible, and refuses an exclusion made from another score set.
"""

from jestcurate.pipelines.decontam.config import (
    DEFAULT_THRESHOLD,
    IMAGE,
    OUTPUT,
    PAIR,
    SUMMARY,
    DecontamConfig,
)
from jestcurate.pipelines.decontam.job import print_summary, run
from jestcurate.pipelines.decontam.output import SCHEMA, load_excluded

__all__ = [
    "DEFAULT_THRESHOLD",
    "IMAGE",
    "OUTPUT",
    "PAIR",
    "SCHEMA",
    "SUMMARY",
    "DecontamConfig",
    "load_excluded",
    "print_summary",
    "run",
]
