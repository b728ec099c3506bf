"""The quality arms `jestcurate eval` cannot express, in an in-memory training loop on the
same corpus, reference, learner and recipe as quality.py (which trains every selection arm
through `jestcurate eval`):

    python benchmarks/quality_inmemory.py [--out DIR] [--quick] [--workdir DIR] [--methods ...]

- online JEST (jestcurate.online): the learner being trained embeds each super-batch and the
  selector picks from it against the cached reference embeddings, at full and at half
  resolution;
- jest (learnability)'s stream trained by open_clip_train through the launcher (its selections
  written with select's own run and export, checked batch for batch against the in-memory
  stream; quality_openclip.py), and with its samples shuffled and re-batched (what
  open_clip_train does with an export);
- the samplers' diagnostic: batch learnability of each sampler's batches drawn from the same
  super-batches (--diagnostic-only prints it without training).
Beside them, for comparison within this loop, the uniform pool and jest (learnability)'s
offline stream (successive selections, seeds seed*1000, +1, ...). The learners train on
pre-decoded, eval-preprocessed images (no augmentation), unlike eval's. Zero-shot accuracy on
the eval split is measured every --eval-every steps. Writes results.json, results.md and
accuracy.png to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import quality_openclip
import torch

from jestcurate.io import eligible
from jestcurate.io.reader import iter_raw_samples, parse_sample
from jestcurate.io.store import open_score_set
from jestcurate.math.jest import (
    Embeddings,
    batch_score,
    criterion_terms,
    independent_scores,
    select_batch,
)
from jestcurate.math.sampling import SamplerOptions, super_batch_size
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines import train as train_mod
from jestcurate.pipelines.synth import CLASSES, PRESETS, CorpusSpec, write_corpus

PROMPT = "a photo of a {color} {shape}"
WEIGHT_DECAY = 0.1
WARMUP = 20  # the Trainer shortens it to a fifth of a shorter run


@dataclass(frozen=True)
class Setup:
    model: str = "jc-tiny"  # jc-tiny (CLIP softmax loss) or jc-tiny-sigmoid (SigLIP, as the paper)
    guide: tuple[int, int] = (4, 1000)  # shards, samples per shard
    pool: tuple[int, int] = (40, 500)
    eval: tuple[int, int] = (1, 640)
    learner_shards: int = 4
    reference_steps: int = 300
    learner_steps: int = 60
    reference_batch: int = 64
    batch: int = 32
    ratio: float = 0.2
    chunks: int = 16
    steps: int = 400
    eval_every: int = 25
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    diagnostic_super_batches: int = 30
    methods: tuple[str, ...] = ()  # a subset of METHODS to run (uniform always); empty: all


QUICK = Setup(
    guide=(1, 256),
    pool=(2, 256),
    eval=(1, 64),
    learner_shards=1,
    reference_steps=20,
    learner_steps=5,
    batch=16,
    steps=20,
    eval_every=10,
    seeds=(0,),
    diagnostic_super_batches=2,
)

# method name -> select settings; "uniform" is the unfiltered pool
METHODS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "jest (learnability)": {"method": "jest", "score": "learnability"},
    # The same selections, trained by open_clip_train through the launcher (from the exports)
    "jest (learnability), open_clip_train": {
        "method": "jest",
        "score": "learnability",
        "arm": "open_clip_train",
    },
    # The same stream's samples, shuffled and re-batched: the batches do not survive
    "jest (learnability), shuffled": {"method": "jest", "score": "learnability", "arm": "shuffled"},
    "jest (online)": {"online": True},  # jestcurate.trainer.online: the learner in training scores
    # Flexi-JEST-like: the learner scores super-batches at half resolution (position embeddings
    # resampled), at about a third of the forward cost.
    "jest (online, 32 px scoring)": {"online": True, "score_size": 32},
}


@dataclass
class Pool:
    images: torch.Tensor  # (N, 3, H, W) float16, eval-preprocessed
    tokens: torch.Tensor  # (N, context) int32
    index: dict[tuple[str, str], int] = field(default_factory=dict)  # (shard, key) -> row


def decode(folder: Path, model: Any) -> tuple[Pool, list[dict[str, Any]]]:
    """Every valid sample of a folder of shards, preprocessed once (no augmentation)."""
    images, captions, metas, index = [], [], [], {}
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            for raw in iter_raw_samples(f):
                row, image = parse_sample(raw, set())
                if image is None:
                    continue
                index[(str(tar.resolve()), row["key"])] = len(images)
                images.append(model.preprocess(image).half())
                captions.append(row["caption"])
                metas.append(json.loads(raw.files["json"]))
    tokens = model.tokenizer(captions).int()
    return Pool(torch.stack(images), tokens, index), metas


def zero_shot(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, prompts: Any):
    with torch.no_grad():
        net.eval()
        img = torch.nn.functional.normalize(net.encode_image(images.float()), dim=-1)
        txt = torch.nn.functional.normalize(net.encode_text(prompts), dim=-1)
        net.train()
    return float(((img @ txt.T).argmax(1) == labels).float().mean())


def train_on(
    stream: list[np.ndarray], pool: Pool, seed: int, setup: Setup, eval_set: tuple
) -> list[float]:
    """A fresh learner trained on `stream` (one array of pool rows per step), in order."""
    torch.manual_seed(seed)
    spec = resolve_spec(ModelSpec(setup.model, device="cpu", init_seed=seed))
    model = load_model(spec, warn_random=False)
    trainer = train_mod.Trainer(model, setup.lr, WEIGHT_DECAY, WARMUP, setup.steps)
    curve = [zero_shot(trainer.net, *eval_set)]
    for step, rows in enumerate(stream[: setup.steps]):
        idx = torch.from_numpy(rows)
        trainer.step(step, pool.images[idx].float(), pool.tokens[idx].long())
        if (step + 1) % setup.eval_every == 0:
            curve.append(zero_shot(trainer.net, *eval_set))
    return curve


def train_online(
    seed: int, setup: Setup, env: dict[str, Any], score_size: int | None = None
) -> list[float]:
    """A fresh learner trained with online JEST: at every step it embeds a super-batch of B
    candidates (no gradient) and jestcurate.trainer.online.OnlineSelector picks b jointly by
    learnability against the cached reference embeddings. Candidates come in select's order
    (successive permutations, seeds seed*1000, +1, ...), as for the offline streams."""
    from jestcurate.trainer.online import OnlineSelector, downsample, lower_resolution

    pool, cache, ref, rows_of = env["pool"], env["cache"], env["ref"], env["rows_of"]
    torch.manual_seed(seed)
    model = load_model(resolve_spec(ModelSpec(setup.model, device="cpu", init_seed=seed)), False)
    trainer = train_mod.Trainer(model, setup.lr, WEIGHT_DECAY, WARMUP, setup.steps)
    net = trainer.net
    options = SamplerOptions(setup.batch, setup.ratio, "learnability", chunks=setup.chunks)
    selector = OnlineSelector(ref, options, seed=seed)
    big = options.super_batch
    curve = [zero_shot(net, *env["eval"])]
    step, epoch = 0, 0
    while step < setup.steps:
        perm = np.random.default_rng([seed * 1000 + epoch, 0]).permutation(cache.size)
        for s in range(cache.size // big):
            if step == setup.steps:
                break
            ids = perm[s * big : (s + 1) * big]
            rows = torch.from_numpy(rows_of[ids])
            images, tokens = pool.images[rows].float(), pool.tokens[rows].long()
            with torch.no_grad():
                net.eval()
                if score_size:
                    with lower_resolution(net, score_size):
                        img, txt, scale, *bias = net(downsample(images, score_size), tokens)
                else:
                    img, txt, scale, *bias = net(images, tokens)
                net.train()
            picked = selector.select(
                torch.from_numpy(cache.read("ref_img", ids)),
                torch.from_numpy(cache.read("ref_txt", ids)),
                img,
                txt,
                float(scale),
                float(bias[0]) if bias else None,
            )
            trainer.step(step, images[picked], tokens[picked])
            step += 1
            if step % setup.eval_every == 0:
                curve.append(zero_shot(net, *env["eval"]))
        epoch += 1
    return curve


def uniform_stream(n: int, setup: Setup, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    stream: list[np.ndarray] = []
    while len(stream) < setup.steps:
        order = rng.permutation(n)
        stream += [order[i : i + setup.batch] for i in range(0, n - setup.batch + 1, setup.batch)]
    return stream


def select_config(
    kw: dict[str, Any], setup: Setup, seed: int, env: dict[str, Any], out: Path, **extra: Any
) -> select_mod.SelectConfig:
    """select's settings for a method's `kw`, with select's seed `seed` (a stream's seed*1000
    plus the selection's number)."""
    return select_mod.SelectConfig(
        reference=env["ref"].path,
        learner=env["learner"].path,
        out=out,
        sampling=SamplerOptions(
            setup.batch,
            kw.get("ratio", setup.ratio),
            criterion=kw.get("score"),
            chunks=kw.get("chunks", setup.chunks),
            **{k: v for k, v in kw.items() if k in ("sampler", "sweeps")},
        ),
        seed=seed,
        device="cpu",
        **{k: v for k, v in kw.items() if k == "method"},
        **extra,
    )


