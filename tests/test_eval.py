"""`jestcurate eval` end to end on the tiny model: the uniform pool and two selections, two
seeds, a zero-shot and a retrieval set; results.json, results.md, the plot and the report
section agree; a rerun trains nothing; the same seeds give the same numbers; bad input is one
line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import (
    PRESETS,
    CorpusSpec,
    write_corpus,
    write_retrieval_set,
    write_zeroshot_set,
)

pytestmark = pytest.mark.slow

RECIPE = ["--steps", 4, "--eval-every", 2, "-b", 16, "--seeds", 2, "--workers", 0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A noisy pool scored by the (random) tiny model, two selections of b 16 from it, and a
    zero-shot and a retrieval set."""
    root = tmp_path_factory.mktemp("eval")
    write_corpus(root / "pool", CorpusSpec(4, 48, 21, 64, PRESETS["noisy"]))
    code, output = run_cli("score", root / "pool", "--out", root / "scores", "-m", "jc-tiny",
                           "--workers", 0)  # fmt: skip
    assert code == 0, output
    for name, method in (("jest", "jest"), ("clip-score", "clip-score")):
        code, output = run_cli("select", root / "scores", "--out", root / name, "--method",
                               method, "-b", 16, "--ratio", 0.5)  # fmt: skip
        assert code == 0, output
    write_zeroshot_set(root / "zeroshot", samples=32, seed=5)
    write_retrieval_set(root / "retrieval", samples=16, seed=6)
    return {name: root / name for name in
            ("pool", "scores", "jest", "clip-score", "zeroshot", "retrieval")}  # fmt: skip


def eval_args(world: dict[str, Path], out: Path, *more: object) -> list[object]:
    return ["eval", world["pool"], "--out", out, "-s", world["jest"], "-s", world["clip-score"],
            "--eval", world["zeroshot"], "--eval", world["retrieval"], *RECIPE, *more]  # fmt: skip


