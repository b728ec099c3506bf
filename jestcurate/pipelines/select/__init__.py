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
5. With --export, write the kept samples to OUT/shards/ (pipelines/export.py).

The package, by job: config (SelectConfig and its checks), inputs (score sets, identity,
eligible rows), choosing (the methods), outputs (manifest, uids, summary), tasks (array tasks:
scatter, gather, merge), runner (run), report (what a run reports and how it is printed).
"""

from __future__ import annotations

from jestcurate.pipelines.select.choosing import Batch, choose, embeddings, super_batches
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
from jestcurate.pipelines.select.inputs import partition_identity
from jestcurate.pipelines.select.outputs import (
    datacomp_uids,
    manifest_schema,
    remove_selection,
    write_manifest,
)
from jestcurate.pipelines.select.report import (
    SelectReport,
    print_exported,
    print_selected,
    print_summary,
)
from jestcurate.pipelines.select.runner import run
from jestcurate.pipelines.select.tasks import (
    merge,
    task_count,
    task_directory,
    unfinished_rounds,
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
    "choose",
    "datacomp_uids",
    "embeddings",
    "manifest_schema",
    "merge",
    "partition_identity",
    "print_exported",
    "print_selected",
    "print_summary",
    "remove_selection",
    "run",
    "super_batches",
    "task_count",
    "task_directory",
    "unfinished_rounds",
    "unfinished_tasks",
    "write_manifest",
]