def selection_stream(
    kw: dict[str, Any], setup: Setup, seed: int, env: dict[str, Any], pool: Pool
) -> list[np.ndarray]:
    """Batches of successive selections (seeds seed*1000, +1, ...) until there are enough; the
    arms of one selection share it (env["streams"])."""
    made = env.setdefault("streams", {})
    name = (seed, json.dumps({k: v for k, v in kw.items() if k != "arm"}, sort_keys=True))
    if name in made:
        return made[name]
    cache, ref, learner = env["cache"], env["ref"], env["learner"]
    rows_of = env["rows_of"]
    stream: list[np.ndarray] = []
    epoch = 0
    while len(stream) < setup.steps:
        cfg = select_config(kw, setup, seed * 1000 + epoch, env, env["work"] / "unused")
        steps = cache.size // cfg.sampling.super_batch
        for ids, _ in select_mod.choose(cfg, cache, ref, learner, steps):
            stream.append(rows_of[ids])
        epoch += 1
    made[name] = stream
    return stream


def shuffled_stream(stream: list[np.ndarray], setup: Setup, seed: int) -> list[np.ndarray]:
    """The trained steps' rows, permuted (seeded) and cut into new batches of setup.batch."""
    rows = np.concatenate(stream[: setup.steps])
    rows = rows[np.random.default_rng([seed, 27]).permutation(len(rows))]
    return [rows[i : i + setup.batch] for i in range(0, len(rows) - setup.batch + 1, setup.batch)]


