"""A miniature JEST replication through `jestcurate eval`: does training on a selection reach
the uniform pool's quality in fewer steps?

    python benchmarks/quality.py [--out docs/quality/softmax] [--workdir DIR] [--model jc-tiny]
                                 [--methods ...] [--tasks N] [--batch B] [--steps N]
                                 [--eval-every N] [--ablation-ratios R ...] [--quick]

On the project's synthetic corpus (a clean guide split, a noisy pool, a clean zero-shot set):
1. train a tiny reference on the guide split and a proxy learner on a slice of the pool
   (`train`), score the pool with both and the guide split with the reference, the target set
   of the filter arms (`score`);
2. select with every method at the same kept ratio and batch size (`select`); a selection holds
   floor(pool / B) batches, so each method makes successive selections (--seed 0, 1, ...: fresh
   permutations, as the paper's learner keeps filtering new super-batches) until they hold the
   recipe's steps; the ablation does the same at another kept ratio;
3. `jestcurate eval` trains a fresh tiny learner on the uniform pool and on each method's chain
   of selections (one arm each, `-s NAME=SEL0,SEL1,...`), same recipe, several seeds, split over
   --tasks array tasks, and evaluates zero-shot accuracy every --eval-every steps.
--methods also names arms outside the default run: the field's filters (FILTERED) and issue
31's probes (PROBES: hard-learner, top-k, T = 1, a proxy learner trained longer on the whole
pool or refreshed part-way on jest's own picks, and jest's kept rows dealt into batches again:
spread by class, an oracle from the corpus's labels, or shuffled). Another --batch keeps its
selections in selections-bB beside the default's.
Everything is the project's own code but the recomposed arms' dealing (recompose_batches.py);
this script lays out the corpus and the arms. Writes results.json (the eval's results with the
setup), results.md and accuracy.png to --out. The arms eval cannot express (online JEST,
open_clip_train) and the samplers' diagnostic are in quality_inmemory.py.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from recompose_batches import known_for, recompose

from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines import train as train_mod
from jestcurate.pipelines.evaluate import results as results_mod
from jestcurate.pipelines.select.config import reads_learner
from jestcurate.pipelines.select.filters.options import FilterOptions
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus, write_zeroshot_set

TEMPLATE = "a photo of a {c}"  # the zero-shot prompt: "a photo of a red circle", ...


@dataclass(frozen=True)
class Setup:
    model: str = "jc-tiny"  # jc-tiny (CLIP softmax loss) or jc-tiny-sigmoid (SigLIP, as the paper)
    guide: tuple[int, int] = (4, 1000)  # shards, samples per shard
    pool: tuple[int, int] = (40, 500)
    eval_samples: int = 640
    learner_shards: int = 4
    reference_steps: int = 300
    learner_steps: int = 60
    # issue 31's learner probes: a learner trained longer on the whole pool, and one refreshed
    # part-way (the 60-step learner trained on jest's first selection, batch by batch of b)
    long_learner_steps: int = 400
    reference_batch: int = 64
    batch: int = 32
    ratio: float = 0.2
    chunks: int = 16
    steps: int = 400
    eval_every: int = 25
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seeds: int = 3
    ablation_ratios: tuple[float, ...] = (0.1,)
    methods: tuple[str, ...] = ()  # METHODS to run (uniform always); empty: all but FILTERED


QUICK = Setup(
    guide=(1, 256), pool=(2, 256), eval_samples=64, learner_shards=1, reference_steps=20,
    learner_steps=5, long_learner_steps=8, batch=16, steps=20, eval_every=10,
    seeds=1, ablation_ratios=(0.5,),
)  # fmt: skip

# method -> (its arm's name in the eval, select's settings)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {"method": "random"}),
    "clip-score": ("clip-score", {"method": "clip-score"}),
    "easy-ref": ("easy-ref", {"method": "easy-ref"}),
    "learnability": ("learnability", {"method": "learnability"}),
    "jest (easy-ref)": ("jest-easy-ref", {"method": "jest", "score": "easy-ref"}),
    "jest (learnability)": ("jest-learnability", {"method": "jest", "score": "learnability"}),
    "jest (learnability, 2 sweeps)": (
        "jest-learnability-2-sweeps",
        {"method": "jest", "score": "learnability", "sweeps": 2},
    ),
    # The paper's Algorithm 1 as written (select --sampler paper), for comparison.
    "jest (learnability, Algorithm 1)": (
        "jest-learnability-algorithm-1",
        {"method": "jest", "score": "learnability", "sampler": "paper"},
    ),
}
# The field's filters (issue 30), with the guide split scored by the reference as the target
# set: DataComp's best baseline (CLIP score ∩ the image-based cluster filter), NormSim (top 20 %
# of the pool by p = 2 and p = ∞, in random order: ratio 1 of what the filter keeps), and a
# filter composed with jest. Not in the default run (--methods names them).
FILTERED: dict[str, tuple[str, dict[str, Any]]] = {
    "clip-score ∩ image-based": (
        "clip-score-image-based",
        {"method": "clip-score", "filters": {"target_filter": "clusters"}},
    ),
    "NormSim2 (top 20 %)": (
        "normsim2",
        {"method": "random", "ratio": 1.0,
         "filters": {"target_filter": "normsim2", "target_keep": 0.2}},
    ),
    "NormSim∞ (top 20 %)": (
        "normsiminf",
        {"method": "random", "ratio": 1.0,
         "filters": {"target_filter": "normsiminf", "target_keep": 0.2}},
    ),
    "image-based ∩ jest (learnability)": (
        "image-based-jest-learnability",
        {"method": "jest", "score": "learnability", "filters": {"target_filter": "clusters"}},
    ),
}  # fmt: skip
# Issue 31's probes (the sigmoid loss): the batch score, the sampler's sharpness, and the proxy
# learner trained longer on the whole pool or refreshed part-way. Not in the default run.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "jest (hard-learner)": ("jest-hard-learner", {"method": "jest", "score": "hard-learner"}),
    "jest (learnability, top-k)": (
        "jest-learnability-topk", {"method": "jest", "score": "learnability", "topk": True}),
    "jest (learnability, T = 1)": (
        "jest-learnability-t1", {"method": "jest", "score": "learnability", "temperature": 1.0}),
    "learnability (long learner)": (
        "learnability-long-learner", {"method": "learnability", "learner": "learner-long"}),
    "jest (learnability, long learner)": (
        "jest-learnability-long-learner",
        {"method": "jest", "score": "learnability", "learner": "learner-long"}),
    "jest (learnability, refreshed learner)": (
        "jest-learnability-refreshed",
        {"method": "jest", "score": "learnability", "refresh": True}),
    # What a batch's make-up is worth, the kept rows fixed (benchmarks/recompose_batches.py):
    # jest's rows dealt into batches by class (an oracle from the corpus's labels), or shuffled.
    "jest (learnability), batches spread by class (oracle)": (
        "jest-learnability-spread",
        {"method": "jest", "score": "learnability", "recompose": "spread",
         "of": "jest-learnability"}),
    "jest (learnability), batches shuffled": (
        "jest-learnability-shuffled",
        {"method": "jest", "score": "learnability", "recompose": "shuffled",
         "of": "jest-learnability"}),
}  # fmt: skip
METHODS.update(FILTERED)
METHODS.update(PROBES)
DEFAULT = [m for m in METHODS if m not in FILTERED and m not in PROBES]

# Where the paper says joint selection matters most, a lower kept ratio: the joint samplers
# beside the independent baseline with the same criterion.
ABLATED = ("learnability", "jest (learnability)", "jest (learnability, Algorithm 1)")


def prepare(work: Path, setup: Setup) -> None:
    """Corpus, zero-shot set, reference and learner, and the pool scored with both; each step
    skipped or resumed on a rerun (train and score are idempotent)."""
    if not (work / "zeroshot" / "classnames.txt").is_file():
        for name, (shards, samples), noise, first, seed in (
            ("guide", setup.guide, "clean", 0, 11),
            ("pool", setup.pool, "noisy", 100, 12),
        ):
            spec = CorpusSpec(shards, samples, seed, 64, PRESETS[noise], first_shard=first)
            write_corpus(work / name, spec)
        write_zeroshot_set(work / "zeroshot", setup.eval_samples, 13, templates=(TEMPLATE,))
    pool = pool_shards(work)
    guide = (str(work / "guide"),)
    b = setup.reference_batch
    train_and_score(work, setup, "reference", guide, setup.reference_steps, b, role="reference")
    # the guide split, by the reference: the filter arms' target set
    score_with(work, setup, work / "reference.pt", "guide", "guide", "reference")
    train_and_score(work, setup, "learner", pool[: setup.learner_shards], setup.learner_steps, b)


def score_with(work: Path, setup: Setup, checkpoint: Path, data: str, folder: str,
               role: str) -> Path:  # fmt: skip
    """WORKDIR/DATA scored by a checkpoint into scores/FOLDER (skipped once done)."""
    out = work / "scores" / folder
    score_mod.run(score_mod.ScoreConfig(
        inputs=(str(work / data),), out=out, model=setup.model, pretrained=str(checkpoint),
        role=role,
    ))  # fmt: skip
    return out


def train_and_score(
    work: Path,
    setup: Setup,
    name: str,
    inputs: tuple[str, ...],
    steps: int,
    batch: int,
    init: Path | None = None,
    role: str = "learner",
) -> Path:
    """Train a checkpoint NAME.pt and score the pool with it into scores/NAME; both skip on a
    rerun (train and score are idempotent)."""
    out = work / f"{name}.pt"
    train_mod.run(train_mod.TrainConfig(
        inputs=inputs, out=out, steps=steps, model=setup.model, batch_size=batch, workers=1,
        lr=setup.lr, pretrained=str(init) if init else None,
    ))  # fmt: skip
    return score_with(work, setup, out, "pool", name, role)


def learner_scores(work: Path, setup: Setup, name: str) -> Path:
    """The pool scored by the proxy learner NAME: prepare's (a slice of the pool), or one
    trained for long_learner_steps on the whole pool."""
    if name == "learner-long":
        return train_and_score(
            work, setup, name, pool_shards(work), setup.long_learner_steps, setup.reference_batch
        )
    return work / "scores" / name


def refreshed_learner(work: Path, setup: Setup, first: Path) -> Path:
    """The 60-step learner trained on the samples of jest's first selection (exported by
    select) for as many steps of b as it holds, as the eval's learner has seen them when the
    second selection begins (shuffled, with a warmup of its own): the offline stand-in for the
    paper's learner scoring with its current weights. One per b (its steps and batch differ)."""
    shards = tuple(sorted(str(p) for p in (first / "shards").glob("*.tar")))
    steps = json.loads((first / "summary.json").read_text())["counts"]["steps"]
    name = "learner-refreshed" + ("" if setup.batch == Setup.batch else f"-b{setup.batch}")
    return train_and_score(work, setup, name, shards, steps, setup.batch, init=work / "learner.pt")


