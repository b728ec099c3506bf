"""`jestcurate import` on files in DataComp's and clip-retrieval's layouts, written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pairs, run_cli, write_datacomp

from jestcurate.errors import JCError
from jestcurate.io.store import embedding_matrix, open_score_set
from jestcurate.loader import SelectionBatches
from jestcurate.math.scoring import clip_scores, example_losses
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec
from jestcurate.pipelines import importer
from jestcurate.pipelines.export import export

DIM = 64  # jc-tiny's embedding width (write_datacomp's l14 arrays)


def run_import(source: Path, out: Path, fmt: str = "datacomp", **kw) -> importer.ImportReport:
    kw.setdefault("model", "jc-tiny")
    return importer.run(importer.ImportConfig(source=source, out=out, format=fmt, **kw))


def test_datacomp_pool_becomes_a_score_set_as_score_would_write_it(tmp_path: Path) -> None:
    arrays = write_datacomp(tmp_path / "pool")
    report = run_import(tmp_path / "pool", tmp_path / "scores", logit_scale=100.0)
    assert report.rows == 100 and report.errors == 1 and not report.failed
    scores = open_score_set(tmp_path / "scores", role="reference")
    assert scores.scale == 100.0 and scores.kind == "softmax" and scores.dim == DIM
    assert not scores.has_images and scores.part_names() == ["00000000", "00000001"]
    for name, (img, _) in arrays.items():
        part = pq.read_table(tmp_path / "scores" / "parts" / f"{name}.parquet")
        meta = pq.read_table(tmp_path / "pool" / f"{name}.parquet")
        assert part.column("uid").to_pylist() == meta.column("uid").to_pylist()
        assert part.column("caption").to_pylist() == meta.column("text").to_pylist()
        assert part.column("index").to_pylist() == list(range(50))
        ok = np.array(part.column("status").to_pylist()) == "ok"
        assert ok.sum() == (49 if name == "00000000" else 50)
        if name == "00000000":
            assert part.column("error")[3].as_py().startswith("missing embedding")
        stored = embedding_matrix(part.column("img_emb"))[ok]
        want = img.astype(np.float16).astype(np.float32)[ok]
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(stored, want, atol=2e-3)
        # clip_score and ref_loss from the stored float16 values, as `score` computes them
        img16 = torch.from_numpy(embedding_matrix(part.column("img_emb"))[ok]).half()
        txt16 = torch.from_numpy(embedding_matrix(part.column("txt_emb"))[ok]).half()
        clip = part.column("clip_score").to_numpy(zero_copy_only=False)[ok]
        loss = part.column("ref_loss").to_numpy(zero_copy_only=False)[ok]
        np.testing.assert_allclose(clip, clip_scores(img16, txt16).numpy(), rtol=1e-6)
        want_loss = example_losses(img16, txt16, 100.0, None, "softmax").numpy()
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    marker = json.loads((tmp_path / "scores" / "done" / "00000000.json").read_text())
    assert marker["status"] == "ok" and marker["counts"]["errors"] == 1

    # A rerun skips finished files and leaves them alone.
    before = (tmp_path / "scores" / "parts" / "00000000.parquet").stat().st_mtime_ns
    again = run_import(tmp_path / "pool", tmp_path / "scores", logit_scale=100.0)
    assert again.skipped == 2 and again.rows == 0
    assert (tmp_path / "scores" / "parts" / "00000000.parquet").stat().st_mtime_ns == before


def test_the_model_gives_scale_and_width_and_b32_is_checked(tmp_path: Path) -> None:
    write_datacomp(tmp_path / "pool", shards=1)
    run_import(tmp_path / "pool", tmp_path / "scores")
    scores = open_score_set(tmp_path / "scores")
    model = load_model(resolve_spec(ModelSpec("jc-tiny", device="cpu")), warn_random=False)
    assert scores.scale == pytest.approx(model.logit_scale) and scores.kind == model.loss_kind
    # The b32 arrays are 32 wide: against a 64-wide model that is a failed file, said so.
    report = run_import(tmp_path / "pool", tmp_path / "b32", embeddings="b32")
    assert report.failed and "32 wide but the model's are 64" in report.failed[0]
    marker = json.loads((tmp_path / "b32" / "done" / "00000000.json").read_text())
    assert marker["status"] == "failed"


def test_bad_sources_fail_clearly_and_the_rest_is_imported(tmp_path: Path) -> None:
    write_datacomp(tmp_path / "pool", shards=3)
    short = pq.read_table(tmp_path / "pool" / "00000001.parquet").slice(0, 40)
    pq.write_table(short, tmp_path / "pool" / "00000001.parquet")  # 40 rows, 50 embeddings
    with np.load(tmp_path / "pool" / "00000002.npz") as npz:
        np.savez(tmp_path / "pool" / "00000002.npz", l14_img=npz["l14_img"])  # no l14_txt
    write_datacomp(tmp_path / "more", shards=5)
    for name in ("00000003", "00000004"):
        for ext in ("parquet", "npz"):
            (tmp_path / "more" / f"{name}.{ext}").rename(tmp_path / "pool" / f"{name}.{ext}")
    whole = (tmp_path / "pool" / "00000003.npz").read_bytes()
    (tmp_path / "pool" / "00000003.npz").write_bytes(whole[: len(whole) // 2])  # truncated
    (tmp_path / "pool" / "00000004.npz").write_bytes(b"")  # empty
    code, output = run_cli(
        "import", tmp_path / "pool", "--format", "datacomp", "--out", tmp_path / "s",
        "-m", "jc-tiny", "--logit-scale", "100",
    )  # fmt: skip
    assert code == 1, output
    assert "40 rows but its image embeddings are shaped (50, 64)" in output
    assert "no array l14_txt" in output
    assert "00000003.npz: " in output and "00000004.npz: " in output
    assert [p.stem for p in (tmp_path / "s" / "parts").glob("*.parquet")] == ["00000000"]
    markers = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "s" / "done").glob("*")}
    assert sorted(m["status"] for m in markers.values()) == ["failed"] * 4 + ["ok"]
    # Into the same OUT, other import settings are refused rather than mixed in.
    code, output = run_cli(
        "import", tmp_path / "pool", "--format", "datacomp", "--out", tmp_path / "s",
        "-m", "jc-tiny", "--logit-scale", "50",
    )  # fmt: skip
    assert code == 2 and "logit_scale: 100.0 there, 50.0 now" in output, output
    # One-line errors for what cannot start at all.
    cases = [
        (["--format", "laion"], "unknown --format 'laion'"),
        (["--format", "datacomp", "--embeddings", "h14"], "--embeddings is one of l14, b32"),
        (["--format", "datacomp", "--logit-scale", "-1"], "--logit-scale is α"),
        (["--format", "clip-retrieval"], "holds no clip-retrieval files"),
        (["--format", "datacomp", "--loss", "sigmoid"], "--logit-bias and --loss go with"),
    ]
    for args, message in cases:
        code, output = run_cli(
            "import", tmp_path / "pool", *args, "--out", tmp_path / "x", "-m", "jc-tiny"
        )
        assert code == 2 and message in output and output.count("\n") == 1, (args, output)
    (tmp_path / "lonely").mkdir()
    pq.write_table(short, tmp_path / "lonely" / "a.parquet")
    code, output = run_cli(
        "import", tmp_path / "lonely", "--format", "datacomp", "--out", tmp_path / "y",
        "-m", "jc-tiny",
    )  # fmt: skip
    assert code == 2 and "has no a.npz beside it" in output


def test_clip_retrieval_output_imports_and_selection_works_on_it(tmp_path: Path) -> None:
    source = tmp_path / "embeddings"
    for sub in ("img_emb", "text_emb", "metadata"):
        (source / sub).mkdir(parents=True)
    for n in range(2):
        img, txt = pairs(400, DIM, n)
        np.save(source / "img_emb" / f"img_emb_{n}.npy", img.astype(np.float16))
        np.save(source / "text_emb" / f"text_emb_{n}.npy", txt.astype(np.float16))
        uids = [f"{n:04x}{i:028x}" for i in range(400)]
        pq.write_table(
            pa.table({"caption": [f"c {n} {i}" for i in range(400)], "uid": uids}),
            source / "metadata" / f"metadata_{n}.parquet",
        )
    code, output = run_cli(
        "import", source, "--format", "clip-retrieval", "--out", tmp_path / "s", "-m", "jc-tiny",
        "--logit-scale", "100",
    )  # fmt: skip
    assert code == 0, output
    part = pq.read_table(tmp_path / "s" / "parts" / "metadata_1.parquet")
    assert part.column("caption")[5].as_py() == "c 1 5"
    # select works on it, and writes DataComp's subset file from the uids ...
    code, output = run_cli(
        "select", tmp_path / "s", "--out", tmp_path / "sel", "--method", "jest", "-b", "40"
    )
    assert code == 0, output
    assert len(np.load(tmp_path / "sel" / "uids.npy")) == 40 * (800 // 200)
    # ... but there are no images to export, and it says so in one line
    code, output = run_cli(
        "select", tmp_path / "s", "--out", tmp_path / "sel2", "-b", "40", "--export"
    )
    assert code == 2 and "imported from embeddings" in output and output.count("\n") == 1
    assert not (tmp_path / "sel2").exists()
    # The selection itself remembers: with the score set gone, export and the loader refuse too.
    shutil.rmtree(tmp_path / "s")
    with pytest.raises(JCError, match="imported from embeddings"):
        export(tmp_path / "sel", None)
    with pytest.raises(JCError, match="imported from embeddings"):
        SelectionBatches(tmp_path / "sel", source="original")


def test_dedup_info_and_status_work_on_an_imported_set(tmp_path: Path) -> None:
    write_datacomp(tmp_path / "pool", shards=2, rows=200)
    with np.load(tmp_path / "pool" / "00000001.npz") as npz:
        planted = {k: npz[k].copy() for k in npz.files}
    planted["l14_img"][7] = planted["l14_img"][8]  # a near-identical pair of images
    planted["l14_txt"][7] = planted["l14_txt"][8]
    np.savez(tmp_path / "pool" / "00000001.npz", **planted)
    run_import(tmp_path / "pool", tmp_path / "s", logit_scale=100.0)
    code, output = run_cli("dedup", tmp_path / "s", "--out", tmp_path / "d", "--clusters", "4")
    assert code == 0, output
    dedup = pq.read_table(tmp_path / "d" / "dedup.parquet").to_pylist()
    dropped = [(Path(r["shard"]).stem, r["index"]) for r in dedup if not r["kept"]]
    assert ("00000001", 7) in dropped or ("00000001", 8) in dropped
    code, output = run_cli("info", tmp_path / "s")
    assert code == 0 and "400 (399 ok, 1 errors)" in output.replace("\u00a0", " "), output
    code, output = run_cli("status", tmp_path / "s")
    assert code == 0 and "done" in output, output


def test_shards_tie_rows_to_the_downloaded_samples(tmp_path: Path) -> None:
    """--shards: one part per tar, a row per sample, embeddings found by uid through the
    sidecar Parquet (shard 0) or the samples' json (shard 1); export then reads the images."""
    from jestcurate.io.reader import iter_raw_samples
    from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus

    pool = tmp_path / "pool"
    write_corpus(pool, CorpusSpec(shards=3, samples_per_shard=20, seed=3, image_size=32,
                                  noise=PRESETS["clean"]))  # fmt: skip
    samples = {}
    for tar in sorted(pool.glob("*.tar")):
        with open(tar, "rb") as f:
            samples[tar.stem] = [(r.key, json.loads(r.files["json"])["uid"]) for r in
                                 iter_raw_samples(f)]  # fmt: skip
    # img2dataset's sidecar for shard 0, with a failed download that is not in the tar
    rows0 = [{"key": k, "uid": u, "status": "success", "url": f"u/{k}", "caption": f"c {k}"}
             for k, u in samples["00000"]]  # fmt: skip
    rows0.insert(5, {"key": "gone", "uid": "f" * 32, "status": "failed_to_download",
                     "url": "u/gone", "caption": None})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows0), pool / "00000.parquet")
    # the source: every downloaded uid but one of shard 2, plus 7 never downloaded, in an
    # order and grouping of its own (DataComp's files do not follow the tars)
    uids = [u for name in ("00002", "00000", "00001") for _, u in samples[name]][1:]
    uids += [f"{i:032x}" for i in range(7)]
    source = tmp_path / "datacomp"
    source.mkdir()
    img, txt = pairs(len(uids), DIM, 9)
    half = len(uids) // 2
    for s, (a, b) in enumerate(((0, half), (half, len(uids)))):
        pq.write_table(pa.table({"uid": uids[a:b], "text": ["x"] * (b - a)}),
                       source / f"{s:08d}.parquet")  # fmt: skip
        np.savez(source / f"{s:08d}.npz", l14_img=img[a:b], l14_txt=txt[a:b],
                 b32_img=img[a:b, :32], b32_txt=txt[a:b, :32])  # fmt: skip
    out = tmp_path / "scores"
    code, output = run_cli("import", source, "--format", "datacomp", "--out", out, "-m",
                           "jc-tiny", "--shards", pool / "*.tar")  # fmt: skip
    assert code == 0, output
    assert "tied to a downloaded sample" in output and "59" in output, output
    scores = open_score_set(out)
    assert scores.has_images and scores.part_names() == ["00000", "00001", "00002"]
    where = {u: i for i, u in enumerate(uids)}
    for name, listed in samples.items():
        part = pq.read_table(out / "parts" / f"{name}.parquet")
        assert part.column("key").to_pylist() == [k for k, _ in listed]
        assert part.column("index").to_pylist() == list(range(len(listed)))
        assert part.column("shard").to_pylist() == [str((pool / f"{name}.tar").resolve())] * 20
        if name == "00000":  # read through the sidecar: its url and caption
            assert part.column("url").to_pylist() == [f"u/{k}" for k, _ in listed]
        status = part.column("status").to_pylist()
        for row, (_, uid), got in zip(part.to_pylist(), listed, status, strict=True):
            if uid not in where:  # the one downloaded sample the source lacks
                assert got == "error" and "not in the source" in row["error"]
                continue
            assert got == "ok"
            expected = img[where[uid]] / np.linalg.norm(img[where[uid]])
            assert np.allclose(row["img_emb"], expected, atol=2e-3)
    assert sum(s.count("error") for s in [pq.read_table(p).column("status").to_pylist()
               for p in scores.parts]) == 1  # fmt: skip
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").glob("*.json")}
    assert sum(m["matched"] for m in markers.values()) == 59
    assert "never downloaded" in output and " 7 " in output.replace(",", "")
    # the images are reachable: select and export read them from the tars
    code, output = run_cli("select", out, "--out", tmp_path / "sel", "-b", 4, "--ratio", 0.5,
                           "--method", "clip-score", "--export")  # fmt: skip
    assert code == 0 and "exported" in output, output
    # another --shards setting into the same set is refused
    code, output = run_cli("import", source, "--format", "datacomp", "--out", out, "-m",
                           "jc-tiny")  # fmt: skip
    assert code == 2 and "images" in output, output


