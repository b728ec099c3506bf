"""Train a CLIP model with online JEST, with uniform batches, or with an offline JEST manifest.

    python examples/online_jest.py --scores scores/ --mode online   # or uniform, offline
        [--model jc-tiny] [--batch-size 32] [--ratio 0.2] [--steps 100] [--report out.json]

--scores is a reference score set (`jestcurate score`) whose rows point at local uncompressed
tars. The three modes see the same candidates in the same order (select's seeded permutation of
the eligible rows, cut into super-batches of B = b / ratio) and differ only in how b of each
super-batch are chosen:

* online: the learner embeds the super-batch (no gradient) and jestcurate.trainer.online picks b
  jointly by learnability against the cached reference embeddings: the JEST paper's loop;
* uniform: the first b of each super-batch, i.e. a uniform random batch, no scoring cost;
* offline: the batches of `jestcurate select --method jest` (reference only), made once.

Everything runs on the CPU with the shipped tiny config; it is a demonstration of the API and
of the compute accounting, not a benchmark (benchmarks/quality.py compares the methods).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image

from jestcurate.math.sampling import SamplerOptions
from jestcurate.model.openclip import BUILTIN_CONFIG_DIR
from jestcurate.trainer.loader import SelectionBatches
from jestcurate.trainer.online import (
    ComputeLedger,
    OnlineSelector,
    SuperBatches,
    downsample,
    lower_resolution,
)


def build(model_name: str) -> tuple:
    open_clip.add_model_config(BUILTIN_CONFIG_DIR)  # makes jc-tiny known to open_clip
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def collate(samples: list[dict], preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images = [preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
    return torch.stack(images), tokenizer([s["txt"].decode("utf-8") for s in samples])


def relative_cost(model, preprocess, tokenizer, size: int) -> float:
    """FLOPs of one sample's forward pass at `size` px over those at full size."""
    from torch.utils.flop_counter import FlopCounterMode

    full = preprocess(Image.new("RGB", (64, 64)))[None]
    tokens = tokenizer(["a caption"])

    def flops(images: torch.Tensor) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images, tokens)
        return counter.get_total_flops()

    with lower_resolution(model, size):
        low = flops(downsample(full, size))
    return low / flops(full)


def offline_batches(scores: Path, workdir: Path, b: int, ratio: float, seed: int):
    from jestcurate.pipelines import select as select_mod

    out = workdir / f"offline-b{b}-r{ratio}-s{seed}"
    cfg = select_mod.SelectConfig(
        reference=scores, out=out, method="jest", sampling=SamplerOptions(b, ratio), seed=seed
    )
    select_mod.run(cfg)
    return SelectionBatches(out, source="original")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, required=True)
    parser.add_argument("--mode", choices=["online", "uniform", "offline"], default="online")
    parser.add_argument("--model", default="jc-tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("online-work"))
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument(
        "--score-size",
        type=int,
        default=None,
        help="online: score super-batches at this image size (a cheaper learner pass)",
    )
    args = parser.parse_args()
    b = args.batch_size

    model, preprocess, tokenizer = build(args.model)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    candidates = SuperBatches(
        args.scores, b, args.ratio, seed=args.seed, cache_dir=args.workdir / "cache"
    )
    ledger = ComputeLedger(reference_samples=candidates.cache.size)
    options = SamplerOptions(b, args.ratio, criterion="learnability")
    selector = OnlineSelector(candidates.reference, options, seed=args.seed)
    steps = min(args.steps, len(candidates))
    if args.mode == "offline":
        stream = iter(offline_batches(args.scores, args.workdir, b, args.ratio, args.seed))
    else:
        stream = iter(candidates)

    scoring_cost = 1.0
    if args.score_size:  # measured, not assumed: FLOPs of one sample at both sizes
        scoring_cost = relative_cost(model, preprocess, tokenizer, args.score_size)
        print(f"scoring at {args.score_size} px costs {scoring_cost:.2f} of a full forward pass")

    losses = []
    began = time.perf_counter()
    for _ in range(steps):
        if args.mode == "offline":
            samples = next(stream)
            ledger.step(super_batch=0, batch=b)
        else:
            sb = next(stream)
            if args.mode == "online":
                images, tokens = collate(sb.samples, preprocess, tokenizer)
                with torch.no_grad():
                    if args.score_size:
                        with lower_resolution(model, args.score_size):
                            img, txt, scale = model(downsample(images, args.score_size), tokens)
                    else:
                        img, txt, scale = model(images, tokens)
                picked = selector.select(sb.ref_img, sb.ref_txt, img, txt, float(scale))
                ledger.step(super_batch=len(sb.ids), batch=b, scoring_cost=scoring_cost)
            else:
                picked = torch.arange(b)
                ledger.step(super_batch=0, batch=b)
            samples = sb.fetch(selector.rank_slice(picked))
        images, tokens = collate(samples, preprocess, tokenizer)
        loss = loss_fn(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ln 100, as open_clip_train
        losses.append(loss.item())

    compute = ledger.summary(steps_total=len(candidates))
    result = {
        "mode": args.mode,
        "score_size": args.score_size,
        "steps": steps,
        "batch_size": b,
        "super_batch": candidates.super_batch,
        "final_loss": losses[-1],
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(time.perf_counter() - began, 2),
        "compute": compute,
    }
    print(f"{args.mode}: {steps} steps of {b}, final loss {losses[-1]:.4f}")
    print(
        "compute, in sample forward passes: "
        f"training {compute['training_forward_equivalents']:,.0f} (3 per trained sample), "
        f"learner scoring {compute['scoring_forwards']:,.0f} "
        f"(+{100 * compute['scoring_overhead']:.0f} %), "
        f"reference {compute['reference_forwards_amortised']:,.0f} "
        f"(the one-off {ledger.reference_samples:,} amortised over {len(candidates)} steps)"
    )
    if args.report:
        args.report.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