@functools.cache
def dealt_by(how: str, work: Path) -> dict:
    """What a recomposed arm deals its rows by (read once per run)."""
    return known_for(how, work)


def pool_shards(work: Path) -> tuple[str, ...]:
    return tuple(sorted(str(p) for p in (work / "pool").glob("*.tar")))


def chain(work: Path, setup: Setup, kw: dict[str, Any], ratio: float, name: str) -> list[Path]:
    """Successive selections of one method (--seed 0, 1, ...) until they hold setup.steps
    batches; reruns reuse the finished ones (select is idempotent)."""
    made: list[Path] = []
    held = 0
    # the learner's scores only where the method reads them (the FLOPs count its pass)
    needs = reads_learner(kw["method"], kw.get("score"))
    learner = learner_scores(work, setup, kw.get("learner", "learner"))
    # another b's selections beside the default's (a selection folder holds one b)
    folder = "selections" if setup.batch == Setup.batch else f"selections-b{setup.batch}"
    while held < setup.steps:
        out = work / folder / name / f"seed-{len(made)}"
        sampling = SamplerOptions(
            setup.batch, ratio, criterion=kw.get("score"), chunks=min(setup.chunks, setup.batch),
            **{k: v for k, v in kw.items() if k in ("sampler", "sweeps", "topk", "temperature")},
        )  # fmt: skip
        if kw.get("refresh") and made:  # the learner as it would be after the first selection
            learner = refreshed_learner(work, setup, made[0])
        filters = FilterOptions(target=work / "scores" / "guide", **kw["filters"]) if (
            "filters" in kw) else FilterOptions()  # fmt: skip
        # a recomposed arm: the selection of arm `of`, its rows dealt into batches again
        selected = work / folder / kw["of"] / out.name if "recompose" in kw else out
        cfg = select_mod.SelectConfig(
            reference=work / "scores" / "reference",
            learner=learner if needs else None,
            out=selected, method=kw["method"], sampling=sampling, seed=len(made),
            device="cpu", filters=filters, export=bool(kw.get("refresh")) and not made,
        )  # fmt: skip
        select_mod.run(cfg)
        if "recompose" in kw:
            how = kw["recompose"]
            recompose(selected, out, how, dealt_by(how, work), len(made))
        steps = json.loads((out / "summary.json").read_text())["counts"]["steps"]
        if steps < 1:
            raise SystemExit(f"{name}: a selection of no batches; the pool is too small")
        held += steps
        made.append(out)
    return made


