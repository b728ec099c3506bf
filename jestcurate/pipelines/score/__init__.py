"""`jestcurate score`: stream shards through a frozen open_clip model into a Parquet score set.

Data flow: DataLoader worker processes read tars, decode and preprocess images and tokenize
captions (ShardStream); the main process encodes each chunk on the model's device and keeps a
shard's embeddings there until the shard ends, then computes its scores and writes its part and
completion marker. Shards are the unit of work, of resume and of failure.
"""

from jestcurate.pipelines.score.cpu import DEFAULT_BATCH, default_workers, openmp_sleeps
from jestcurate.pipelines.score.encode import Scorer, ShardResult
from jestcurate.pipelines.score.loop import run
from jestcurate.pipelines.score.plan import ROLES, ScoreConfig
from jestcurate.pipelines.score.progress import Progress, ScoreProgress, ScoreReport, print_summary
from jestcurate.pipelines.score.stream import ShardStream, decode_deferred

__all__ = [
    "DEFAULT_BATCH",
    "ROLES",
    "Progress",
    "ScoreConfig",
    "ScoreProgress",
    "ScoreReport",
    "Scorer",
    "ShardResult",
    "ShardStream",
    "decode_deferred",
    "default_workers",
    "openmp_sleeps",
    "print_summary",
    "run",
]