def train_openclip(kw: dict[str, Any], setup: Setup, seed: int, env: dict[str, Any]) -> list[float]:
    """The open_clip_train arm: the very selections selection_stream makes for `kw`, written by
    select (with --export) under WORK/openclip/seed-S, each manifest checked batch for batch
    against the in-memory stream, then trained by the launcher; the curve is zero_shot on its
    initial model and on each epoch's checkpoint (an epoch: eval_every steps)."""
    stream = selection_stream(kw, setup, seed, env, env["pool"])
    folder = env["work"] / "openclip" / f"seed-{seed}"
    selections: list[Path] = []
    done = 0
    while done < setup.steps:  # as many selections as selection_stream made
        out = folder / f"selection-{len(selections)}"
        cfg = select_config(kw, setup, seed * 1000 + len(selections), env, out, export=True)
        quality_openclip.write_selection(cfg)
        done += quality_openclip.check_selection(out, stream[done:], env["pool"].index)
        selections.append(out)
    assert done == len(stream), (done, len(stream))
    hyper = {
        "weight_decay": WEIGHT_DECAY,
        "warmup": min(WARMUP, max(1, setup.steps // 5)),  # as the Trainer shortens it
        "sigmoid": env["loss_kind"] == "sigmoid",
    }
    quality_openclip.train(selections, folder, setup, seed, hyper)
    return quality_openclip.curve(
        folder, setup, seed, hyper["sigmoid"], lambda net: zero_shot(net, *env["eval"])
    )


def method_curve(
    name: str, kw: dict[str, Any], seed: int, setup: Setup, env: dict[str, Any]
) -> list[float]:
    """One seed's accuracy curve for a method of METHODS."""
    if kw.get("online"):
        return train_online(seed, setup, env, kw.get("score_size"))
    if kw.get("arm") == "open_clip_train":
        return train_openclip(kw, setup, seed, env)
    pool = env["pool"]
    if name == "uniform":
        stream = uniform_stream(len(pool.tokens), setup, seed)
    else:
        stream = selection_stream(kw, setup, seed, env, pool)
    if kw.get("arm") == "shuffled":
        stream = shuffled_stream(stream, setup, seed)
    return train_on(stream, pool, seed, setup, env["eval"])


def steps_to_reach(curve: list[float], target: float, every: int) -> int | None:
    """The first evaluated step (after training starts) at or above `target`."""
    for i, acc in enumerate(curve[1:], start=1):
        if acc >= target:
            return i * every
    return None


NOISY = ("mismatched", "junk", "blank")
# The samplers compared on the paper's diagnostic: name -> select_batch settings (None: a
# baseline computed here).
SAMPLERS: dict[str, dict[str, Any] | None] = {
    "random": None,
    "independent top-k": None,
    "jest: paper Algorithm 1, T = 1": {"sampler": "paper", "temperature": 1.0},
    "jest: paper Algorithm 1, top-k": {"sampler": "paper", "topk": True},
    "jest: refine, top-k, 1 sweep": {"sampler": "refine", "topk": True, "sweeps": 1},
    "jest: refine, top-k, every candidate": {"sampler": "refine", "topk": True, "pool": 1e9},
    "jest: refine, top-k, 2 sweeps": {"sampler": "refine", "topk": True, "sweeps": 2},
    "jest: refine, T = 0.05": {"sampler": "refine", "temperature": 0.05},
    "jest: refine, T = 0.1": {"sampler": "refine", "temperature": 0.1},
    "jest: refine, T = 0.3": {"sampler": "refine", "temperature": 0.3},
    "jest: refine, T = 1": {"sampler": "refine", "temperature": 1.0},
}


def diagnostic(
    env: dict[str, Any], setup: Setup, batch: int | None = None, ratio: float | None = None
) -> dict[str, Any]:
    """The paper's check, on the same super-batches: the batch learnability (the learner's
    minus the reference's training loss on the chosen batch, as the trainer computes it: CLIP's
    mean loss, or SigLIP's sum of all pair terms over b) of each sampler's batches, independent
    top-k and random batches; and the share of noisy pairs (mismatched, junk, blank) kept."""
    cache, ref, learner = env["cache"], env["ref"], env["learner"]
    b = batch or setup.batch
    big = super_batch_size(b, ratio or setup.ratio)
    kinds = env["kinds"]
    perm = np.random.default_rng([0, 0]).permutation(cache.size)
    out: dict[str, dict[str, list[float]]] = {
        name: {"learnability": [], "noisy": [], "seconds": []} for name in SAMPLERS
    }
    for s in range(min(setup.diagnostic_super_batches, cache.size // big)):
        ids = perm[s * big : (s + 1) * big]
        r = select_mod.embeddings(cache, ids, "ref", ref, torch.device("cpu"))
        m = select_mod.embeddings(cache, ids, "learner", learner, torch.device("cpu"))

        def batch_learnability(rows: torch.Tensor, r: Embeddings = r, m: Embeddings = m) -> float:
            terms = criterion_terms("learnability", r, m)
            for _, term in terms:
                term.add(rows)
            return batch_score(terms) / len(rows)

        for name, kw in SAMPLERS.items():
            began = time.perf_counter()
            if name == "random":
                rows = torch.randperm(big, generator=torch.Generator().manual_seed(s))[:b]
            elif name == "independent top-k":
                own = independent_scores("learnability", r, m)
                rows = torch.sort(own.double(), descending=True, stable=True).indices[:b]
            else:
                assert kw is not None
                generator = torch.Generator().manual_seed(s)
                options = SamplerOptions(b, criterion="learnability", chunks=setup.chunks, **kw)
                rows, _ = select_batch(options, r, m, generator)
            out[name]["seconds"].append(time.perf_counter() - began)
            out[name]["learnability"].append(batch_learnability(rows))
            kept = kinds[env["rows_of"][ids[rows.numpy()]]]
            out[name]["noisy"].append(float(np.isin(kept, NOISY).mean()))
    return {
        name: {
            "batch": b,
            "super_batch": big,
            "mean": float(np.mean(v["learnability"])),
            "std": float(np.std(v["learnability"])),
            "n": len(v["learnability"]),
            "noisy_kept": float(np.mean(v["noisy"])),
            "ms_per_super_batch": 1000 * float(np.mean(v["seconds"])),
        }
        for name, v in out.items()
    }


def diagnostics(env: dict[str, Any], setup: Setup) -> dict[str, Any]:
    """The diagnostic at the main run's b and ratio, and where the paper says joint selection
    matters most: kept ratio 0.1 and a larger batch."""
    settings = {"main": (setup.batch, setup.ratio), "ratio 0.1": (setup.batch, 0.1)}
    settings["larger batch"] = (4 * setup.batch, setup.ratio)
    return {label: diagnostic(env, setup, b, r) for label, (b, r) in settings.items()}


def diagnostic_table(diag: dict[str, Any]) -> list[str]:
    first = next(iter(diag.values()))
    lines = [
        f"| batches from the same super-batches (b {first['batch']}, B {first['super_batch']}) "
        "| batch learnability (mean ± std) | noisy pairs kept | ms per super-batch |",
        "| --- | --- | --- | --- |",
    ]
    for name, d in diag.items():
        lines.append(
            f"| {name} | {d['mean']:.3f} ± {d['std']:.3f} (n={d['n']}) "
            f"| {d['noisy_kept']:.1%} | {d['ms_per_super_batch']:.1f} |"
        )
    return lines


def forward_flops(model: Any, image_size: int, context: int, at: int | None = None) -> int:
    """Forward FLOPs of one sample (image and text); with `at`, the image at `at` pixels."""
    from torch.utils.flop_counter import FlopCounterMode

    from jestcurate.trainer.online import lower_resolution

    size = at or image_size
    scope = lower_resolution(model.model, size) if at else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), scope:
        model.model.encode_image(torch.zeros(1, 3, size, size))
        model.model.encode_text(torch.zeros(1, context, dtype=torch.long))
    return int(counter.get_total_flops())


def prepare(work: Path, setup: Setup) -> dict[str, Any]:
    """Corpus, reference, learner, score sets, decoded pool and eval split, selection cache."""
    splits = {
        "guide": (setup.guide, PRESETS["clean"], 0, 11),
        "pool": (setup.pool, PRESETS["noisy"], 100, 12),
        "eval": (setup.eval, PRESETS["clean"], 900, 13),
    }
    for name, ((shards, samples), noise, first, seed) in splits.items():
        write_corpus(work / name, CorpusSpec(shards, samples, seed, 64, noise, first_shard=first))
    common = {
        "model": setup.model,
        "batch_size": setup.reference_batch,
        "workers": 1,
        "lr": setup.lr,
    }
    train_mod.run(
        train_mod.TrainConfig(
            inputs=(str(work / "guide"),), out=work / "reference.pt",
            steps=setup.reference_steps, **common,
        )
    )  # fmt: skip
    slice_ = tuple(str(p) for p in sorted((work / "pool").glob("*.tar"))[: setup.learner_shards])
    train_mod.run(
        train_mod.TrainConfig(
            inputs=slice_, out=work / "learner.pt", steps=setup.learner_steps, **common
        )
    )
    for role in ("reference", "learner"):
        score_mod.run(
            score_mod.ScoreConfig(
                inputs=(str(work / "pool"),), out=work / "scores" / role, model=setup.model,
                pretrained=str(work / f"{role}.pt"), role=role,
            )
        )  # fmt: skip
    model = load_model(resolve_spec(ModelSpec(setup.model, device="cpu")), warn_random=False)
    pool, pool_meta = decode(work / "pool", model)
    eval_pool, eval_meta = decode(work / "eval", model)
    labels = torch.tensor([m["jc_label"] for m in eval_meta])
    prompts = model.tokenizer([PROMPT.format(color=c, shape=s) for c, s in CLASSES])
    ref = open_score_set(work / "scores" / "reference", role="reference")
    learner = open_score_set(work / "scores" / "learner", role="learner")
    found = eligible.scan(ref, learner, None)
    cache = eligible.fill_cache(ref, learner, found, work / "cache", None, embeddings=True)
    parts = cache.read_range("part", 0, cache.size)
    keys = np.char.decode(cache.read_range("key", 0, cache.size), "utf-8")
    rows_of = np.array([pool.index[(cache.shards[p], k)] for p, k in zip(parts, keys, strict=True)])
    return {
        "pool": pool,
        "eval": (eval_pool.images, labels, prompts),
        "cache": cache,
        "ref": ref,
        "learner": learner,
        "rows_of": rows_of,
        "kinds": np.array([m["jc_kind"] for m in pool_meta]),
        "work": work,
        "loss_kind": model.loss_kind,
        "flops": forward_flops(model, 64, prompts.shape[1]),
        "flops_32": forward_flops(model, 64, prompts.shape[1], at=32),
    }


def summarise(curves: dict[str, list[list[float]]], setup: Setup) -> dict[str, Any]:
    baseline = float(np.mean([c[-1] for c in curves["uniform"]]))
    table = {}
    for name, runs in curves.items():
        reach = [steps_to_reach(c, baseline, setup.eval_every) for c in runs]
        finals = [c[-1] for c in runs]
        reached = [r for r in reach if r is not None]
        mean_reach = float(np.mean(reached)) if len(reached) == len(reach) else None
        table[name] = {
            "final_accuracy_mean": float(np.mean(finals)),
            "final_accuracy_std": float(np.std(finals)),
            "steps_to_baseline": reach,
            "steps_to_baseline_mean": mean_reach,
            "speedup": setup.steps / mean_reach if mean_reach is not None else None,
        }
    return {"baseline_final_accuracy": baseline, "methods": table}


def plot(curves: dict[str, list[list[float]]], setup: Setup, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, runs in curves.items():
        data = np.array(runs)
        x = np.arange(data.shape[1]) * setup.eval_every
        mean, std = data.mean(0), data.std(0)
        ax.plot(x, mean, label=name, linewidth=2.2 if "jest" in name else 1.4)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("zero-shot accuracy (32 classes)")
    ax.set_title(
        f"tiny learner, batch {setup.batch}, kept ratio {setup.ratio}, {len(setup.seeds)} seeds"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict[str, Any], setup: Setup) -> str:
    lines = [
        f"Baseline (uniform pool) final accuracy after {setup.steps} steps: "
        f"{results['summary']['baseline_final_accuracy']:.3f}",
        "",
        "| method | final accuracy (mean ± std) | steps to baseline final (per seed) | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in results["summary"]["methods"].items():
        reach = ", ".join("—" if r is None else str(r) for r in row["steps_to_baseline"])
        speed = "not reached" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        lines.append(
            f"| {name} | {row['final_accuracy_mean']:.3f} ± {row['final_accuracy_std']:.3f} "
            f"| {reach} | {speed} |"
        )
    for diag in results["diagnostic"].values():
        lines += ["", *diagnostic_table(diag)]
    c = results["compute"]
    lines += [
        "",
        f"Compute: {c['forward_flops_per_sample'] / 1e6:.1f} MFLOP per sample forward (image + "
        f"text), a training step ≈ 3 forward passes. Baseline: {c['baseline_tflops']:.2f} TFLOP "
        f"for {setup.steps} steps. Scoring the pool with reference and learner: "
        f"{c['scoring_tflops']:.2f} TFLOP; training them: "
        f"{c['reference_learner_training_tflops']:.2f} TFLOP.",
        "",
        "| method | iterations to baseline | learner TFLOP | + scoring passes TFLOP |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in c["methods"].items():
        if row["iterations"] is None:
            lines.append(f"| {name} | not reached | — | — |")
        else:
            lines.append(
                f"| {name} | {row['iterations']:.0f} | {row['learner_tflops']:.2f} | "
                f"{row['with_scoring_tflops']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def run(setup: Setup, out: Path, work: Path) -> dict[str, Any]:
    began = time.time()
    work.mkdir(parents=True, exist_ok=True)
    env = prepare(work, setup)
    pool = env["pool"]
    n = len(pool.tokens)
    curves: dict[str, list[list[float]]] = {}
    for name, kw in METHODS.items():
        if setup.methods and name not in setup.methods and name != "uniform":
            continue
        curves[name] = [method_curve(name, kw, seed, setup, env) for seed in setup.seeds]
        final = np.mean([c[-1] for c in curves[name]])
        print(f"{name}: final {final:.3f} ({time.time() - began:.0f}s)", flush=True)
    summary = summarise(curves, setup)

    flops = env["flops"]
    step_flops = 3 * flops * setup.batch
    scoring = 2 * n * flops
    aux = 3 * flops * setup.reference_batch * (setup.reference_steps + setup.learner_steps)
    compute = {
        "forward_flops_per_sample": flops,
        "baseline_tflops": setup.steps * step_flops / 1e12,
        "scoring_tflops": scoring / 1e12,
        "reference_learner_training_tflops": aux / 1e12,
        "methods": {},
    }
    big = max(setup.batch, round(setup.batch / setup.ratio))
    for name, row in summary["methods"].items():
        it = row["steps_to_baseline_mean"]
        extra = 0 if name in ("uniform", "random") else scoring
        if METHODS.get(name, {}).get("online") and it is not None:
            # The reference scores the pool once; the learner embeds B candidates every step.
            per = env["flops_32"] if METHODS[name].get("score_size") else flops
            extra = n * flops + it * big * per
        compute["methods"][name] = {
            "iterations": it,
            "learner_tflops": None if it is None else it * step_flops / 1e12,
            "with_scoring_tflops": None if it is None else (it * step_flops + extra) / 1e12,
        }
    results = {
        "setup": asdict(setup),
        "summary": summary,
        "diagnostic": diagnostics(env, setup),
        "compute": compute,
        "curves": curves,
        "seconds": time.time() - began,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results, setup))
    plot(curves, setup, out / "accuracy.png")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/quality/inmemory"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-quality-inmemory"))
    parser.add_argument("--quick", action="store_true", help="a tiny run of the code path")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--model", default="jc-tiny", help="jc-tiny or jc-tiny-sigmoid")
    parser.add_argument(
        "--methods", nargs="+", default=(), choices=list(METHODS), help="run only these"
    )
    parser.add_argument(
        "--diagnostic-only",
        action="store_true",
        help="prepare the pool and print the samplers' batch learnability; no training",
    )
    args = parser.parse_args()
    setup = replace(QUICK if args.quick else Setup(), model=args.model, methods=tuple(args.methods))
    if args.steps:
        setup = replace(setup, steps=args.steps)
    if args.seeds:
        setup = replace(setup, seeds=tuple(range(args.seeds)))
    if args.diagnostic_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        env = prepare(args.workdir, setup)
        for diag in diagnostics(env, setup).values():
            print("\n".join(diagnostic_table(diag)) + "\n", flush=True)
        return
    results = run(setup, args.out, args.workdir)
    print(markdown(results, setup))
    print(f"{results['seconds']:.0f} s; wrote {args.out}/results.json, results.md, accuracy.png")


if __name__ == "__main__":
    main()