def arms(work: Path, setup: Setup) -> dict[str, tuple[str, list[Path]]]:
    """method label -> (arm name, its chain of selections), the ablation's after the rest."""
    chosen = [m for m in METHODS if m in setup.methods or (not setup.methods and m in DEFAULT)]
    found = {}
    for label in chosen:
        name, kw = METHODS[label]
        found[label] = (name, chain(work, setup, kw, kw.get("ratio", setup.ratio), name))
    for ratio in setup.ablation_ratios:
        for label in (m for m in ABLATED if m in chosen):
            name, kw = METHODS[label]
            name = f"{name}-ratio-{ratio}"
            found[f"{label}, ratio {ratio}"] = (name, chain(work, setup, kw, ratio, name))
    return found


def evaluate(work: Path, setup: Setup, found: dict[str, tuple[str, list[Path]]], tasks: int):
    """`jestcurate eval` over every arm as `tasks` array tasks side by side, then once more to
    print the table (it trains nothing then); returns its results.json. The eval's folder is
    named after its options, so a rerun with others starts its own."""
    command = [
        sys.executable, "-m", "jestcurate", "eval", str(work / "pool"),
        "--eval", str(work / "zeroshot"), "--model", setup.model, "--device", "cpu",
        "--steps", str(setup.steps), "-b", str(setup.batch), "--lr", str(setup.lr),
        "--warmup", str(setup.warmup), "--weight-decay", str(setup.weight_decay),
        "--eval-every", str(setup.eval_every), "--seeds", str(setup.seeds),
    ]  # fmt: skip
    for name, paths in found.values():
        command += ["-s", f"{name}={','.join(str(p) for p in paths)}"]
    out = work / f"eval-{hashlib.sha256(' '.join(command[3:]).encode()).hexdigest()[:10]}"
    command += ["--out", str(out)]
    env = dict(os.environ)
    if tasks > 1:  # tasks side by side share the cores
        env.setdefault("OMP_NUM_THREADS", "1")
    running = [
        subprocess.Popen([*command, "--task-index", str(i), "--num-tasks", str(tasks)], env=env)
        for i in range(tasks)
    ]
    codes = [p.wait() for p in running]  # every task, so none is left running on a failure
    if any(codes):
        raise SystemExit(f"an eval task failed (its output is above); rerun to finish ({out})")
    subprocess.run(command, env=env, check=True)
    return out, json.loads((out / "results.json").read_text())


