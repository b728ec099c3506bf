"""`jestcurate score`: stream shards through a frozen open_clip model into a Parquet score set.

Data flow: DataLoader worker processes read tars, decode and preprocess images and tokenize
captions (stream.ShardStream); the main process encodes each chunk on the model's device and
keeps a shard's embeddings there until the shard ends, then computes its scores and writes its
part and completion marker (encode). Shards are the unit of work, of resume and of failure.

    plan.py      the config, its checks, which shards this task scores
    decoding.py  the decoder, chosen once per run (Decoding)
    cpu.py       decoding workers, torch threads, OpenMP's wait policy, niced workers
    stream.py    ShardStream and the Chunk each worker hands over
    encode.py    chunks packed into model batches; a shard's part and marker (Scorer)
    progress.py  progress as it runs, its report, the printed summary
    loop.py      run: plan, model, meta.json, then passes until every shard is settled

The names below load their module on first use, so that importing `cpu` (as the CLI does,
before torch loads, to set OpenMP's wait policy) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "DEFAULT_BATCH": "cpu",
    "default_workers": "cpu",
    "openmp_sleeps": "cpu",
    "Scorer": "encode",
    "ShardResult": "encode",
    "run": "loop",
    "ROLES": "plan",
    "ScoreConfig": "plan",
    "Progress": "progress",
    "ScoreProgress": "progress",
    "ScoreReport": "progress",
    "print_summary": "progress",
    "Chunk": "stream",
    "ShardStream": "stream",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
