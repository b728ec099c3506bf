"""`jestcurate dedup`: exact and semantic deduplication (SemDeDup) of a score set, with faiss.

1. Exact duplicates: the same image bytes (sha256). Of each group the best row is kept.
2. Semantic duplicates: spherical k-means (faiss; on the GPU when there is one) over the stored
   embeddings, then inside each cluster every row whose cosine similarity to a better row
   exceeds 1 - eps is dropped. Rows are ranked by clip_score (higher is better), ties, such as
   exact duplicates, going to the first in (shard, index) order.
Embeddings are copied once to an on-disk row cache and clusters are read back one at a time, so
memory holds one cluster, not the corpus. Deterministic for a seed.

Output: DEDUP_DIR/dedup.parquet, one row per status-ok row of the score set: shard, key, index,
cluster, kept, duplicate_of (the key of the kept row it duplicates) and duplicate_of_shard,
similarity (cosine to the better row that made it a duplicate; 1 for exact duplicates), reason
("exact" | "semantic" | null); and DEDUP_DIR/summary.json. Rerunning with the same inputs and
options reuses a finished output.

A collapsed embedding space (an untrained or tiny model's: every row near every other) makes
most rows "near duplicates". The summary records the nearest-neighbour cosine of a seeded sample
of rows (within the rows each is compared with), and when more than half the rows are dropped as
near duplicates or the median neighbour is closer than 1 - eps, a warning is logged with an eps
that would drop about 5 % (exact for these clusters: it is read off each row's cosine to its most
similar better row, which the dedup computes anyway).
"""

from jestcurate.pipelines.dedup.collapse import collapse_warning, suggest_eps
from jestcurate.pipelines.dedup.config import BY, EXACT, REASONS, SEMANTIC, DedupConfig
from jestcurate.pipelines.dedup.job import print_summary, run
from jestcurate.pipelines.dedup.output import OUTPUT, SCHEMA, SUMMARY, load_clusters, load_dropped
from jestcurate.pipelines.dedup.passes import build_cache, find_duplicates

__all__ = [
    "BY",
    "EXACT",
    "OUTPUT",
    "REASONS",
    "SCHEMA",
    "SEMANTIC",
    "SUMMARY",
    "DedupConfig",
    "build_cache",
    "collapse_warning",
    "find_duplicates",
    "load_clusters",
    "load_dropped",
    "print_summary",
    "run",
    "suggest_eps",
]
