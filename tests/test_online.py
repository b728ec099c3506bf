"""jestcurate.trainer.online: the in-loop selector agrees with `select --method jest`, super-batches
split over ranks and workers without gaps or overlaps, and a short online training run works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jestcurate.io.store import embedding_matrix, open_score_set
from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines import select as select_mod
from jestcurate.trainer.online import OnlineSelector, SuperBatches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scored(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test corpus scored by two differently initialised jc-tiny models."""
    root = tmp_path_factory.mktemp("online")
    for role, seed in (("reference", 0), ("learner", 1)):
        cfg = score_mod.ScoreConfig(
            inputs=(str(corpus),),
            out=root / role,
            model="jc-tiny",
            device="cpu",
            workers=0,
            role=role,
            init_seed=seed,
        )
        score_mod.run(cfg)
    return {"reference": root / "reference", "learner": root / "learner", "root": root}


def learner_rows(learner: Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    table = pq.read_table(learner / "parts", columns=["shard", "index", "img_emb", "txt_emb"])
    img, txt = embedding_matrix(table.column("img_emb")), embedding_matrix(table.column("txt_emb"))
    keys = zip(table.column("shard").to_pylist(), table.column("index").to_pylist(), strict=True)
    return {k: (img[i], txt[i]) for i, k in enumerate(keys)}


@pytest.mark.parametrize("criterion", ["learnability", "easy-ref"])
def test_online_selection_equals_select_jest(scored, tmp_path: Path, criterion: str) -> None:
    b, ratio, seed = 4, 0.25, 3
    out = tmp_path / "sel"
    select_mod.run(
        select_mod.SelectConfig(
            reference=scored["reference"],
            out=out,
            learner=scored["learner"],
            method="jest",
            sampling=SamplerOptions(b, ratio, criterion=criterion),
            seed=seed,
            device="cpu",
        )
    )
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    offline: dict[int, list[tuple[str, int]]] = {}
    for row in manifest:
        offline.setdefault(row["step"], []).append((row["shard"], row["index"]))

    batches = SuperBatches(scored["reference"], b, ratio, seed=seed, cache_dir=tmp_path / "cache")
    learner_set = open_score_set(scored["learner"])
    selector = OnlineSelector(batches.reference, SamplerOptions(b, criterion=criterion), seed=seed)
    lookup = learner_rows(scored["learner"])
    assert len(batches) == len(offline) > 1
    for sb in batches:
        keys = list(zip(sb.shards, sb.index.tolist(), strict=True))
        img = torch.from_numpy(np.stack([lookup[k][0] for k in keys]))
        txt = torch.from_numpy(np.stack([lookup[k][1] for k in keys]))
        picked = selector.select(
            sb.ref_img, sb.ref_txt, img, txt, learner_set.scale, learner_set.bias
        )
        assert [keys[p] for p in picked.tolist()] == offline[sb.step], sb.step


def test_ranks_and_workers_cover_each_super_batch_once(scored, tmp_path: Path) -> None:
    b, ratio, world = 4, 0.25, 2
    seen: dict[int, list[int]] = {}
    picks: dict[int, list[int]] = {}
    for rank in range(world):
        batches = SuperBatches(
            scored["reference"], b, ratio, cache_dir=tmp_path / "c", rank=rank, world_size=world
        )
        selector = OnlineSelector(batches.reference, SamplerOptions(b, criterion="easy-ref"))
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)
        steps = []
        for sb in loader:
            steps.append(sb.step)
            seen.setdefault(sb.step, []).extend(range(sb.own.start, sb.own.stop))
            assert len(sb.samples) == batches.super_batch // world
            picked = selector.select(sb.ref_img, sb.ref_txt, None, None)
            mine = selector.rank_slice(picked, rank, world)
            fetched = sb.fetch(mine)
            assert [s["__key__"] for s in fetched] == [
                Path(sb.shards[p]).stem + f"{sb.index[p]:04d}" for p in mine.tolist()
            ]
            picks.setdefault(sb.step, []).extend(mine.tolist())
        assert steps == list(range(len(batches)))  # step order holds across workers
    for step, positions in seen.items():
        assert sorted(positions) == list(range(16)), step  # every candidate scored once
    for step, positions in picks.items():
        assert len(positions) == b == len(set(positions)), step  # every pick trained once


