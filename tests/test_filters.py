"""select's filters (pipelines/select/filters): each on hand-made rows whose answer is known,
their composition with each other and with --min-clip-score, and through the CLI with every
method on a synthetic score set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rewrite_part, run_cli

from jestcurate.errors import JCError
from jestcurate.io.eligible import Counts, Filters, MinClip, count_masks, eligible_masks
from jestcurate.io.schema import embedding_column, score_column
from jestcurate.io.store import open_score_set
from jestcurate.pipelines.select.filters import FilterOptions, build, check
from jestcurate.pipelines.select.filters.captions import CaptionLength, caption_lengths
from jestcurate.pipelines.select.filters.target import (
    NormSim,
    build_clusters,
    open_target,
    read_target,
    top_fraction_threshold,
)
from jestcurate.pipelines.synth import write_score_set

DIM, BLOBS, SHARDS, ROWS = 16, 5, 4, 100
CAPTIONS = {  # short alt-text-like captions, 6 per language
    "en": ["a red car parked on the street", "two dogs playing in the park",
           "a bowl of fresh fruit on a table", "the old bridge over the river at night",
           "a woman reading a book in the garden", "snow covered mountains under a blue sky"],
    "de": ["ein rotes Auto parkt auf der Straße", "zwei Hunde spielen im Park",
           "eine Schüssel mit frischem Obst auf dem Tisch",
           "die alte Brücke über den Fluss bei Nacht",
           "eine Frau liest ein Buch im Garten", "schneebedeckte Berge unter einem blauen Himmel"],
    "fr": ["une voiture rouge garée dans la rue", "deux chiens qui jouent dans le parc",
           "un bol de fruits frais sur une table", "le vieux pont sur la rivière la nuit",
           "une femme qui lit un livre dans le jardin",
           "des montagnes enneigées sous un ciel bleu"],
}  # fmt: skip
LANGS = tuple(CAPTIONS)


def centres() -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[:BLOBS]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(centre: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    return unit(centre + noise * rng.standard_normal((n, DIM)).astype(np.float32))


def row_facts(i: int) -> dict:
    """What row i of a part is: its blob, its caption's language and its caption."""
    lang = LANGS[(i // BLOBS) % len(LANGS)]
    return {"blob": i % BLOBS, "lang": lang, "caption": CAPTIONS[lang][i % 6]}


def plant(root: Path, seed: int = 1) -> Path:
    """A synthetic score set (5 % errors) whose ok rows' images sit in 5 blobs (row i of a
    part in blob i mod 5) and whose captions are known (row_facts)."""
    write_score_set(root, SHARDS, ROWS, dim=DIM, seed=seed, error_fraction=0.05)
    rng = np.random.default_rng(seed)
    for part in sorted((root / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        ok = np.asarray(table.column("status").to_pylist()) == "ok"
        facts = [row_facts(i) for i in range(table.num_rows)]
        img = np.stack([near(centres()[f["blob"]], 1, rng)[0] for f in facts])[ok]
        txt = unit(img + 0.1 * rng.standard_normal(img.shape).astype(np.float32))
        clip = (img.astype(np.float16).astype(np.float32) * txt.astype(np.float16)).sum(1)
        columns = {
            "img_emb": embedding_column(img, ok, DIM),
            "txt_emb": embedding_column(txt, ok, DIM),
            "clip_score": score_column(clip, ok),
            "caption": pa.array([f["caption"] for f in facts], pa.string()),
        }
        for name, column in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        rewrite_part(part, table)
    return root


def target_set(root: Path, seed: int = 1, blob: int = 0, n: int = 40) -> Path:
    """A target score set of the pool's model: n images near one blob's centre."""
    write_score_set(root, 1, n, dim=DIM, seed=seed)
    part = next((root / "parts").glob("*.parquet"))
    table = pq.read_table(part)
    img = near(centres()[blob], n, np.random.default_rng(99))
    ok = np.ones(n, dtype=bool)
    table = table.set_column(table.schema.get_field_index("img_emb"), "img_emb",
                             embedding_column(img, ok, DIM))  # fmt: skip
    rewrite_part(part, table)
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("filters")
    learner = root / "learner"
    write_score_set(learner, SHARDS, ROWS, dim=DIM, seed=2, role="learner", error_fraction=0.05)
    return {
        "learner": learner,
        "pool": plant(root / "pool"),
        "target": target_set(root / "target"),
        "other": target_set(root / "other", seed=7),  # another "model"
    }


def facts_of(pool: Path) -> dict[str, dict]:
    """Every ok row's facts by key."""
    found = {}
    for part in sorted((pool / "parts").glob("*.parquet")):
        for i, r in enumerate(pq.read_table(part, columns=["key", "status"]).to_pylist()):
            if r["status"] == "ok":
                found[r["key"]] = row_facts(i)
    return found


# --- each filter alone -----------------------------------------------------------------------


def test_caption_lengths_count_words_and_characters():
    table = pa.table({"caption": ["  a  b\tc ", "", None, "one", "naïve café"]})
    words, chars = caption_lengths(table)
    assert words.tolist() == [3, 0, 0, 1, 2]
    assert chars.tolist() == [6, 0, 0, 3, 10]
    verdict = CaptionLength(min_words=1, max_words=2)(table, "s", np.ones(5, dtype=bool))
    assert verdict.removed.tolist() == [True, True, True, False, False]
    assert CaptionLength(min_chars=4)(table, "s", np.ones(5, dtype=bool)).removed.tolist() == [
        False, True, True, True, False,
    ]  # fmt: skip


def test_normsim_scores_are_p_norms_of_cosines():
    rng = np.random.default_rng(0)
    target, x = unit(rng.standard_normal((7, DIM))), unit(rng.standard_normal((5, DIM)))
    cos = x @ target.T
    two = NormSim(target.astype(np.float32), 2.0).scores(x)
    most = NormSim(target.astype(np.float32), np.inf).scores(x.astype(np.float32))
    np.testing.assert_allclose(two, np.sqrt((cos**2).sum(1)), rtol=1e-6)
    np.testing.assert_allclose(most, cos.max(1), atol=1e-6)
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert top_fraction_threshold(scores, 0.4) == 0.7  # the best 2 of 5
    assert top_fraction_threshold(scores, 0.01) == 0.9  # at least one row


@pytest.mark.parametrize("kind", ["normsim2", "normsiminf", "clusters"])
def test_target_filters_keep_the_planted_blob(sets, kind):
    pool = open_score_set(sets["pool"])
    facts = facts_of(sets["pool"])
    blob0 = {k for k, f in facts.items() if f["blob"] == 0}
    opts = FilterOptions(target=sets["target"], target_filter=kind,
                         target_keep=len(blob0) / len(facts) if kind != "clusters" else None,
                         target_clusters=20 if kind == "clusters" else None)  # fmt: skip
    check(opts)
    (only,) = build(opts, pool, seed=0, device="cpu")
    filters = Filters(rows=(only,))
    kept = set()
    for name in pool.part_names():
        table = pool.read_part(name, ["key", "status", "clip_score", "img_emb", "shard"])
        ok, removed = eligible_masks(table, None, filters, name)
        eligible = count_masks(ok, removed)[-1]
        kept |= set(np.asarray(table.column("key").to_pylist())[eligible].tolist())
    assert kept == blob0


def test_clusters_picked_by_the_target(sets):
    pool = open_score_set(sets["pool"])
    images = read_target(sets["target"], pool)
    found = build_clusters(pool, images, 20, seed=0, gpu=False)
    assert 1 <= len(found.kept) < 20
    assert set(found.nearest(centres()[:1]).tolist()) <= set(found.kept.tolist())
    assert not set(found.nearest(centres()[1:]).tolist()) & set(found.kept.tolist())


def test_language_filter_keeps_the_asked_languages(sets):
    pytest.importorskip("lingua")
    from jestcurate.pipelines.select.filters.language import CaptionLanguage, detect, parse_codes

    texts = [t for lang in LANGS for t in CAPTIONS[lang]]
    assert detect(texts) == [lang for lang in LANGS for _ in CAPTIONS[lang]]
    assert detect(["", "12345"]) == [None, None]
    assert parse_codes(("DE", " en", "en")) == ("de", "en")
    with pytest.raises(JCError, match="unknown language code 'xx'"):
        parse_codes(("en", "xx"))
    table = pa.table({"caption": [*CAPTIONS["en"][:2], CAPTIONS["fr"][0], None]})
    verdict = CaptionLanguage(("en", "de"))(table, "s", np.array([True, False, True, True]))
    assert verdict.removed.tolist() == [False, True, True, True]  # skipped rows are not kept


def test_target_of_another_model_is_refused(sets):
    pool = open_score_set(sets["pool"])
    with pytest.raises(JCError, match="scored with another model") as caught:
        open_target(sets["other"], pool)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "opts, message",
    [
        (FilterOptions(min_caption_words=3, max_caption_words=2), "is above"),
        (FilterOptions(min_caption_chars=-1), "0 or more"),
        (FilterOptions(target_filter="normsim2"), "need --target"),
        (FilterOptions(target=Path("t")), "needs --target-filter"),
        (FilterOptions(target=Path("t"), target_filter="normsim2"), "one of --target-keep"),
        (FilterOptions(target=Path("t"), target_filter="clusters", target_keep=0.5), "are for"),
        (FilterOptions(target=Path("t"), target_filter="normsim2", target_keep=1.5), "fraction"),
    ],
)
def test_bad_filter_options(opts, message):
    with pytest.raises(JCError, match=message):
        check(opts)


# --- composition -----------------------------------------------------------------------------


def test_filters_compose_in_order_and_count_once(sets):
    pool = open_score_set(sets["pool"])
    opts = FilterOptions(min_caption_words=6, target=sets["target"], target_filter="normsim2",
                         target_threshold=3.0)  # fmt: skip
    rows = build(opts, pool, seed=0, device="cpu")
    filters = Filters(min_clip=0.0, rows=rows)
    assert filters.names == ("rows", "errors", "below_min_clip_score", "duplicates", "excluded",
                             "caption_length", "target", "eligible")  # fmt: skip
    counts, facts = Counts(), facts_of(sets["pool"])
    for name in pool.part_names():
        table = pool.read_part(name, ["key", "status", "clip_score", "img_emb", "caption"])
        masks = count_masks(*eligible_masks(table, None, filters, name))
        for field, mask in zip(filters.names, masks, strict=True):
            counts.add(field, int(mask.sum()))
        keys = np.asarray(table.column("key").to_pylist())
        for key in keys[masks[-1]]:
            assert facts[key]["blob"] == 0 and len(facts[key]["caption"].split()) >= 6
    ok = len(facts)
    long_ = sum(len(f["caption"].split()) >= 6 for f in facts.values())
    wanted = sum(len(f["caption"].split()) >= 6 and f["blob"] == 0 for f in facts.values())
    assert counts.filtered["caption_length"] == ok - long_
    assert counts.filtered["target"] == long_ - wanted
    assert counts.eligible == wanted > 0
    summary = counts.as_dict()
    assert list(summary)[-3:] == ["caption_length", "target", "eligible"]


# --- through the CLI --------------------------------------------------------------------------


def select_cli(sets, out: Path, *args: str) -> tuple[int, str]:
    return run_cli("select", sets["pool"], "--out", out, "--batch-size", "4", "--ratio", "0.5",
                   "--device", "cpu", *args)  # fmt: skip


def manifest_keys(out: Path) -> list[str]:
    return pq.read_table(out / "manifest.parquet", columns=["key"]).column("key").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "clip-score", "easy-ref", "learnability", "jest"])
def test_every_method_composes_with_filters(sets, tmp_path, method):
    extra = ("--learner", str(sets["learner"])) if method == "learnability" else ()
    args = ("--method", method, "--min-caption-words", "6", "--target", str(sets["target"]),
            "--target-filter", "normsiminf", "--target-keep", "0.15", *extra)  # fmt: skip
    code, output = select_cli(sets, tmp_path / "out", *args)
    assert code == 0, output
    facts = facts_of(sets["pool"])
    keys = manifest_keys(tmp_path / "out")
    assert keys and all(
        facts[k]["blob"] == 0 and len(facts[k]["caption"].split()) >= 6 for k in keys
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["caption_length"] > 0 and counts["target"] > 0
    assert summary["parameters"]["filters"]["target"]["filter"] == "normsiminf"
    assert "off target (--target)" in output
    code, again = select_cli(sets, tmp_path / "out", *args)  # the same selection: reused
    assert code == 0 and "reused" in again


@pytest.mark.slow
def test_language_and_clusters_through_the_cli(sets, tmp_path):
    pytest.importorskip("lingua")
    args = ("--method", "random", "--language", "en,de", "--target", str(sets["target"]),
            "--target-filter", "clusters", "--target-clusters", "20")  # fmt: skip
    code, output = select_cli(sets, tmp_path / "out", *args)
    assert code == 0, output
    facts = facts_of(sets["pool"])
    keys = manifest_keys(tmp_path / "out")
    assert keys and all(facts[k]["lang"] in ("en", "de") and facts[k]["blob"] == 0 for k in keys)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # language runs last (the costliest): it counts only what the target left, blob 0
    fr = sum(f["lang"] == "fr" and f["blob"] == 0 for f in facts.values())
    assert summary["counts"]["language"] == fr
    # without the filters it is another selection
    code, output = select_cli(sets, tmp_path / "out", "--method", "random")
    assert code == 2 and "different selection (parameters.filters" in output


@pytest.mark.slow
def test_select_without_filters_keeps_its_identity(sets, tmp_path):
    code, output = select_cli(sets, tmp_path / "out", "--method", "random")
    assert code == 0, output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "filters" not in summary["parameters"]
    assert not {"caption_length", "language", "target"} & set(summary["counts"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (("--target", "{other}", "--target-filter", "normsim2", "--target-keep", "0.5"),
         "scored with another model"),
        (("--language", "en,xx"), "unknown language code 'xx'"),
        (("--min-caption-chars", "500"), "no row passes the filters"),
        (("--target", "{target}", "--target-filter", "normsim2", "--target-threshold", "50"),
         "no row passes the filters"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(sets, tmp_path, args, message):
    if "--language" in args:
        pytest.importorskip("lingua")
    args = tuple(a.format(other=sets["other"], target=sets["target"]) for a in args)
    code, output = select_cli(sets, tmp_path / "out", *args)
    assert code == 2, output
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists()


def test_min_clip_score_keeps_nan_removes_null() -> None:
    """As select did before the filters were one interface (clip_score < t after nulls became
    -inf): a null clip_score is removed, a NaN one is not, so old selections keep their rows."""
    clip = pa.array([0.5, None, float("nan"), -0.1, 0.1], pa.float32())
    table = pa.table({"clip_score": clip})
    verdict = MinClip(0.1)(table, "s", np.ones(5, dtype=bool))
    assert verdict.removed.tolist() == [False, True, False, True, False]
    assert np.isnan(verdict.value[1]) and np.isnan(verdict.value[2])