def test_eval_end_to_end_rerun_and_report(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    # As two array tasks: task 1's units first; the results follow the last unit.
    code, output = run_cli(*eval_args(world, out, "--task-index", 1, "--num-tasks", 2))
    assert code == 0 and "units of other tasks are unfinished" in output, output
    assert not (out / "results.json").exists()
    code, output = run_cli(*eval_args(world, out, "--task-index", 0, "--num-tasks", 2))
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    arms = {row["arm"]: row for row in results["summary"]["arms"]}
    assert list(arms) == ["uniform", "jest", "clip-score"]
    assert results["summary"]["compared_on"] == {"eval_set": "zeroshot", "metric": "acc1"}
    # no arm's data was decontaminated against the sets: said loudly, and recorded
    both = ["zeroshot", "retrieval"]
    assert results["not_decontaminated"] == {"uniform": both, "jest": both, "clip-score": both}
    assert "uniform: not decontaminated against zeroshot, retrieval" in output
    for arm, row in arms.items():
        assert row["seeds"] == [0, 1]
        assert set(row["final"]) == {"zeroshot", "retrieval"}
        assert 0 <= row["final"]["zeroshot"]["acc1"]["mean"] <= 1
        assert 0 <= row["final"]["retrieval"]["image_retrieval_recall@10"]["mean"] <= 1
        curves = results["units"][arm]
        assert [p["step"] for p in curves[0]] == [0, 2, 4]  # step 0, every 2, the end
    # results.md and the printed table carry the same final numbers as results.json
    text = (out / "results.md").read_text()
    for arm, row in arms.items():
        mean = row["final"]["zeroshot"]["acc1"]["mean"]
        assert re.search(rf"\| {re.escape(arm)} \| {mean:.3f} ±", text), text
        assert f"| {arm} | {mean:.3f} ±" in output
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    units = sorted(p.name for p in (out / "units" / "jest").iterdir())
    assert units == ["seed-0.json", "seed-1.json"]

    # A rerun trains nothing and writes the same results, from another folder too.
    before = (out / "results.json").read_bytes()
    code, output = run_cli(*eval_args(world, out))
    assert code == 0 and re.search(r"trained now\s+0", output), output
    again = eval_args(world, out)
    again[1] = world["pool"].parent / "." / "pool"
    code, output = run_cli(*again)
    assert code == 0 and re.search(r"trained now\s+0", output), output
    # Another recipe into the same folder is refused, not mixed in.
    code, output = run_cli(*eval_args(world, out), "--lr", "5e-4")
    assert code == 2 and "recipe.lr: 0.001 there, 0.0005 now" in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert (out / "results.json").read_bytes() == before
    # A unit trained again with the same seed gives the same numbers.
    (out / "units" / "jest" / "seed-1.json").unlink()
    code, output = run_cli(*eval_args(world, out))
    assert code == 0 and re.search(r"trained now\s+1", output), output
    assert (out / "results.json").read_bytes() == before

    # The report shows the comparison.
    page = tmp_path / "report.html"
    code, output = run_cli("report", world["scores"], "--out", page, "--eval", out)
    assert code == 0, output
    html = page.read_text()
    assert "Training on the selections" in html and "data:image/png;base64," in html
    for arm, row in arms.items():
        mean = row["final"]["zeroshot"]["acc1"]["mean"]
        assert f"data-arm='{arm}'" in html and f"data-value='{mean:.6f}'" in html


def test_bad_input_is_one_line(world: dict[str, Path], tmp_path: Path) -> None:
    # an eval set in the wrong layout: zero-shot tars without classnames.txt
    broken = tmp_path / "broken"
    shutil.copytree(world["zeroshot"], broken)
    (broken / "classnames.txt").unlink()
    # a selection from another pool
    write_corpus(tmp_path / "other", CorpusSpec(2, 48, 99, 64, PRESETS["noisy"]))
    code, output = run_cli("score", tmp_path / "other", "--out", tmp_path / "other-scores",
                           "-m", "jc-tiny", "--workers", 0)  # fmt: skip
    assert code == 0, output
    code, output = run_cli("select", tmp_path / "other-scores", "--out", tmp_path / "foreign",
                           "-b", 16, "--ratio", 0.5)  # fmt: skip
    assert code == 0, output
    code, output = run_cli("decontaminate", tmp_path / "other-scores", "--against",
                           world["zeroshot"], "--out", tmp_path / "other-decon", "--threshold",
                           0.01)  # fmt: skip
    assert code == 0, output
    cases = [
        (["eval", world["pool"], "--out", tmp_path / "a", "--eval", broken, *RECIPE],
         "classnames.txt"),
        (["eval", world["pool"], "--out", tmp_path / "f", "--exclude", tmp_path / "other-decon",
          "--eval", world["zeroshot"], *RECIPE], "did not search the whole pool"),
        (["eval", world["pool"], "--out", tmp_path / "g", "--exclude", world["jest"],
          "--eval", world["zeroshot"], *RECIPE], "is not a decontamination output"),
        (["eval", world["pool"], "--out", tmp_path / "b", "-s", tmp_path / "foreign",
          "--eval", world["zeroshot"], *RECIPE], "selected from another pool"),
        (["eval", world["pool"], "--out", tmp_path / "c", "-s", world["jest"],
          "--eval", world["zeroshot"], *RECIPE[:4], "-b", 8], "give --batch-size 16"),
        (["eval", world["pool"], "--out", tmp_path / "d", *RECIPE], "at least one --eval"),
        (["eval", world["pool"], "--out", tmp_path / "e", "-s", world["scores"],
          "--eval", world["zeroshot"], *RECIPE], "is not a finished selection"),
    ]  # fmt: skip
    for args, message in cases:
        code, output = run_cli(*args)
        assert code == 2 and message in output, output
        assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "a" / "results.json").exists()


def test_a_selection_decontaminated_against_a_set_is_not_flagged(
    world: dict[str, Path], tmp_path: Path
) -> None:
    decon, clean = tmp_path / "decontam", tmp_path / "clean"
    code, output = run_cli("decontaminate", world["scores"], "--against", world["zeroshot"],
                           "--out", decon, "--threshold", 0.9999)  # fmt: skip
    assert code == 0, output
    code, output = run_cli("select", world["scores"], "--out", clean, "-b", 16, "--ratio", 0.5,
                           "--exclude", decon)  # fmt: skip
    assert code == 0, output
    out = tmp_path / "eval"
    code, output = run_cli("eval", world["pool"], "--out", out, "-s", clean, "--eval",
                           world["zeroshot"], "--eval", world["retrieval"], *RECIPE[:6],
                           "--seeds", 1, "--workers", 0)  # fmt: skip
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    both = ["zeroshot", "retrieval"]
    assert results["not_decontaminated"] == {"uniform": both, "clean": ["retrieval"]}