def test_example_trains_online_uniform_and_offline(scored, corpus: Path, tmp_path: Path) -> None:
    script = ROOT / "examples" / "online_jest.py"
    results = {}
    for mode in ("online", "uniform", "offline"):
        report = tmp_path / f"{mode}.json"
        cmd = [
            sys.executable, str(script), "--scores", str(scored["reference"]),
            "--mode", mode, "--batch-size", "4", "--ratio", "0.25", "--steps", "3",
            "--workdir", str(tmp_path / "work"), "--report", str(report),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        results[mode] = json.loads(report.read_text())
        assert "forward" in done.stdout  # the compute accounting is printed
    assert results["online"]["compute"]["scoring_forwards"] == 3 * 16
    report = tmp_path / "cheap.json"
    cmd = [
        sys.executable, str(script), "--scores", str(scored["reference"]), "--mode", "online",
        "--batch-size", "4", "--ratio", "0.25", "--steps", "2", "--score-size", "32",
        "--workdir", str(tmp_path / "work"), "--report", str(report),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    cheap = json.loads(report.read_text())["compute"]["scoring_forwards"]
    assert 0 < cheap < 0.5 * 2 * 16, cheap  # measured FLOPs: well under half a full pass
    assert results["uniform"]["compute"]["scoring_forwards"] == 0
    for r in results.values():
        assert r["steps"] == 3 and np.isfinite(r["final_loss"])


def test_lower_resolution_scoring_is_cheaper_and_leaves_the_model_alone() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from jestcurate.errors import JCError
    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
    from jestcurate.trainer.online import downsample, lower_resolution

    net = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), False).model.eval()
    images = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        full = net.encode_image(images)
        with FlopCounterMode(display=False) as low_count, lower_resolution(net, 32):
            low = net.encode_image(downsample(images, 32))
        with FlopCounterMode(display=False) as full_count:
            net.encode_image(images)
    assert low.shape == full.shape and torch.isfinite(low).all()
    assert low_count.get_total_flops() < 0.4 * full_count.get_total_flops()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored
    with pytest.raises(JCError, match="multiple of the patch size"), lower_resolution(net, 30):
        pass


def test_a_sample_whose_key_changed_is_refused(scored, tmp_path: Path) -> None:
    from jestcurate.errors import JCError

    batches = SuperBatches(scored["reference"], 4, 0.25, cache_dir=tmp_path / "c", world_size=2)
    sb = batches.super_batch_at(0)
    outside = sb.own.stop  # a position this rank reads on demand
    sb.keys[outside] = "not-the-key"
    with pytest.raises(JCError, match="changed since it was scored"):
        sb.fetch([outside])


def test_super_batches_from_an_export(scored, tmp_path: Path) -> None:
    from jestcurate.pipelines.export import export

    sel = tmp_path / "sel"
    select_mod.run(
        select_mod.SelectConfig(
            reference=scored["reference"], out=sel, method="clip-score",
            sampling=SamplerOptions(4, 0.5), device="cpu",
        )
    )  # fmt: skip
    export(sel, 8)
    kept = {(r["shard"], r["index"]) for r in pq.read_table(sel / "manifest.parquet").to_pylist()}
    batches = SuperBatches(scored["reference"], 4, 0.5, cache_dir=tmp_path / "c", export=sel)
    assert len(batches) == len(kept) // 8
    for sb in batches:
        assert len(sb.ids) == 8
        for sample in sb.fetch(range(8)):
            meta = json.loads(sample["json"])["jestcurate"]
            assert (meta["source_shard"], meta["source_index"]) in kept


def test_the_selector_takes_options_and_never_drops_the_learner_quietly(
    scored, tmp_path: Path
) -> None:
    batches = SuperBatches(scored["reference"], 4, 0.25, cache_dir=tmp_path / "cache")
    with pytest.raises(TypeError, match="takes a SamplerOptions"):
        OnlineSelector(batches.reference, 4)  # the signature before SamplerOptions
    selector = OnlineSelector(batches.reference, SamplerOptions(4))  # learnability by default
    sb = next(iter(batches))
    with pytest.raises(ValueError, match="learnability needs learner"):
        selector.select(sb.ref_img, sb.ref_txt, None, None)
    easy = OnlineSelector(batches.reference, SamplerOptions(4, criterion="easy-ref"))
    assert len(easy.select(sb.ref_img, sb.ref_txt, None, None)) == 4
