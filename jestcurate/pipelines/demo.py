"""`jestcurate demo`: the whole JEST loop on a synthetic corpus, offline, in a few minutes.

1. synth: a clean guide split, a noisy pool (clean, mismatched, junk, blank and duplicate pairs,
   the kind of each recorded in its .json) and a clean evaluation split;
2. train: a tiny reference on the guide split and a tiny proxy learner on a slice of the pool;
3. score: the pool with both (roles reference and learner);
4. select: jest (learnability) and random, both exported;
5. report: which noise kinds each method kept.
Every step is the same code the commands run, and each is resumable: rerunning the demo in
the same folder reuses what is done.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from jestcurate import ui
from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines import train as train_mod
from jestcurate.pipelines.report import write_report
from jestcurate.pipelines.synth import NOISE_KINDS, PRESETS, CorpusSpec, write_corpus

log = logging.getLogger(__name__)
MODEL = "jc-tiny"
NOISE = ("mismatched", "junk", "blank")


@dataclass(frozen=True)
class DemoSize:
    guide: tuple[int, int]  # shards, samples per shard
    pool: tuple[int, int]
    eval: tuple[int, int]
    learner_shards: int  # pool shards the proxy learner trains on
    reference_steps: int
    learner_steps: int
    train_batch: int
    select_batch: int
    ratio: float
    image_size: int = 64


SIZES = {
    # About two minutes on a 2-core CPU, most of it training the reference.
    "small": DemoSize((4, 500), (8, 500), (1, 320), 2, 250, 40, 64, 100, 0.25),
    "medium": DemoSize((8, 1000), (40, 500), (2, 500), 8, 1200, 150, 64, 256, 0.2),
}


@dataclass
class DemoReport:
    out: Path
    pool_kinds: Counter[str]
    kept: dict[str, Counter[str]]  # method -> kind -> kept count

    def noise_share(self, method: str) -> float:
        kept = self.kept[method]
        return sum(kept[k] for k in NOISE) / max(1, sum(kept.values()))


def _kinds(pool: Path) -> dict[tuple[str, str], str]:
    """(shard path, key) -> noise kind, from the pool's own .json files."""
    kinds = {}
    for tar_path in sorted(pool.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    kinds[(str(tar_path.resolve()), meta["key"])] = meta["jc_kind"]
    return kinds


def run(
    out: Path,
    size: DemoSize,
    training_progress: Callable[[str], Any] | None = None,
    score_progress: Callable[[], Any] | None = None,
) -> DemoReport:
    """Run every stage into `out`. The progress factories are ui.training_progress and
    score.ScoreProgress (context managers), or None for silence."""

    def stage(name: str) -> None:
        log.info("demo: %s", name)

    def train(cfg: train_mod.TrainConfig, label: str) -> None:
        if training_progress is None:
            train_mod.run(cfg)
            return
        with training_progress(label) as on_step:
            train_mod.run(cfg, on_step)

    def score(cfg: score_mod.ScoreConfig) -> None:
        if score_progress is None:
            score_mod.run(cfg)
            return
        with score_progress() as progress:
            score_mod.run(cfg, progress)

    out.mkdir(parents=True, exist_ok=True)
    stage("generating the guide, pool and eval splits")
    splits = {
        "guide": (size.guide, PRESETS["clean"], 0, 1),
        "pool": (size.pool, PRESETS["noisy"], 100, 2),
        "eval": (size.eval, PRESETS["clean"], 900, 3),
    }
    for name, ((shards, samples), noise, first, seed) in splits.items():
        spec = CorpusSpec(shards, samples, seed, size.image_size, noise, first_shard=first)
        write_corpus(out / name, spec)
    pool = out / "pool"

    stage("training the reference on the guide split")
    common = {"model": MODEL, "batch_size": size.train_batch, "workers": 1, "lr": 1e-3}
    train(
        train_mod.TrainConfig(
            inputs=(str(out / "guide"),),
            out=out / "reference.pt",
            steps=size.reference_steps,
            **common,
        ),
        "training the reference",
    )
    stage("training the proxy learner on a slice of the pool")
    learner_shards = tuple(str(p) for p in sorted(pool.glob("*.tar"))[: size.learner_shards])
    train(
        train_mod.TrainConfig(
            inputs=learner_shards, out=out / "learner.pt", steps=size.learner_steps, **common
        ),
        "training the learner",
    )

    for role, checkpoint in (("reference", "reference.pt"), ("learner", "learner.pt")):
        stage(f"scoring the pool with the {role}")
        score(
            score_mod.ScoreConfig(
                inputs=(str(pool),),
                out=out / "scores" / role,
                model=MODEL,
                pretrained=str(out / checkpoint),
                role=role,
            )
        )

    kinds = _kinds(pool)
    kept: dict[str, Counter[str]] = {}
    for method in ("jest", "random"):
        stage(f"selecting with {method}")
        target = _select(out, size, method)
        rows = pq.read_table(target / "manifest.parquet", columns=["shard", "key"]).to_pylist()
        kept[method] = Counter(kinds[(r["shard"], r["key"])] for r in rows)
    stage("writing report.html")
    write_report(out / "scores" / "reference", out / "report.html", out / "curated" / "jest")
    return DemoReport(out, Counter(kinds.values()), kept)


def _select(out: Path, size: DemoSize, method: str) -> Path:
    """Select with `method` from the pool's two score sets into curated/METHOD, exported."""
    target = out / "curated" / method
    select_mod.run(
        select_mod.SelectConfig(
            reference=out / "scores" / "reference",
            learner=out / "scores" / "learner",
            out=target,
            method=method,
            sampling=SamplerOptions(size.select_batch, size.ratio),
            export=True,
        )
    )
    return target


def table_rows(report: DemoReport) -> list[tuple[str, ...]]:
    """(kind, in the pool, kept by jest, kept by random) with kept shown as count and share."""
    rows = []
    for kind in NOISE_KINDS:
        total = report.pool_kinds[kind]
        cells = [kind, f"{total:,}"]
        for method in ("jest", "random"):
            n = report.kept[method][kind]
            cells.append(f"{n:,} ({n / total:.0%})" if total else "0")
        rows.append(tuple(cells))
    return rows


def print_summary(report: Any, console: Console = ui.stdout) -> None:
    table = Table(title="pool samples kept, by kind", title_justify="left")
    for name, justify in (
        ("kind", "left"),
        ("in pool", "right"),
        ("jest", "right"),
        ("random", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    jest, rand = report.noise_share("jest"), report.noise_share("random")
    console.print(
        f"mismatched, junk and blank pairs: {jest:.0%} of jest's batches, {rand:.0%} of random's",
        highlight=False,
    )
    out = report.out
    console.print(
        f"outputs in {out}: report.html (open it in a browser), reference.pt, learner.pt, "
        "scores/{reference,learner}, curated/{jest,random} (manifest.parquet, summary.json, "
        "uids.npy, shards/)",
        highlight=False,
        soft_wrap=True,
    )
