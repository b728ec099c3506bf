"""select's ledger: every row of the score set once, with its fate and why, agreeing with the
manifest and summary.json, byte-identical on a rerun; `info --why` answers for one sample."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli

from jestcurate.errors import JCError
from jestcurate.io.eligible import identities
from jestcurate.io.schema import LEDGER_FATES, ledger_schema
from jestcurate.io.store import fingerprint, open_score_set, write_json_atomic
from jestcurate.math.partition import task_of
from jestcurate.math.sampling import SamplerOptions
from jestcurate.pipelines import dedup
from jestcurate.pipelines import select as select_mod
from jestcurate.pipelines.decontam import OUTPUT as DECONTAM_OUTPUT
from jestcurate.pipelines.decontam import SCHEMA as DECONTAM_SCHEMA
from jestcurate.pipelines.select.filters import FilterOptions
from jestcurate.pipelines.select.ledger import category
from jestcurate.pipelines.synth import plant_duplicates, write_score_set

SHARDS, ROWS, B = 4, 150, 10  # ratio 0.2: super-batches of 50


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """600 rows, 5 % errors, planted exact and near copies deduplicated, and a hand-written
    decontamination naming 12 rows (some of them duplicates too: dedup takes them first)."""
    root = tmp_path_factory.mktemp("ledger")
    write_score_set(root / "ref", shards=SHARDS, rows_per_shard=ROWS, dim=16, seed=1,
                    error_fraction=0.05)  # fmt: skip
    plant_duplicates(root / "ref", exact=0.05, near=0.05, similarity=0.98, seed=3)
    dedup.run(dedup.DedupConfig(root / "ref", root / "dedup", device="cpu"))
    table = pq.read_table(root / "ref" / "parts", columns=["shard", "key", "index", "status"])
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    named = ok[5::47][:12]
    rows = {
        "shard": [r["shard"] for r in named],
        "part": [Path(r["shard"]).stem for r in named],
        "key": [r["key"] for r in named],
        "index": [r["index"] for r in named],
        "match": ["image" if i % 2 else "pair" for i in range(len(named))],
        "cosine": [0.99 + i / 1000 for i in range(len(named))],
        "image_cosine": [0.99] * len(named),
        "eval_set": ["evalset"] * len(named),
        "eval_shard": ["/evals/0.tar"] * len(named),
        "eval_key": [f"e{i}" for i in range(len(named))],
    }
    (root / "decontam").mkdir()
    pq.write_table(pa.table(rows, schema=DECONTAM_SCHEMA), root / "decontam" / DECONTAM_OUTPUT)
    scores = fingerprint(open_score_set(root / "ref"))
    write_json_atomic(root / "decontam" / "summary.json",
                      {"scores": scores, "params": {"threshold": 0.98}})  # fmt: skip
    return {"ref": root / "ref", "dedup": root / "dedup", "decontam": root / "decontam"}


def select(pool: dict[str, Path], out: Path, **kw) -> dict:
    sampling = SamplerOptions(B, ratio=0.2, chunks=2)
    kw.setdefault("ledger", True)
    cfg = select_mod.SelectConfig(reference=pool["ref"], out=out, sampling=sampling,
                                  device="cpu", **kw)  # fmt: skip
    return select_mod.run(cfg).summary


FILTERS = {"min_clip_score": 0.0, "max_steps": None}


def ledger_rows(out: Path) -> list[dict]:
    files = sorted((out / "ledger").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def check(pool: dict[str, Path], out: Path, summary: dict) -> list[dict]:
    """The ledger against the score set, the manifest and the summary."""
    parts = sorted(p.stem for p in (pool["ref"] / "parts").glob("*.parquet"))
    assert sorted(p.stem for p in (out / "ledger").glob("*.parquet")) == parts
    for part in (out / "ledger").glob("*.parquet"):
        assert pq.read_schema(part).equals(ledger_schema(), check_metadata=True)
    rows = ledger_rows(out)
    source = pq.read_table(pool["ref"] / "parts", columns=["shard", "index"]).to_pylist()
    assert sorted((r["shard"], r["index"]) for r in rows) == sorted(
        (r["shard"], r["index"]) for r in source
    )  # every row, once
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    kept = {(r["shard"], r["key"]): (r["step"], r["position"]) for r in rows
            if r["fate"] == "kept"}  # fmt: skip
    assert kept == {(m["shard"], m["key"]): (m["step"], m["position"]) for m in manifest}
    fates = Counter(r["fate"] for r in rows)
    counts = summary["counts"]
    assert fates["error"] == counts["errors"] and fates["kept"] == counts["kept"]
    others = sum(counts.get(name, 0) for name in ("caption_length", "target", "language"))
    assert fates["filtered"] == counts["below_min_clip_score"] + others
    assert fates["duplicate"] == counts["duplicates"]
    assert fates["excluded"] == counts["excluded"]
    assert fates["tail"] == counts["tail_dropped"] and sum(fates.values()) == counts["rows"]
    assert fates["kept"] + fates["not_chosen"] + fates["tail"] == counts["eligible"]
    by_reason = Counter((r["fate"], category(r["fate"], r["reason"])) for r in rows)
    assert summary["fates"] == {
        f: dict(sorted((r, n) for (g, r), n in by_reason.items() if g == f))
        for f in LEDGER_FATES
        if fates[f]
    }
    for r in rows:  # step and position exactly when kept
        assert (r["step"] is not None) == (r["position"] is not None) == (r["fate"] == "kept")
        assert r["reason"]
    return rows


def test_jest_with_every_filter(pool: dict[str, Path], tmp_path: Path) -> None:
    summary = select(pool, tmp_path / "s", dedup=pool["dedup"], exclude=(pool["decontam"],),
                     **FILTERS)  # fmt: skip
    rows = check(pool, tmp_path / "s", summary)
    fates = Counter(r["fate"] for r in rows)
    assert all(fates[f] for f in LEDGER_FATES), fates
    for r in rows:
        if r["fate"] == "kept":  # jest's step s is chosen from super-batch s
            assert r["super_batch"] == r["step"]
        if r["fate"] == "filtered":
            assert r["reason"] == "min_clip_score" and r["value"] < r["threshold"] == 0.0
        if r["fate"] == "tail":
            assert r["reason"] == "no_full_super_batch"
            assert r["super_batch"] == summary["counts"]["steps"]
        if r["fate"] == "not_chosen":
            assert r["reason"] == "super_batch" and r["super_batch"] < summary["counts"]["steps"]
    verdicts = pq.read_table(pool["dedup"] / "dedup.parquet").to_pylist()
    dedup_rows = {(v["shard"], v["index"]): v for v in verdicts}
    for r in (r for r in rows if r["fate"] == "duplicate"):
        v = dedup_rows[(r["shard"], r["index"])]
        assert not v["kept"] and r["reason"] == v["reason"] and r["value"] == v["similarity"]
        assert (r["other_shard"], r["other_key"]) == (v["duplicate_of_shard"], v["duplicate_of"])
        assert r["threshold"] == (pytest.approx(0.95) if v["reason"] == "semantic" else None)
    excluded = [r for r in rows if r["fate"] == "excluded"]
    assert excluded and all(r["other_set"] == "evalset" and r["threshold"] == pytest.approx(0.98)
                            and r["reason"] in ("image", "pair") for r in excluded)  # fmt: skip

    # Same inputs, another folder: the same bytes.
    select(pool, tmp_path / "again", dedup=pool["dedup"], exclude=(pool["decontam"],),
           **FILTERS)  # fmt: skip
    for part in sorted((tmp_path / "s" / "ledger").glob("*.parquet")):
        assert part.read_bytes() == (tmp_path / "again" / "ledger" / part.name).read_bytes()


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("clip-score", {"dedup": "dedup", "balance_clusters": True}),
        ("random", {}),
        ("easy-ref", {"max_steps": 3}),
    ],
)
def test_other_methods(pool: dict[str, Path], tmp_path: Path, method: str, extra: dict) -> None:
    extra = {k: pool[v] if k == "dedup" else v for k, v in extra.items()}
    summary = select(pool, tmp_path / method, method=method, **extra)
    rows = check(pool, tmp_path / method, summary)
    lost = Counter(r["reason"] for r in rows if r["fate"] in ("not_chosen", "tail"))
    if method == "clip-score":
        kept = [r for r in rows if r["fate"] == "kept"]
        cut = min(r["clip_score"] for r in pq.read_table(tmp_path / method / "manifest.parquet")
                  .to_pylist())  # fmt: skip
        below = [r for r in rows if r["reason"] == "below_cut"]
        assert below and all(r["threshold"] == cut and r["value"] <= cut for r in below)
        assert set(lost) <= {"below_cut", "cluster_cap"} and kept
    elif method == "random":
        assert set(lost) == {"not_drawn"}
    else:
        eligible = summary["counts"]["eligible"]
        assert lost["max_steps"] == (eligible // 50 - 3) * 50 > 0
        assert lost["no_full_super_batch"] == eligible % 50 > 0
        assert all(r["super_batch"] < 3 for r in rows if r["fate"] == "kept")


def test_no_ledger_and_selections_from_before(pool: dict[str, Path], tmp_path: Path) -> None:
    """The ledger is opt-in and no part of a selection's identity: a selection made without
    one (or before ledgers) is reused without --ledger, and --ledger asks for --overwrite."""
    out = tmp_path / "s"
    summary = select(pool, out, method="random", ledger=False)
    assert not (out / "ledger").exists() and "fates" not in summary and "ledger" not in summary
    assert select(pool, out, method="random", ledger=False) == summary  # reused
    with pytest.raises(JCError, match="without a ledger; pass --overwrite"):
        select(pool, out, method="random")
    code, output = run_cli("info", out, "--why", "000000001")
    assert code == 2 and "has no ledger" in output and len(output.strip().splitlines()) == 1
    manifest = (out / "manifest.parquet").read_bytes()
    again = select(pool, out, method="random", overwrite=True)
    assert (out / "manifest.parquet").read_bytes() == manifest and again["fates"]


@pytest.mark.slow
def test_info_why(pool: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    code, _ = run_cli("select", pool["ref"], "--out", out, "--batch-size", B, "--chunks", 2,
                      "--ledger",
                      "--device", "cpu", "--min-clip-score", 0, "--dedup", pool["dedup"],
                      "--exclude", pool["decontam"])  # fmt: skip
    assert code == 0
    rows = ledger_rows(out)
    first = {}
    for r in rows:
        first.setdefault(r["fate"], r)
    expected = {
        "kept": f"kept: step {first['kept']['step']}, position {first['kept']['position']}",
        "filtered": "filtered by --min-clip-score: clip_score",
        "duplicate": f"duplicate ({first['duplicate']['reason']}) of "
        f"{first['duplicate']['other_key']}",
        "excluded": "excluded (",
        "error": "error: ",
        "not_chosen": "not chosen: lost in super-batch",
        "tail": "tail: never drawn",
    }
    keys = Counter(r["key"] for r in rows)
    for fate, words in expected.items():
        key = first[fate]["key"]
        code, output = run_cli("info", out, "--why", key)
        assert code == 0, output
        lines = output.strip().splitlines()
        assert len(lines) == keys[key] and words in output, (fate, output)
    code, output = run_cli("info", out, "--why", "no-such-key")
    assert code == 2 and len(output.strip().splitlines()) == 1 and "no sample" in output
    code, output = run_cli("info", out)
    assert code == 0 and "min_clip_score" in output and "super_batch" in output
    html = tmp_path / "r.html"
    code, output = run_cli("report", pool["ref"], "--selection", out, "--out", html,
                           "--thumbnails", 1)  # fmt: skip
    assert code == 0 and "Fates by reason" in html.read_text()
    assert json.loads((out / "summary.json").read_text())["ledger"]["parts"] == SHARDS
    assert np.isfinite(json.loads((out / "summary.json").read_text())["ledger"]["bytes_per_row"])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """600 rows (5 % errors) whose row i has a caption of i mod 6 words."""
    ref = tmp_path_factory.mktemp("captioned") / "ref"
    write_score_set(ref, shards=2, rows_per_shard=300, dim=16, seed=2, error_fraction=0.05)
    for part in sorted((ref / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        words = [" ".join(["word"] * (i % 6)) for i in table.column("index").to_pylist()]
        at = table.schema.get_field_index("caption")
        rewrite_part(part, table.set_column(at, "caption", pa.array(words, pa.string())))
    return {"ref": ref}


# Caption length, then NormSim against the pool itself (the same model): both remove rows.
NEW_FILTERS = {"method": "random"}


def new_filters(captioned: dict[str, Path]) -> FilterOptions:
    return FilterOptions(min_caption_words=2, target=captioned["ref"], target_filter="normsim2",
                         target_keep=0.7)  # fmt: skip


def test_caption_length_and_target_rows(captioned: dict[str, Path], tmp_path: Path) -> None:
    """The new filters' rows: fate filtered, reason the filter's name, what it compared and the
    bound it broke as data (noted when the filter ran); `info --why` says so."""
    out = tmp_path / "s"
    summary = select(captioned, out, filters=new_filters(captioned), **NEW_FILTERS)
    rows = check(captioned, out, summary)
    caption = [r for r in rows if r["reason"] == "caption_length"]
    target = [r for r in rows if r["reason"] == "target"]
    assert len(caption) == summary["counts"]["caption_length"] > 0
    assert len(target) == summary["counts"]["target"] > 0
    for r in caption:  # min 2 words: captions of 0 and 1 word
        assert r["fate"] == "filtered" and r["detail"] == "min_words"
        assert r["value"] == r["index"] % 6 < r["threshold"] == 2
    bound = target[0]["threshold"]
    assert all(r["fate"] == "filtered" and r["detail"] == "normsim2"
               and r["value"] < r["threshold"] == bound for r in target)  # fmt: skip
    assert summary["fates"]["filtered"]["caption_length"] == len(caption)
    assert summary["fates"]["filtered"]["target"] == len(target)
    for r, words in (
        (caption[0], "filtered by caption length: "),
        (target[0], "filtered by --target (normsim2): score "),
    ):
        code, output = run_cli("info", out, "--why", r["key"])
        assert code == 0 and words in output, output
    # As array tasks (the scatters note what the filters said): the same fates and values.
    tasks = _tasks(captioned, tmp_path / "t", 2, filters=new_filters(captioned), **NEW_FILTERS)
    assert tasks["fates"]["filtered"] == summary["fates"]["filtered"]
    single = {(r["shard"], r["index"]): r for r in rows if r["fate"] == "filtered"}
    merged = {(r["shard"], r["index"]): r for r in ledger_rows(tmp_path / "t")
              if r["fate"] == "filtered"}  # fmt: skip
    assert merged == single


def _tasks(pool: dict[str, Path], out: Path, count: int, **kw) -> dict:
    """Every array task twice (round 1 scatters, round 2 selects); the last one merges."""
    for i in [*range(count), *range(count - 1)]:
        summary = select(pool, out, task_index=i, num_tasks=count, **kw)
    return summary


@pytest.mark.parametrize("method", ["jest", "clip-score"])
def test_array_tasks_merge_a_ledger(pool: dict[str, Path], tmp_path: Path, method: str) -> None:
    out = tmp_path / "s"
    kw = {"method": method, "dedup": pool["dedup"], "exclude": (pool["decontam"],), **FILTERS}
    summary = _tasks(pool, out, 3, **kw)
    assert summary["partition"]["num_tasks"] == 3
    rows = check(pool, out, summary)
    for part in sorted((pool["ref"] / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        dest = task_of(identities(part.stem, table), 3)
        ledger = pq.read_table(out / "ledger" / part.name).to_pylist()
        for r, t in zip(ledger, dest.tolist(), strict=True):
            eligible = r["fate"] in ("kept", "not_chosen", "tail")
            assert r["task"] == (t if eligible else None)
    if method == "jest":  # step s of a task is chosen from its super-batch s
        local = {}
        for r in sorted((r for r in rows if r["fate"] == "kept"), key=lambda r: r["step"]):
            local.setdefault(r["task"], {}).setdefault(r["step"], r["super_batch"])
        for steps in local.values():
            assert list(steps.values()) == list(range(len(steps)))
    # The merge again: the same bytes.
    before = {p.name: p.read_bytes() for p in (out / "ledger").glob("*.parquet")}
    (out / "summary.json").unlink()
    select(pool, out, merge=True, num_tasks=3, **kw)
    assert {p.name: p.read_bytes() for p in (out / "ledger").glob("*.parquet")} == before


def test_a_merge_with_ledger_needs_tasks_with_it(pool: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    _tasks(pool, out, 2, method="random", ledger=False)
    (out / "summary.json").unlink()
    with pytest.raises(JCError, match="selected without --ledger"):
        select(pool, out, method="random", merge=True, num_tasks=2)
