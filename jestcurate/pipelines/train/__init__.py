"""`jestcurate train`: train a small open_clip model contrastively on WebDataset shards.

For a reference (trained on a clean guide set) or a proxy learner (a slice of the raw pool).
open_clip supplies the model, its training transform, the tokenizer, the losses (ClipLoss for
CLIP-style models, SigLipLoss for models with a logit bias) and open_clip_train's cosine
schedule; webdataset supplies the shuffle and batching stages; the samples come from
jestcurate's own reader, so remote URLs and damaged shards behave as in `score`.

Outputs: CKPT ({"state_dict": ...}, which `score --pretrained` and open_clip's
create_model_and_transforms(..., pretrained=CKPT) both load), CKPT.json (what was trained on
what) and, while training, CKPT.resume.pt, every --save-every steps, from which a rerun
continues.

A rerun after an interruption trains as the uninterrupted run would (bit for bit on a CPU,
tested): CKPT.resume.pt holds the model, the optimizer, the fp16 loss scaler, the main process's
RNG (training's own, e.g. dropout), the step and the step at which the current epoch began. An
epoch's data order and augmentation follow from (--seed, epoch) alone, so the rerun rebuilds
the epoch's stream and passes over the batches already trained on. The augmentation draws from
an RNG of its own (the worker's, or with --workers 0 a private one), which leaves the main RNG
to training and makes --workers 0 and 1 train alike. CKPT.json's "resumed_from" lists the
steps a run was resumed from and whether each resume was exact: one from an older jestcurate's
resume file, or with another --workers above 1, is not (a warning says why).
"""

from jestcurate.pipelines.train.config import TrainConfig, TrainReport
from jestcurate.pipelines.train.loop import print_summary, run
from jestcurate.pipelines.train.stream import batches, count_samples
from jestcurate.pipelines.train.trainer import Trainer

__all__ = [
    "TrainConfig",
    "TrainReport",
    "Trainer",
    "batches",
    "count_samples",
    "print_summary",
    "run",
]