def markdown(results: dict[str, Any], setup: Setup) -> str:
    """eval's own table (results_mod.table) with each arm under its method's label, the ablation
    in a table of its own, and the compute behind the TFLOP columns."""
    summary = results["eval"]["summary"]
    labels = {"uniform": "uniform", **{name: label for label, name in results["arms"].items()}}
    ablated = {name for label, name in results["arms"].items() if ", ratio " in label}
    rows = {arm: f"| {labels[arm]} | " + " | ".join(cells) + " |"
            for arm, _, cells in results_mod.table(summary)}  # fmt: skip
    header = ["| method | " + " | ".join(results_mod.COLUMNS[1:]) + " |", "|" + " --- |" * 6]
    flops = summary["learner_forward_flops_per_sample"]
    aux = 3 * flops * setup.reference_batch * (setup.reference_steps + setup.learner_steps)
    return "\n".join([
        results_mod.headline(summary),
        "", *header, *(row for arm, row in rows.items() if arm not in ablated),
        *(["", *header] if ablated else []),
        *(row for arm, row in rows.items() if arm in ablated),
        "",
        f"Compute: {flops / 1e6:.1f} MFLOP per sample forward (image + text), a training step "
        f"≈ 3 forward passes. Baseline: {summary['train_tflops']:.2f} TFLOP for {setup.steps} "
        f"steps. Training the reference and learner: {aux / 1e12:.2f} TFLOP (not counted "
        "above).",
    ]) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/quality/softmax"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-quality"))
    parser.add_argument("--quick", action="store_true", help="a tiny run of the code path")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="b (the learner's batch)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--ablation-ratios", type=float, nargs="*", default=None,
        help="the kept ratios of the ablation (none: no ablation)",
    )  # fmt: skip
    parser.add_argument("--tasks", type=int, default=1, help="eval array tasks side by side")
    parser.add_argument("--model", default="jc-tiny", help="jc-tiny or jc-tiny-sigmoid")
    parser.add_argument(
        "--methods", nargs="+", default=(), choices=list(METHODS), help="run only these"
    )
    args = parser.parse_args()
    setup = replace(QUICK if args.quick else Setup(), model=args.model, methods=tuple(args.methods))
    given = ("steps", "seeds", "batch", "eval_every")
    setup = replace(setup, **{k: v for k in given if (v := getattr(args, k))})
    if args.ablation_ratios is not None:
        setup = replace(setup, ablation_ratios=tuple(args.ablation_ratios))
    began = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, setup)
    found = arms(work, setup)
    print(f"selections made ({time.time() - began:.0f} s); eval follows", flush=True)
    results = {
        "setup": asdict(setup),
        "arms": {label: name for label, (name, _) in found.items()},
        "selections": {name: [str(p) for p in paths] for name, paths in found.values()},
    }
    folder, results["eval"] = evaluate(work, setup, found, args.tasks)
    results["seconds"] = time.time() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results, setup))
    shutil.copy(folder / "curves.png", args.out / "accuracy.png")
    print(markdown(results, setup))
    print(f"{results['seconds']:.0f} s; wrote {args.out}/results.json, results.md, accuracy.png")


if __name__ == "__main__":
    main()
