"""`jestcurate select`: turn score sets into training batches (JEST and its baselines).

Flow:
1. Open the reference (and learner) score sets and join them on (part, key).
2. Build a flat on-disk cache of the eligible rows (status ok in both sets, clip_score at least
   --min-clip-score): fixed-width .npy columns read back by positioned reads, so memory does
   not grow with the corpus (docs/architecture.md says why not Arrow or memory maps).
3. Choose: a global seeded permutation of eligible rows cut into super-batches of
   B = round(b / ratio) for jest, easy-ref and learnability; global rankings for random and
   clip-score. Every method yields the same number of full batches of b.
4. Write manifest.parquet (step order), uids.npy and, last, summary.json.
"""

from __future__ import annotations

from jestcurate.pipelines.select.choosing import Batch, _embeddings, _super_batches, choose
from jestcurate.pipelines.select.config import (
    MANIFEST,
    METHODS,
    SCATTER_DIR,
    SELECTION_SCHEMA_VERSION,
    SUMMARY,
    SUPER_BATCH_METHODS,
    TASKS_DIR,
    UIDS,
    SelectConfig,
)
from jestcurate.pipelines.select.outputs import (
    datacomp_uids,
    manifest_schema,
    print_summary,
    remove_selection,
    write_manifest,
)
from jestcurate.pipelines.select.runner import SelectReport, run
from jestcurate.pipelines.select.tasks import (
    merge,
    partition_identity,
    task_directory,
    unfinished_tasks,
)

__all__ = [
    "MANIFEST",
    "METHODS",
    "SCATTER_DIR",
    "SELECTION_SCHEMA_VERSION",
    "SUMMARY",
    "SUPER_BATCH_METHODS",
    "TASKS_DIR",
    "UIDS",
    "Batch",
    "SelectConfig",
    "SelectReport",
    "_embeddings",
    "_super_batches",
    "choose",
    "datacomp_uids",
    "manifest_schema",
    "merge",
    "partition_identity",
    "print_summary",
    "remove_selection",
    "run",
    "task_directory",
    "unfinished_tasks",
    "write_manifest",
]
