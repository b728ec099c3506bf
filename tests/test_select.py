"""`jestcurate select` against the selection contract, on synthetic score sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli

from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines.synth import write_score_set

SHARDS, ROWS = 6, 100
SAMPLER_FIELDS = set(SamplerOptions.__dataclass_fields__)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | set[str]]:
    """A reference that tells clean pairs from noisy ones well, a learner that does it badly
    (it has not learnt them yet), over the same 600 rows, 5% of them errors."""
    root = tmp_path_factory.mktemp("sets")
    common = {"shards": SHARDS, "rows_per_shard": ROWS, "dim": 32, "error_fraction": 0.05}
    noisy = write_score_set(root / "ref", seed=1, noise=0.3, **common)
    write_score_set(root / "learner", seed=2, role="learner", noise=1.5, **common)
    write_score_set(root / "sig", seed=3, loss="sigmoid", logit_scale=10.0, **common)
    return {"ref": root / "ref", "learner": root / "learner", "sig": root / "sig", "noisy": noisy}


def select(sets, out: Path, **kw) -> select_mod.SelectReport:
    """select_mod.run with the CLI's option names (--score is the criterion)."""
    kw.setdefault("batch_size", 20)
    kw.setdefault("device", "cpu")
    kw["criterion"] = kw.pop("score", None)
    learner = kw.pop("learner", None)
    sampling = SamplerOptions(**{k: kw.pop(k) for k in list(kw) if k in SAMPLER_FIELDS})
    cfg = select_mod.SelectConfig(
        reference=kw.pop("reference", sets["ref"]), out=out, learner=learner, sampling=sampling,
        **kw,
    )  # fmt: skip
    return select_mod.run(cfg)


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def ok_rows(score_set: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for part in sorted((score_set / "parts").glob("*.parquet")):
        for r in pq.read_table(part, columns=["shard", "key", "status", "clip_score"]).to_pylist():
            rows[(r["shard"], r["key"])] = r
    return rows


@pytest.mark.parametrize("method", ["random", "clip-score", "easy-ref", "learnability", "jest"])
def test_method_contract(sets, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    report = select(sets, out, method=method, learner=sets["learner"], ratio=0.2)
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    rows = manifest(out)
    everything = ok_rows(sets["ref"])
    eligible = sum(r["status"] == "ok" for r in everything.values())
    assert counts["rows"] == SHARDS * ROWS and counts["eligible"] == eligible
    assert counts["errors"] == SHARDS * ROWS - eligible > 0
    assert counts["steps"] == eligible // 100  # B = round(20 / 0.2)
    assert counts["kept"] == len(rows) == counts["steps"] * 20
    assert counts["tail_dropped"] == (
        eligible % 100 if method in ("easy-ref", "learnability", "jest") else 0
    )
    # Full batches of exactly b, positions 0..b-1, steps 0..n-1, no sample twice.
    steps = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r["position"])
    assert sorted(steps) == list(range(counts["steps"]))
    assert all(sorted(p) == list(range(20)) for p in steps.values())
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(set(keys)) == len(keys)
    # Only rows with status ok, and the manifest's scores are the score set's.
    for r in rows:
        source = everything[(r["shard"], r["key"])]
        assert source["status"] == "ok"
        assert r["clip_score"] == pytest.approx(source["clip_score"])
        assert r["index"] == int(r["key"][5:]) and r["shard"].endswith(f"{r['key'][:5]}.tar")
    # DataComp subset file: every kept uid, sorted, as two 64-bit halves.
    uids = np.load(out / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8") and len(uids) == len(rows)
    want = sorted((int(r["uid"][:16], 16), int(r["uid"][16:], 16)) for r in rows)
    assert [tuple(int(x) for x in u) for u in uids] == want
    kept_means = summary["means"]["kept"]
    assert kept_means["clip_score"] == pytest.approx(
        np.mean([r["clip_score"] for r in rows]), abs=1e-5
    )
    assert not report.reused


def test_clip_score_keeps_the_global_top_fraction_in_shuffled_order(sets, tmp_path: Path) -> None:
    select(sets, tmp_path / "c", method="clip-score", ratio=0.2)
    rows = manifest(tmp_path / "c")
    ok = [r["clip_score"] for r in ok_rows(sets["ref"]).values() if r["status"] == "ok"]
    threshold = sorted(ok, reverse=True)[len(rows) - 1]
    assert min(r["clip_score"] for r in rows) == pytest.approx(threshold)
    scores = [r["clip_score"] for r in rows]
    assert scores != sorted(scores) and scores != sorted(scores, reverse=True)


def noisy_share(rows: list[dict], noisy: set[str]) -> float:
    return sum(r["key"] in noisy for r in rows) / len(rows)


def test_methods_that_should_prefer_clean_pairs_do(tmp_path: Path) -> None:
    """Half the pairs are noise. The reference knows the clean ones well; the learner has barely
    started (clean pairs are learnable, noise is not). Every method but random should keep few
    noisy pairs. JEST's conditional scores for the softmax loss start flat (the score of one
    example alone is 0) and sharpen with log |C|, so at this small b it trails independent top-k."""
    common = {"shards": 12, "rows_per_shard": 150, "dim": 64, "error_fraction": 0.05}
    noisy = write_score_set(tmp_path / "ref", seed=1, noise=0.3, **common)
    write_score_set(tmp_path / "learner", seed=2, role="learner", noise=3.0, **common)
    sets = {"ref": tmp_path / "ref"}
    share = {}
    runs = {
        "random": {"method": "random"},
        "clip-score": {"method": "clip-score"},
        "easy-ref": {"method": "easy-ref"},
        "learnability": {"method": "learnability"},
        "jest": {"method": "jest"},
        "jest-topk": {"method": "jest", "topk": True},
        "jest-easy-ref": {"method": "jest", "score": "easy-ref"},
    }
    for name, kw in runs.items():
        out = tmp_path / name
        select(sets, out, learner=tmp_path / "learner", ratio=0.3, batch_size=60, **kw)
        share[name] = noisy_share(manifest(out), noisy)
    assert 0.4 < share["random"] < 0.6, share
    for name in ("clip-score", "easy-ref", "learnability"):
        assert share[name] < 0.15, share
    for name in ("jest", "jest-topk", "jest-easy-ref"):
        assert share[name] < 0.3, share


def test_same_seed_same_bytes_other_seed_other_batches(sets, tmp_path: Path) -> None:
    for name in ("a", "b"):
        select(sets, tmp_path / name, method="jest", learner=sets["learner"], seed=3)
    for file in ("manifest.parquet", "summary.json", "uids.npy"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    select(sets, tmp_path / "c", method="jest", learner=sets["learner"], seed=4)
    assert manifest(tmp_path / "a") != manifest(tmp_path / "c")


def test_super_batch_methods_share_super_batches(sets, tmp_path: Path) -> None:
    """With ratio 1 a super-batch is a batch: every independent method keeps it whole, so
    easy-ref's and jest's batches hold the same samples, in their own order."""
    select(sets, tmp_path / "e", method="easy-ref", ratio=1.0)
    select(sets, tmp_path / "j", method="jest", ratio=1.0)
    jest_steps = {}
    for r in manifest(tmp_path / "j"):
        jest_steps.setdefault(r["step"], set()).add(r["key"])
    easy = {r["key"] for r in manifest(tmp_path / "e")}
    assert set().union(*jest_steps.values()) == easy


def test_sigmoid_sets_and_topk_temperature(sets, tmp_path: Path) -> None:
    select(sets, tmp_path / "t", reference=sets["sig"], method="jest", topk=True)
    select(sets, tmp_path / "t2", reference=sets["sig"], method="jest", topk=True, seed=9)
    # top-k is deterministic within a super-batch; only the permutation depends on the seed
    a, b = manifest(tmp_path / "t"), manifest(tmp_path / "t2")
    assert len(a) == len(b) and a != b
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["parameters"]["topk"] is True and summary["parameters"]["temperature"] is None
    assert noisy_share(a, sets["noisy"]) < 0.1


def test_samplers_are_recorded_and_refine_beats_top_k_on_every_batch(sets, tmp_path: Path) -> None:
    """The default sampler's batches score at least as high as independent learnability top-k
    from the same super-batches, by the batch score it optimises; the paper's Algorithm 1 stays
    available and is recorded as such."""
    import torch

    from jestcurate.io.eligible import fill_cache, scan
    from jestcurate.io.store import open_score_set
    from jestcurate.math.jest import batch_score, criterion_terms, independent_scores

    select(sets, tmp_path / "refine", method="jest", learner=sets["learner"])
    select(sets, tmp_path / "paper", method="jest", learner=sets["learner"], sampler="paper")
    params = {
        name: json.loads((tmp_path / name / "summary.json").read_text())["parameters"]
        for name in ("refine", "paper")
    }
    assert params["refine"]["sampler"] == "refine" and params["refine"]["sweeps"] == 1
    assert params["refine"]["temperature"] == 0.1
    assert params["paper"]["sampler"] == "paper" and params["paper"]["sweeps"] is None
    assert params["paper"]["temperature"] == 1.0
    assert manifest(tmp_path / "refine") != manifest(tmp_path / "paper")

    cfg = select_mod.SelectConfig(
        reference=sets["ref"], learner=sets["learner"], out=tmp_path / "x",
        sampling=SamplerOptions(20), device="cpu",
    )  # fmt: skip
    ref = open_score_set(sets["ref"], role="reference")
    learner = open_score_set(sets["learner"], role="learner")
    cache = fill_cache(ref, learner, scan(ref, learner, None), tmp_path / "c", None, True)
    steps = cache.size // cfg.sampling.super_batch
    chosen = [ids for ids, _ in select_mod.choose(cfg, cache, ref, learner, steps)]
    supers = select_mod.super_batches(cfg, cache, ref, learner, steps)
    for picked, (ids, r, m) in zip(chosen, supers, strict=True):
        where = {row: i for i, row in enumerate(ids.tolist())}

        def value(rows: list[int], r=r, m=m) -> float:
            terms = criterion_terms("learnability", r, m)
            for _, term in terms:
                term.add(torch.tensor(rows))
            return batch_score(terms)

        top = torch.topk(independent_scores("learnability", r, m), 20).indices.tolist()
        assert value([where[i] for i in picked.tolist()]) >= value(top) - 1e-6


def test_min_clip_score_and_max_steps(sets, tmp_path: Path) -> None:
    select(sets, tmp_path / "m", method="random", min_clip_score=0.5, max_steps=1)
    rows = manifest(tmp_path / "m")
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert min(r["clip_score"] for r in rows) >= 0.5
    assert summary["counts"]["below_min_clip_score"] > 0 and summary["counts"]["steps"] == 1
    assert len(rows) == 20


def test_rerun_reuses_and_refuses_a_different_selection(sets, tmp_path: Path) -> None:
    out = tmp_path / "r"
    select(sets, out, method="easy-ref")
    before = (out / "manifest.parquet").stat().st_mtime_ns
    again = select(sets, out, method="easy-ref")
    assert again.reused and (out / "manifest.parquet").stat().st_mtime_ns == before
    code, output = run_cli("select", sets["ref"], "--out", out, "--method", "random", "-b", 20)
    assert (
        code == 2
        and 'holds a different selection (method: "easy-ref" there, "random" now' in output
    ), output
    assert "--overwrite" in output and not (out / ".cache").exists()
    code, output = run_cli("select", sets["ref"], "--out", out, "--method", "easy-ref", "-b", 20,
                           "--ratio", 0.25)  # fmt: skip
    assert "parameters.ratio: 0.2 there, 0.25 now" in output, output

    # --overwrite replaces it on purpose: the result is what a fresh --out would hold.
    (out / "shards").mkdir()
    (out / "shards" / "00000.tar").write_bytes(b"an old export")
    (out / "notes.txt").write_text("not select's")
    code, output = run_cli("select", sets["ref"], "--out", out, "--method", "random", "-b", 20,
                           "--overwrite")  # fmt: skip
    assert code == 0, output
    fresh = select(sets, tmp_path / "fresh", method="random")
    assert (out / "manifest.parquet").read_bytes() == (fresh.out / "manifest.parquet").read_bytes()
    assert not (out / "shards").exists() and (out / "notes.txt").exists()
    code, output = run_cli("select", sets["ref"], "--out", out, "-b", 20, "--overwrite",
                           "--task-index", 0, "--num-tasks", 2)  # fmt: skip
    assert code == 2 and "array tasks would remove each other's work" in output, output


def test_bad_inputs_are_one_line_errors(sets, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_score_set(other, shards=SHARDS + 1, rows_per_shard=ROWS, dim=32, role="learner")
    fewer = tmp_path / "fewer"
    write_score_set(fewer, shards=SHARDS, rows_per_shard=ROWS - 1, dim=32, role="learner")
    wrong_dim = tmp_path / "wrong-dim"
    shutil.copytree(sets["ref"], wrong_dim)
    meta = json.loads((wrong_dim / "meta.json").read_text())
    (wrong_dim / "meta.json").write_text(json.dumps({**meta, "embed_dim": 64}))
    ref, learner = str(sets["ref"]), str(sets["learner"])
    cases = [
        ([str(tmp_path / "nothing")], "is not a score set (does not exist)"),
        ([learner], "was scored with role 'learner', but a reference"),
        ([ref, "--learner", ref], "role 'reference', but a learner"),
        ([ref, "--learner", str(other)], "cover different shards"),
        ([ref, "--learner", str(fewer)], "differ in part 00000"),
        ([str(wrong_dim), "--method", "jest"], "32-wide embeddings but"),
        ([ref, "--method", "learnability"], "--method learnability needs --learner"),
        ([ref, "--score", "learnability"], "--score learnability needs --learner"),
        ([ref, "--method", "best"], "unknown method 'best'"),
        ([ref, "--ratio", "1.5"], "--ratio is the kept fraction"),
        ([ref, "-b", "1000"], "fewer than one super-batch"),
        ([ref, "--method", "random", "--score", "easy-ref"], "--score chooses jest's criterion"),
        ([ref, "--device", "cuda"], "no CUDA device"),
        ([ref, "--sampler", "gibbs"], "unknown --sampler 'gibbs'"),
        ([ref, "--sweeps", "-1"], "--sweeps must be 0 or more"),
        ([ref, "--temperature", "0"], "--temperature must be positive"),
        ([ref, "--chunks", "100"], "--chunks 100 is more than the batch size 20"),
        ([ref, "--min-clip-score", "2"], "--min-clip-score is a cosine similarity"),
        ([ref, "--min-clip-score", "1"], "no row passes --min-clip-score 1.0: all 572 scored"),
        ([ref, "-b", "4096"], "pass --batch-size 114 or less (at --ratio 0.2)"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, output = run_cli(
            "select", *args, "--out", out, *([] if "-b" in args else ["-b", "20"])
        )
        assert code == 2, (args, output)
        assert message in output and output.startswith("error: "), (args, output)
        assert output.count("\n") == 1, output
        shutil.rmtree(out, ignore_errors=True)


def test_overwrite_replaces_only_a_selection_and_only_when_the_new_one_is_possible(
    sets, tmp_path: Path
) -> None:
    out = tmp_path / "sel"
    select(sets, out, method="random")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # refused (too few rows for b = 4096): the old selection is still whole
    code, output = run_cli("select", sets["ref"], "--out", out, "-b", 4096, "--overwrite")
    assert code == 2 and "fewer than one super-batch" in output, output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # what is not a selection is never removed, with or without --overwrite
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "00000.tar").write_bytes(b"my own tar")
    (mine / "summary.json").write_text('{"experiment": 7}')
    for folder, message in ((mine, "is not a selection's summary"), (sets["ref"], "score set")):
        code, output = run_cli("select", sets["ref"], "--out", folder, "-b", 20, "--overwrite")
        assert code == 2 and message in output, output
    assert (mine / "shards" / "00000.tar").read_bytes() == b"my own tar"
    assert (sets["ref"] / "meta.json").is_file()
    code, output = run_cli("slurm", "select", "--num-tasks", 2, "--", sets["ref"], "--out", out,
                           "--overwrite")  # fmt: skip
    assert code == 2 and "--overwrite is for one run" in output, output


def test_a_ratio_that_chooses_nothing_says_so(sets, tmp_path: Path) -> None:
    for ratio in ("1", "0.99"):  # B = round(20 / 0.99) = 20 = b too
        out = tmp_path / ratio
        code, output = run_cli("select", sets["ref"], "--out", out, "-b", 20, "--ratio", ratio)
        assert code == 0 and "keeps every candidate and chooses nothing" in output, output
    code, output = run_cli("select", sets["ref"], "--out", tmp_path / "r", "-b", 20)
    assert code == 0 and "chooses nothing" not in output, output


def test_failed_shards_are_named_not_silently_missing(sets, tmp_path: Path) -> None:
    copy = tmp_path / "ref"
    shutil.copytree(sets["ref"], copy)
    marker_path = copy / "done" / "00001.json"
    marker = json.loads(marker_path.read_text())
    marker.update(status="failed", error="truncated tar: unexpected end of data")
    marker_path.write_text(json.dumps(marker))
    code, output = run_cli("select", copy, "--out", tmp_path / "s", "-b", 20)
    assert code == 0, output
    assert "1 of 6 shards failed when scored" in output, output
    assert "00001: truncated tar: unexpected end of data" in output
    assert f"jestcurate status {copy}" in output
    code, output = run_cli("select", sets["ref"], "--out", tmp_path / "t", "-b", 20)
    assert code == 0 and "failed when scored" not in output, output


def test_cli_select_prints_a_summary(sets, tmp_path: Path) -> None:
    code, output = run_cli(
        "select", sets["ref"], "--learner", sets["learner"], "--out", tmp_path / "s", "-b", "20"
    )
    assert code == 0, output
    assert "batch score" in output and "learnability" in output and "kept" in output
    assert "may no longer be telling" not in output  # a learner behind the reference: no warning


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_a_learner_that_caught_up_with_the_reference_is_warned_about(
    tmp_path: Path, loss: str
) -> None:
    """A learner that tells clean pairs from noise better than the reference makes
    learnability prefer noise (clean pairs' learner loss falls below the reference's); select
    says so, for jest and for learnability top-k, and not for easy-ref, which reads no learner."""
    common = {"shards": 6, "rows_per_shard": 100, "dim": 32, "error_fraction": 0.05}
    sigmoid = {"loss": "sigmoid", "logit_scale": 10.0} if loss == "sigmoid" else {}
    noisy = write_score_set(tmp_path / "ref", seed=1, noise=0.3, **common, **sigmoid)
    write_score_set(tmp_path / "caught", seed=2, role="learner", noise=0.05, **common, **sigmoid)
    for method, advice in (("jest", "--score easy-ref"), ("learnability", "--method easy-ref")):
        out = tmp_path / method
        code, output = run_cli(
            "select", tmp_path / "ref", "--learner", tmp_path / "caught", "--method", method,
            "--out", out, "-b", "20", "--device", "cpu",
        )  # fmt: skip
        assert code == 0, output
        assert noisy_share(manifest(out), noisy) > 0.5  # what the warning is about
        assert "may no longer be telling learnable pairs from noise" in output, output
        assert advice in output
    code, output = run_cli(
        "select", tmp_path / "ref", "--method", "easy-ref", "--out", tmp_path / "easy", "-b", "20"
    )
    assert code == 0 and "may no longer be telling" not in output, output


def test_learner_caught_up_reads_the_summary_means() -> None:
    from jestcurate.pipelines.select.report import learner_caught_up

    def summary(method: str, score: str | None, kept: float, left: float) -> dict:
        means = {"kept": {"ref_loss": kept}, "dropped": {"ref_loss": left}}
        return {"method": method, "score": score, "means": means}

    assert learner_caught_up(summary("jest", "learnability", 8.5, 6.2)) is not None
    assert learner_caught_up(summary("learnability", None, 8.5, 6.2)) is not None
    assert learner_caught_up(summary("jest", "learnability", 2.2, 7.7)) is None
    assert learner_caught_up(summary("jest", "hard-learner", 8.5, 6.2)) is None  # by design
    assert learner_caught_up(summary("jest", "easy-ref", 8.5, 6.2)) is None
    assert learner_caught_up({"method": "jest", "score": "learnability", "means": {}}) is None
    assert learner_caught_up(summary("jest", "learnability", float("nan"), 6.2)) is None


def test_no_uids_file_unless_every_kept_row_has_a_hex_uid(sets, tmp_path: Path) -> None:
    import pyarrow as pa

    copy = tmp_path / "ref"
    shutil.copytree(sets["ref"], copy)
    part = copy / "parts" / "00002.parquet"
    table = pq.read_table(part)
    uids = table.column("uid").to_pylist()
    uids[:50] = [None] * 25 + ["not-a-hex-uid"] * 25
    table = table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids))
    rewrite_part(part, table)
    select(sets, tmp_path / "s", reference=copy, method="random", ratio=1.0)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["outputs"]["uids"] is None and not (tmp_path / "s" / "uids.npy").exists()
    rows = manifest(tmp_path / "s")
    assert {r["uid"] for r in rows} >= {None, "not-a-hex-uid"}
