"""`jestcurate decontaminate` and `select --exclude`: evaluation images planted in a pool as near
copies (re-cropped by 1 to 4 pixels a side, re-encoded as JPEGs at quality 55 to 80, under
captions of their own) are found, few other rows are, and select keeps none of them.

The model is jc-tiny with random weights (seed 0): no trained weights can be downloaded here,
and a briefly trained jc-tiny learns the shapes' classes, not single images, so it puts every
image of a class together. Random weights keep the images apart in order but squeeze every
cosine above 0.99 (a collapsed space), hence a test threshold of 0.9993 where a trained CLIP
takes the default 0.95; the evaluation images are smooth random colour fields, each distinct."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from jestcurate.pipelines import decontam
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, Plant, write_plant, write_tar

THRESHOLD = 0.9993  # for jc-tiny's random-weight space, measured (docs/select.md)
SIZE = 128


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plant, Path, Path]:
    """200 evaluation images; a pool of 400 synthetic shapes, 200 other colour fields and near
    copies of 100 evaluation images; both scored with jc-tiny."""
    root = tmp_path_factory.mktemp("plant")
    shapes = CorpusSpec(shards=4, samples_per_shard=100, seed=3, image_size=SIZE,
                        noise=dict(PRESETS["noisy"]))  # fmt: skip
    planted = write_plant(root, eval_images=200, planted=100, fields=200, shapes=shapes,
                          size=SIZE, seed=3)  # fmt: skip
    for inputs, out in ((planted.pool_dir, "pool-scores"), (planted.eval_dir, "eval-scores")):
        cfg = score_mod.ScoreConfig(
            inputs=(str(inputs),), out=root / out, model="jc-tiny", workers=0, batch_size=64
        )
        score_mod.run(cfg)
    return planted, root / "pool-scores", root / "eval-scores"


def hits(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["shard"], r["key"]): r for r in pq.read_table(out / decontam.OUTPUT).to_pylist()}


def rates(planted: Plant, found: dict[tuple[str, str], dict]) -> tuple[float, float, float]:
    """Recall on the planted copies (matched to the image they copy), and the share of the
    other colour fields and of the shapes that were hits."""
    recall = sum(k in found and found[k]["eval_key"] == v for k, v in planted.planted.items())
    fields, shapes = (
        sum(k in found for k in planted.others[kind]) for kind in ("fields", "shapes")
    )
    return (
        recall / len(planted.planted),
        fields / len(planted.others["fields"]),
        shapes / len(planted.others["shapes"]),
    )


def manifest_keys(out: Path) -> set[tuple[str, str]]:
    return {(r["shard"], r["key"]) for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_planted_evaluation_images_are_found(plant, tmp_path) -> None:
    planted, pool, evalset = plant
    out = tmp_path / "dc"
    args = ("decontaminate", pool, "--against", evalset, "--out", out, "--device", "cpu")
    code, output = run_cli(*args, "--threshold", THRESHOLD)
    assert code == 0, output
    found = hits(out)
    recall, false_fields, false_shapes = rates(planted, found)
    # Measured on this plant: recall 1.0, no other field and no shape (docs/select.md).
    assert recall >= 0.95, recall
    assert false_fields <= 0.02 and false_shapes <= 0.005, (false_fields, false_shapes)
    summary = json.loads((out / decontam.SUMMARY).read_text())
    (one,) = summary["sets"]
    assert summary["excluded"] == len(found) == one["hits"] == one["image_hits"] + one["pair_hits"]
    assert summary["searched"] == summary["ok_rows"] == 700 and one["images"] == 200
    assert one["kind"] == "score set" and one["warning"] is None and not summary["warnings"]
    assert summary["params"] == {"threshold": THRESHOLD}
    assert one["pool_rows_at"][f"{THRESHOLD:g}"] == len(found)
    examples = one["examples"]["closest"] + one["examples"]["borderline"]
    assert examples and all(e["cosine"] >= THRESHOLD for e in examples)
    assert all((e["pool_shard"], e["pool_key"]) in found for e in examples)
    row = next(iter(found.values()))
    assert row["part"] == Path(row["shard"]).stem and row["eval_set"] == "eval-scores"
    assert (
        f"{len(found):,} of 700 pool rows excluded" in output
        and "eval-scores (200 images" in output
    )
    # A rerun reuses it; another threshold into the same folder is refused.
    code, output = run_cli(*args, "--threshold", THRESHOLD)
    assert code == 0 and "already done, reused" in output, output
    code, output = run_cli(*args, "--threshold", 0.999)
    assert code == 2 and "holds a different decontamination" in output, output
    assert "params.threshold" in output and output.count("\n") == 1
    code, output = run_cli("verify", out)
    assert code == 0 and "decontamination" in output, output
    code, output = run_cli("info", out)
    assert code == 0 and "(decontamination)" in output and "own nearest cosine" in output, output


def clip_benchmark_layout(eval_dir: Path, out: Path) -> None:
    """The evaluation tars as clip_benchmark writes classification sets: NAME/test/0.tar with
    lossless .webp images and .cls labels, no caption, and NAME/classnames.txt."""
    samples = []
    for tar in sorted(eval_dir.glob("*.tar")):
        with tarfile.open(tar) as f:
            for member in f.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(f.extractfile(member).read()))
                    buf = io.BytesIO()
                    image.save(buf, format="webp", lossless=True)
                    key = member.name[: -len(".jpg")]
                    samples.append({"__key__": key, "webp": buf.getvalue(), "cls": b"0"})
    (out / "test").mkdir(parents=True)
    write_tar(out / "test" / "0.tar", samples)
    (out / "classnames.txt").write_text("field\n")


def test_tars_are_embedded_with_the_pools_model(plant, tmp_path) -> None:
    planted, pool, evalset = plant
    clip_benchmark_layout(planted.eval_dir, tmp_path / "fields")
    out = tmp_path / "dc"
    code, output = run_cli(
        "decontaminate", pool, "--against", planted.eval_dir, "--against", tmp_path / "fields",
        "--against", evalset, "--out", out, "--threshold", THRESHOLD, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    summary = json.loads((out / decontam.SUMMARY).read_text())
    tars, images_only, scored = summary["sets"]
    assert (tars["kind"], images_only["kind"], scored["kind"]) == ("shards", "shards", "score set")
    assert tars["images"] == images_only["images"] == 200 and tars["captions"] == 200
    assert images_only["captions"] == 0 and images_only["pair_hits"] == 0
    # The same images embedded here find what their score set finds (a pool scored with
    # --decode torch differs from PIL decoding by rounding only).
    for s in (tars, images_only):
        assert abs(s["hits"] - scored["hits"]) <= 2, (s["hits"], scored["hits"])
    recall, false_fields, _ = rates(planted, hits(out))
    assert recall >= 0.95 and false_fields <= 0.02, (recall, false_fields)
    # Each row names the closest of the sets that found it.
    assert {r["eval_set"] for r in hits(out).values()} <= {"eval", "fields", "eval-scores"}


def test_the_default_threshold_warns_on_a_collapsed_space(plant, tmp_path) -> None:
    planted, pool, evalset = plant
    out = tmp_path / "dc"
    code, output = run_cli("decontaminate", pool, "--against", evalset, "--out", out)
    assert code == 0, output
    assert "the embedding space looks collapsed" in output and "Try --threshold" in output
    summary = json.loads((out / decontam.SUMMARY).read_text())
    (one,) = summary["sets"]
    assert summary["params"]["threshold"] == decontam.DEFAULT_THRESHOLD
    assert one["hits"] > 0.9 * 700 and one["own_nearest_cosine"]["median"] > 0.99
    suggested = one["suggested_threshold"]
    assert suggested["threshold"] > 0.998 and one["warning"] in summary["warnings"]
    assert suggested["rows"] == one["pool_rows_at"][f"{suggested['threshold']:g}"]
    # The suggestion finds the plant: only 1% of the evaluation set's own images reach it.
    code, output = run_cli(
        "decontaminate", pool, "--against", evalset, "--out", tmp_path / "suggested",
        "--threshold", suggested["threshold"],
    )  # fmt: skip
    assert code == 0, output
    recall, false_fields, false_shapes = rates(planted, hits(tmp_path / "suggested"))
    assert recall >= 0.95 and false_fields <= 0.1 and false_shapes == 0, (recall, false_fields)


def test_select_exclude_keeps_none_of_the_planted_rows(plant, tmp_path) -> None:
    planted, pool, evalset = plant
    dc = tmp_path / "dc"
    decontam.run(decontam.DecontamConfig(pool, (str(evalset),), dc, THRESHOLD, device="cpu"))
    excluded = set(hits(dc))
    base = ("select", pool, "--method", "random", "--ratio", 1, "-b", 1)
    code, output = run_cli(*base, "--out", tmp_path / "s", "--exclude", dc)
    assert code == 0, output
    kept = manifest_keys(tmp_path / "s")
    assert not kept & set(planted.planted) and not kept & excluded
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["excluded"] == len(excluded) and counts["kept"] == 700 - len(excluded)
    (recorded,) = summary["parameters"]["exclude"]
    assert recorded["path"] == str(dc.resolve()) and len(recorded["summary_sha256"]) == 64
    assert "excluded (--exclude)" in output
    # As two array tasks (round 1 scatters, round 2 selects, the last merges) the same rows go.
    for task in (0, 1, 0, 1):
        code, output = run_cli(
            *base, "--out", tmp_path / "tasks", "--exclude", dc, "--task-index", task,
            "--num-tasks", 2,
        )  # fmt: skip
        assert code == 0, output
    merged = json.loads((tmp_path / "tasks" / "summary.json").read_text())["counts"]
    assert merged["excluded"] == len(excluded) and merged["kept"] == counts["kept"]
    assert not manifest_keys(tmp_path / "tasks") & excluded
    # Without it the planted rows are selected: the exclusion does the work.
    code, output = run_cli(*base, "--out", tmp_path / "plain")
    assert code == 0 and manifest_keys(tmp_path / "plain") >= set(planted.planted), output
    # The same exclusion reuses the selection; another one is another selection.
    code, output = run_cli(*base, "--out", tmp_path / "s", "--exclude", dc)
    assert code == 0 and "already selected" in output, output
    decontam.run(decontam.DecontamConfig(pool, (str(evalset),), tmp_path / "dc2", 0.9995))
    code, output = run_cli(*base, "--out", tmp_path / "s", "--exclude", tmp_path / "dc2")
    assert code == 2 and "parameters.exclude" in output and output.count("\n") == 1, output

    # With --dedup as well: both filters apply, the counts add up, and two exclusions join.
    code, output = run_cli("dedup", pool, "--out", tmp_path / "d", "--eps", "2e-5")
    assert code == 0, output
    dropped = {
        (r["shard"], r["key"])
        for r in pq.read_table(tmp_path / "d" / "dedup.parquet").to_pylist()
        if not r["kept"]
    }
    assert dropped
    code, output = run_cli(
        *base, "--out", tmp_path / "both", "--dedup", tmp_path / "d", "--exclude", dc,
        "--exclude", tmp_path / "dc2",
    )  # fmt: skip
    assert code == 0, output
    kept = manifest_keys(tmp_path / "both")
    assert not kept & (dropped | excluded | set(hits(tmp_path / "dc2")))
    counts = json.loads((tmp_path / "both" / "summary.json").read_text())["counts"]
    assert counts["duplicates"] == len(dropped)
    assert counts["excluded"] == len(excluded - dropped)
    assert counts["eligible"] == counts["kept"] == 700 - len(dropped | excluded)


def test_selections_made_before_exclude_are_reused(plant, tmp_path) -> None:
    _, pool, _ = plant
    base = ("select", pool, "--method", "random", "--ratio", 0.5, "-b", 10, "--out", tmp_path)
    code, output = run_cli(*base)
    assert code == 0, output
    path = tmp_path / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["parameters"]["exclude"] is None
    del summary["parameters"]["exclude"]  # as a selection written before the option
    summary["counts"].pop("excluded")
    path.write_text(json.dumps(summary))
    code, output = run_cli(*base)
    assert code == 0 and "already selected" in output, output


def test_bad_inputs_are_one_line_errors(plant, tmp_path) -> None:
    _, pool, evalset = plant
    other_model = tmp_path / "other-model"
    shutil.copytree(evalset, other_model)
    meta = json.loads((other_model / "meta.json").read_text())
    (other_model / "meta.json").write_text(json.dumps({**meta, "model": "jc-tiny-sigmoid"}))
    (tmp_path / "empty").mkdir()
    dc = tmp_path / "dc"
    decontam.run(decontam.DecontamConfig(pool, (str(evalset),), dc, THRESHOLD, device="cpu"))
    cases = [
        (("decontaminate", pool, "--against", other_model), "was scored with another model"),
        (("decontaminate", tmp_path / "none", "--against", evalset), "is not a score set"),
        (("decontaminate", pool, "--against", tmp_path / "empty"), "is neither a score set"),
        (("decontaminate", pool, "--against", evalset, "--threshold", 0), "--threshold is a"),
        (("decontaminate", pool, "--against", evalset, "--threshold", 1.5), "--threshold is a"),
        (("decontaminate", pool, "--against", evalset, "--out", pool), "is a score set"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = (*args, "--out", tmp_path / "bad")
        code, output = run_cli(*args)
        assert code == 2 and message in output and output.count("\n") == 1, (args, output)
    assert "jc-tiny-sigmoid" in run_cli(*cases[0][0], "--out", tmp_path / "bad")[1]

    # An exclusion made from another score set, or no exclusion at all, is refused by select.
    other = tmp_path / "other-pool"
    shutil.copytree(pool, other)
    part = sorted((other / "parts").glob("*.parquet"))[0]
    part.unlink()
    (other / "done" / f"{part.stem}.json").unlink()
    select = ("select", "--method", "random", "-b", 10)
    code, output = run_cli(*select, other, "--out", tmp_path / "s", "--exclude", dc)
    assert code == 2 and "was made from another score set" in output, output
    assert output.count("\n") == 1
    code, output = run_cli(*select, pool, "--out", tmp_path / "s", "--exclude", evalset)
    assert code == 2 and "not a finished decontamination output" in output, output
    code, output = run_cli(*select, pool, "--out", dc)
    assert code == 2 and "is a decontamination output, not a selection" in output, output