def test_shards_lookups_and_refusals(tmp_path: Path) -> None:
    from jestcurate.pipelines.synth import CorpusSpec, write_corpus

    source = tmp_path / "datacomp"
    source.mkdir()
    uids = ["abcd", "abce", "b" * 32]
    img, txt = pairs(3, DIM, 1)
    pq.write_table(pa.table({"uid": uids}), source / "00000000.parquet")
    np.savez(source / "00000000.npz", l14_img=img, l14_txt=txt, b32_img=img, b32_txt=txt)
    index = importer.SourceIndex(importer.list_units(importer.ImportConfig(
        source, tmp_path / "o", "datacomp", "jc-tiny")), DIM)  # fmt: skip
    found = index.find(["abce", "abcd" + "X" * 40, "abc", None, "b" * 32]).tolist()
    assert found == [[0, 1], [-1, -1], [-1, -1], [-1, -1], [0, 2]]  # never matched truncated

    pool = tmp_path / "pool"
    write_corpus(pool, CorpusSpec(shards=2, samples_per_shard=6, seed=1, image_size=16))
    import tarfile

    tar = pool / "00001.tar"
    with tarfile.open(tar) as t:  # cut at a member boundary: tarfile itself ends quietly there
        third = t.getmembers()[3]
    cut = third.offset_data + -(-third.size // 512) * 512
    tar.write_bytes(tar.read_bytes()[:cut])
    pq.write_table(pa.table({"key": ["x"], "uid": ["abcd"]}), pool / "00001.parquet")
    out = tmp_path / "scores"
    args = ["import", source, "--format", "datacomp", "--out", out, "-m", "jc-tiny",
            "--shards", pool / "*.tar"]  # fmt: skip
    code, output = run_cli(*args)
    assert code == 1 and "00001: tar damaged after 2 samples" in output, output  # failed alone
    marker = json.loads((out / "done" / "00000.json").read_text())
    assert marker["status"] == "ok" and marker["matched"] == 0  # its uids are not in the source

    pq.write_table(pa.table({"id": uids}), source / "00000000.parquet")
    code, output = run_cli(*args[:5], tmp_path / "other", *args[6:])
    assert code == 2 and "has no uid column" in output, output
