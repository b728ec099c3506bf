"""open_clip_train on a selection's batches, in step order (`python -m jestcurate.openclip_train`).

plan.py checks the numbers and cuts the steps into open_clip_train's epochs; steps.py is the
training data open_clip_train gets; online.py picks each step's batch with the model being
trained; launcher.py parses the flags and runs open_clip_train's main with them.

Why the batches survive: open_clip_train's train_one_epoch takes one optimizer step per
--accum-freq items of `data["train"].dataloader`, in the order the loader yields them, and
numbers it `(num_batches // accum) * epoch + i // accum`. The launcher's loader has
num_batches = S * accum and yields manifest step `epoch * S + i // accum` as item i of epoch
`epoch` (S steps per epoch), so open_clip's step counter, its learning-rate schedule and its
checkpoints count manifest steps; open_clip's loss all-gathers the
ranks' features, so the contrastive batch is the union of the ranks' slices: the manifest's
batch. Nothing shuffles: no sampler, no shuffle buffer, and DataLoader workers' items come back
in order.
"""