def test_a_chain_trains_its_selections_one_after_another(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
    from jestcurate.pipelines.evaluate import streams

    second = tmp_path / "jest-seed-1"
    code, output = run_cli("select", world["scores"], "--out", second, "--method", "jest",
                           "-b", 16, "--ratio", 0.5, "--seed", 1)  # fmt: skip
    assert code == 0, output
    model = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), warn_random=False)

    def tokens(paths: tuple[Path, ...], n: int) -> list[list[int]]:
        data = streams.selections(paths, model, model.preprocess, 0, 0)
        return [next(data)[1].tolist() for _ in range(n)]

    first, then = (json.loads((p / "summary.json").read_text())["counts"]["steps"]
                   for p in (world["jest"], second))  # fmt: skip
    assert first > 0 and then > 0
    chain = tokens((world["jest"], second), first + then + 1)
    alone = tokens((world["jest"],), first)
    assert chain[:first] == alone  # the first selection's batches in step order,
    assert chain[first : first + then] == tokens((second,), then)  # then the second's,
    assert chain[first + then] == alone[0]  # then the first's again
    assert tokens((second,), then) != alone[:then]  # another seed: other batches

    # Through the CLI: a named chain is one arm, its units under its name.
    out = tmp_path / "eval"
    code, output = run_cli("eval", world["pool"], "--out", out, "-s",
                           f"jest-chain={world['jest']},{second}", "-s", f"single={second}",
                           "--eval", world["zeroshot"], *RECIPE[:6], "--seeds", 1,
                           "--workers", 0)  # fmt: skip
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    arms = [row["arm"] for row in results["summary"]["arms"]]
    assert arms == ["uniform", "jest-chain", "single"]
    assert results["identity"]["selections"] == [[str(world["jest"]), str(second)], str(second)]
    unit = json.loads((out / "units" / "jest-chain" / "seed-0.json").read_text())
    assert unit["selection"] == [str(world["jest"]), str(second)]
    # The same selections under swapped names are not the units trained under the old ones.
    code, output = run_cli("eval", world["pool"], "--out", out, "-s",
                           f"single={world['jest']},{second}", "-s", f"jest-chain={second}",
                           "--eval", world["zeroshot"], *RECIPE[:6], "--seeds", 1,
                           "--workers", 0)  # fmt: skip
    assert code == 2 and "keep each arm's name" in output, output
    for bad, message in (("uniform=" + str(second), "not 'uniform'"),
                         ("a b=" + str(second), "an arm name starts"),
                         ("..=" + str(second), "an arm name starts"),
                         ("named=", "names no selection")):  # fmt: skip
        code, output = run_cli("eval", world["pool"], "--out", tmp_path / "bad", "-s", bad,
                               "--eval", world["zeroshot"], *RECIPE)  # fmt: skip
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1, output
    code, output = run_cli("eval", world["pool"], "--out", tmp_path / "bad", "-s",
                           f"x={second}", "-s", f"x={world['jest']}", "--eval", world["zeroshot"],
                           *RECIPE)  # fmt: skip
    assert code == 2 and "two arms are named 'x'" in output, output
    # a selection folder whose path holds '=' and ',' is one selection
    odd = tmp_path / "lr=0.1,b=16"
    shutil.copytree(second, odd)
    from jestcurate.pipelines.evaluate.config import parse_arm

    assert parse_arm(str(odd)).selections == (odd,)


def test_exclude_leaves_the_rows_out_of_the_uniform_arm(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import os

    import numpy as np

    from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
    from jestcurate.pipelines.train import batches

    # The stream skips exactly the rows named, by shard and sample index.
    model = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), warn_random=False)
    shard = sorted(world["pool"].glob("*.tar"))[0]
    skip = {os.path.realpath(shard): np.array([0, 5, 7])}

    def last_counts(skip: dict | None) -> dict[str, int]:
        stream = batches([str(shard)], model.preprocess, model.tokenizer, 8, 10, 0, skip)
        return list(stream)[-1][2][1]

    counts, plain = last_counts(skip), last_counts(None)
    assert counts["excluded"] == 3
    assert sum(counts.values()) == sum(plain.values())

    # Through the CLI: a pool shard copied into an eval set is found, its rows are left out of the
    # uniform arm, which counts as decontaminated against the set the exclusion searched.
    plant = tmp_path / "plant"
    plant.mkdir()
    shutil.copy(shard, plant / shard.name)
    decon = tmp_path / "decontam"
    code, output = run_cli("decontaminate", world["scores"], "--against", world["zeroshot"],
                           "--against", plant, "--out", decon, "--threshold", 0.9999)  # fmt: skip
    assert code == 0, output
    out = tmp_path / "eval"
    code, output = run_cli("eval", world["pool"], "--out", out, "--exclude", decon, "--eval",
                           world["zeroshot"], "--eval", world["retrieval"], *RECIPE[:6],
                           "--seeds", 1, "--workers", 0)  # fmt: skip
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["not_decontaminated"] == {"uniform": ["retrieval"]}
    assert [e["path"] for e in results["identity"]["exclude"]] == [str(decon)]
    per_shard = 48  # the world's pool: 4 shards of 48
    assert per_shard <= results["excluded_rows"] < 4 * per_shard - 16, results["excluded_rows"]
    # without --exclude the identity has no such field: evals made before it are reused
    code, output = run_cli("eval", world["pool"], "--out", tmp_path / "plain", "--eval",
                           world["zeroshot"], *RECIPE[:6], "--seeds", 1,
                           "--workers", 0)  # fmt: skip
    assert code == 0, output
    plain_results = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert "exclude" not in plain_results["identity"]
