"""End-to-end tests of `jestcurate score` against the score-set contract."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_parts, run_cli
from PIL import Image

from jestcurate.io.reader import error_reason
from jestcurate.io.shards import assign_names, expand_inputs
from jestcurate.io.store import embedding_matrix, score_schema
from jestcurate.math.scoring import example_losses
from jestcurate.model.openclip import BUILTIN_CONFIG_DIR
from jestcurate.pipelines import score as score_mod
from jestcurate.pipelines.score import cpu, loop, stream
from jestcurate.pipelines.score.decoding import Decoding
from jestcurate.pipelines.score.stream import Chunk
from jestcurate.pipelines.synth import CorpusSpec, shard_samples, write_tar


def score(inputs, out: Path, **kw) -> score_mod.ScoreReport:
    kw.setdefault("model", "jc-tiny")
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 16)
    cfg = score_mod.ScoreConfig(inputs=tuple(str(i) for i in inputs), out=out, **kw)
    return score_mod.run(cfg)


def tar_contents(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_contract_round_trip(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    code, output = run_cli("score", corpus, "--out", out, "--model", "jc-tiny", "--batch-size", 10)
    assert code == 0, output
    assert "scored now" in output and "no --pretrained given" in output

    meta = json.loads((out / "meta.json").read_text())
    assert meta["schema_version"] == 1 and meta["role"] == "reference"
    assert meta["model"] == "jc-tiny" and meta["pretrained"] is None and meta["init_seed"] == 0
    assert meta["loss"] == "softmax" and meta["logit_bias"] is None
    assert meta["embed_dim"] == 64 and meta["precision"] == "fp32"
    assert meta["preprocess"]["size"] == [64, 64]

    tars = sorted(corpus.glob("*.tar"))
    assert sorted(p.stem for p in (out / "parts").glob("*.parquet")) == [t.stem for t in tars]
    for tar in tars:
        marker = json.loads((out / "done" / f"{tar.stem}.json").read_text())
        assert marker["status"] == "ok" and marker["error"] is None
        assert marker["counts"] == {"samples": 24, "ok": 24, "errors": 0}
        assert marker["shard"] == str(tar) and marker["input_bytes"] == tar.stat().st_size

        table = pq.read_table(out / "parts" / f"{tar.stem}.parquet")
        assert table.schema.equals(score_schema(64))
        assert table.column("shard").to_pylist() == [str(tar)] * 24
        assert table.column("index").to_pylist() == list(range(24))
        files = tar_contents(tar)
        for row in table.drop_columns(["img_emb", "txt_emb"]).to_pylist():
            sample = files[row["key"]]
            info = json.loads(sample["json"])
            assert row["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
            assert row["caption"] == sample["txt"].decode()
            assert (row["uid"], row["url"]) == (info["uid"], info["url"])
            assert row["status"] == "ok" and row["error"] is None

        img = embedding_matrix(table.column("img_emb"))
        txt = embedding_matrix(table.column("txt_emb"))
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=2e-3)
        # Both scores can be recomputed from the stored embeddings alone.
        clip = table.column("clip_score").to_numpy()
        np.testing.assert_allclose(clip, (img * txt).sum(1), atol=1e-5)
        loss = example_losses(
            torch.from_numpy(img), torch.from_numpy(txt), meta["logit_scale"], None, "softmax"
        )
        np.testing.assert_allclose(table.column("ref_loss").to_numpy(), loss.numpy(), atol=1e-4)
    # parts/ is the dataset to hand to pyarrow (docs/scores.md): every row of every shard
    assert pq.read_table(out / "parts").num_rows == 3 * 24


def test_hostile_inputs_become_rows_and_failed_markers(
    hostile: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    path, expected = hostile
    shutil.copy(path, pool / "a-hostile.tar")
    good = shard_samples(CorpusSpec(samples_per_shard=12, image_size=32), 3)
    write_tar(pool / "b-good.tar", good)
    write_tar(pool / "c-truncated.tar", good)
    data = (pool / "c-truncated.tar").read_bytes()
    (pool / "c-truncated.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(pool / "d-empty.tar", "w"):
        pass
    (pool / "e-zero.tar").write_bytes(b"")
    (pool / "f-garbage.tar").write_bytes(b"\x13\x37" * 3000)
    out = tmp_path / "scores"

    code, output = run_cli("score", pool, "--out", out, "--model", "jc-tiny", "--workers", 2)
    assert code == 1, output
    assert "Traceback" not in output
    assert "failed" in output and "c-truncated.tar" in output

    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").glob("*.json")}
    status = {name: m["status"] for name, m in markers.items()}
    assert status == {
        "a-hostile": "ok",
        "b-good": "ok",
        "c-truncated": "failed",
        "d-empty": "ok",
        "e-zero": "failed",
        "f-garbage": "failed",
    }
    assert "damaged" in markers["c-truncated"]["error"]
    assert "not a readable tar" in markers["e-zero"]["error"]

    hostile_rows = pq.read_table(out / "parts" / "a-hostile.parquet").to_pylist()
    assert len(hostile_rows) == len(expected) + 1
    for row in hostile_rows[:-1]:
        got = "ok" if row["status"] == "ok" else error_reason(row["error"])
        assert got == expected[row["key"]], row
        assert (row["img_emb"] is None) == (row["status"] != "ok")
        assert (row["ref_loss"] is None) == (row["status"] != "ok")
    counts = markers["a-hostile"]["counts"]
    assert counts["samples"] == len(hostile_rows)
    assert counts["ok"] == sum(v == "ok" for v in expected.values())
    assert sum(markers["a-hostile"]["error_reasons"].values()) == counts["errors"]

    truncated = pq.read_table(out / "parts" / "c-truncated.parquet").to_pylist()
    assert 0 < len(truncated) < 12
    assert [r["key"] for r in truncated] == [s["__key__"] for s in good[: len(truncated)]]
    assert pq.read_table(out / "parts" / "d-empty.parquet").num_rows == 0
    assert pq.read_table(out / "parts" / "e-zero.parquet").num_rows == 0


def test_rerun_skips_done_and_retries_failed(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    first = score([corpus], out)
    assert len(first.results) == 3 and not first.failed
    parts = {p.name: p.read_bytes() for p in (out / "parts").glob("*.parquet")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}

    again = score([corpus], out)
    assert again.skipped == 3 and again.results == []
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")} == mtimes

    marker = out / "done" / "00001.json"
    failed = json.loads(marker.read_text())
    failed.update(status="failed", error="simulated")
    marker.write_text(json.dumps(failed))
    third = score([corpus], out)
    assert [r.name for r in third.results] == ["00001"] and third.skipped == 2
    assert json.loads(marker.read_text())["status"] == "ok"
    assert {p.name: p.read_bytes() for p in (out / "parts").glob("*.parquet")} == parts


def test_scores_do_not_depend_on_batching_workers_or_tasks(corpus: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    score([corpus], a, batch_size=5, workers=0)
    b = tmp_path / "b"
    score([corpus], b, batch_size=64, workers=2)
    c = tmp_path / "c"  # two array tasks, and the shards named in another order
    reordered = [corpus / "00002.tar", corpus / "00000.tar", corpus / "00001.tar"]
    for index in (1, 0):
        score(reordered, c, task_index=index, num_tasks=2)
    ta = read_parts(a)
    for other in (b, c):
        tb = read_parts(other)
        assert ta.drop_columns(["img_emb", "txt_emb", "clip_score", "ref_loss"]).equals(
            tb.drop_columns(["img_emb", "txt_emb", "clip_score", "ref_loss"])
        )
        for col in ("img_emb", "txt_emb"):
            np.testing.assert_allclose(
                embedding_matrix(ta.column(col)), embedding_matrix(tb.column(col)), atol=2e-3
            )
        for col in ("clip_score", "ref_loss"):
            np.testing.assert_allclose(
                ta.column(col).to_numpy(), tb.column(col).to_numpy(), atol=2e-3
            )


def test_one_shard_scored_alone_or_with_others_is_the_same(corpus: Path, tmp_path: Path) -> None:
    score([corpus], tmp_path / "all")
    score([corpus / "00001.tar"], tmp_path / "one")
    whole = pq.read_table(tmp_path / "all" / "parts" / "00001.parquet")
    alone = pq.read_table(tmp_path / "one" / "parts" / "00001.parquet")
    assert whole.equals(alone)


def test_refuses_to_mix_different_setups(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    score([corpus / "00000.tar"], out)
    for extra, field in (
        (["--precision", "bf16"], "precision"),
        (["--role", "learner"], "role"),
        (["--model", "jc-tiny-sigmoid"], "model"),
    ):
        args = ["score", corpus, "--out", out, "--model", "jc-tiny", *extra]
        if "--model" in extra:
            args = ["score", corpus, "--out", out, *extra]
        code, output = run_cli(*args)
        assert code == 2, output
        assert output.count("\n") == 1 and f"{field}:" in output and "made differently" in output
    assert len(list((out / "parts").glob("*.parquet"))) == 1


def _save_tiny(path: Path, seed: int, wrap: bool = False) -> dict[str, torch.Tensor]:
    import open_clip

    open_clip.add_model_config(BUILTIN_CONFIG_DIR)
    torch.manual_seed(seed)
    model = open_clip.create_model("jc-tiny")
    state = model.state_dict()
    if wrap:  # what open_clip_train saves under DDP
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return state


def test_embeddings_equal_open_clip_for_a_saved_checkpoint(corpus: Path, tmp_path: Path) -> None:
    import open_clip

    ckpt = tmp_path / "ref.pt"
    _save_tiny(ckpt, seed=123)
    out = tmp_path / "scores"
    code, output = run_cli(
        "score", corpus / "00000.tar", "--out", out, "--model", "jc-tiny", "--pretrained", ckpt
    )
    assert code == 0, output and "random weights" not in output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pretrained"] == str(ckpt)
    assert meta["pretrained_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["init_seed"] is None

    model, _, preprocess = open_clip.create_model_and_transforms("jc-tiny", pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer("jc-tiny")
    model.eval()
    table = pq.read_table(out / "parts" / "00000.parquet")
    files = tar_contents(corpus / "00000.tar")
    keys = table.column("key").to_pylist()
    images = torch.stack([preprocess(Image.open(io.BytesIO(files[k]["jpg"]))) for k in keys])
    captions = [files[k]["txt"].decode() for k in keys]
    with torch.no_grad():
        want_img = model.encode_image(images, normalize=True).numpy()
        want_txt = model.encode_text(tokenizer(captions), normalize=True).numpy()
    np.testing.assert_allclose(embedding_matrix(table.column("img_emb")), want_img, atol=2e-3)
    np.testing.assert_allclose(embedding_matrix(table.column("txt_emb")), want_txt, atol=2e-3)
    assert meta["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))

    # open_clip_train's {"state_dict": {"module.…": …}} form loads to the same weights.
    wrapped = tmp_path / "epoch_3.pt"
    _save_tiny(wrapped, seed=123, wrap=True)
    score([corpus / "00000.tar"], tmp_path / "wrapped", pretrained=str(wrapped))
    again = pq.read_table(tmp_path / "wrapped" / "parts" / "00000.parquet")
    assert again.column("img_emb").equals(table.column("img_emb"))


class NotATensor:
    pass


def test_checkpoint_loading_errors(corpus: Path, tmp_path: Path) -> None:
    state = _save_tiny(tmp_path / "ok.pt", seed=1)
    torch.save({"state_dict": state, "extra": NotATensor()}, tmp_path / "pickled.pt")
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a checkpoint")
    torch.save({k: v for k, v in state.items() if "visual" not in k}, tmp_path / "partial.pt")
    cases = {
        "pickled.pt": "refusing to load",
        "garbage.pt": "cannot load",
        "partial.pt": "does not fit jc-tiny",
        "missing.pt": "checkpoint not found",
    }
    for name, message in cases.items():
        code, output = run_cli(
            "score", corpus, "--out", tmp_path / "s", "--model", "jc-tiny", "--pretrained",
            tmp_path / name,
        )  # fmt: skip
        assert code == 2, (name, output)
        assert message in output and "Traceback" not in output, (name, output)
        assert output.count("\n") == 1, output


def test_model_config_file_is_identified_by_content(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cfg" / "my-tiny.json"
    config.parent.mkdir()
    config.write_text((BUILTIN_CONFIG_DIR / "jc-tiny-sigmoid.json").read_text())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scores"
    first = score([corpus / "00000.tar"], out, model="cfg/my-tiny.json")
    assert len(first.results) == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "my-tiny" and meta["loss"] == "sigmoid"
    assert meta["logit_bias"] == pytest.approx(-10.0) and meta["model_config_sha256"]
    # The same file by its absolute path is the same model: no refusal, nothing redone.
    again = score([corpus / "00000.tar"], out, model=str(config))
    assert again.skipped == 1
    losses = pq.read_table(out / "parts" / "00000.parquet").column("ref_loss").to_numpy()
    assert np.isfinite(losses).all()


def test_random_init_is_reproducible(corpus: Path, tmp_path: Path) -> None:
    score([corpus / "00002.tar"], tmp_path / "a")
    score([corpus / "00002.tar"], tmp_path / "b")
    a = pq.read_table(tmp_path / "a" / "parts" / "00002.parquet")
    b = pq.read_table(tmp_path / "b" / "parts" / "00002.parquet")
    assert a.equals(b)
    assert isinstance(a.column("img_emb").type, pa.FixedSizeListType)


def test_pretrained_tag_resolves_downloads_and_pins_sha(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real tag path: open_clip's registry entry points at a URL (file:// here, so no network),
    the weights are fetched into the cache, loaded, and their sha256 lands in meta.json."""
    import open_clip

    state = _save_tiny(tmp_path / "published.pt", seed=5)
    registry = {"jc-tiny": {"guide": {"url": (tmp_path / "published.pt").as_uri()}}}
    monkeypatch.setattr(open_clip.pretrained, "_PRETRAINED", registry)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "scores"
    score([corpus / "00000.tar"], out, pretrained="guide")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pretrained"] == "guide"
    assert (
        meta["pretrained_sha256"]
        == hashlib.sha256((tmp_path / "published.pt").read_bytes()).hexdigest()
    )
    assert (tmp_path / "home" / ".cache" / "clip" / "published.pt").is_file()
    assert meta["logit_scale"] == pytest.approx(float(state["logit_scale"].exp()))

    registry["jc-tiny"]["gone"] = {"url": (tmp_path / "nowhere.pt").as_uri()}
    code, output = run_cli(
        "score", corpus, "-m", "jc-tiny", "--pretrained", "gone", "--out", tmp_path / "o2"
    )
    assert code == 2 and "cannot fetch pretrained weights 'gone'" in output, output


def test_fsspec_url_inputs_are_scored(tmp_path: Path) -> None:
    import fsspec

    samples = shard_samples(CorpusSpec(samples_per_shard=10, image_size=32), 0)
    write_tar(tmp_path / "local.tar", samples)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/pool/00000.tar", (tmp_path / "local.tar").read_bytes())
    out = tmp_path / "scores"
    report = score(["memory://bucket/pool/"], out, workers=2)
    assert [r.status for r in report.results] == ["ok"]
    table = pq.read_table(out / "parts" / "00000.parquet")
    assert set(table.column("shard").to_pylist()) == {"memory:///bucket/pool/00000.tar"}
    marker = json.loads((out / "done" / "00000.json").read_text())
    assert marker["input_bytes"] == (tmp_path / "local.tar").stat().st_size
    assert table.num_rows == 10


def _trial(monkeypatch: pytest.MonkeyPatch, rates: list[float]) -> int:
    """Feed CpuThreads chunks of 64 samples, window w at `rates[w]` samples/s, with spinning
    OpenMP threads. Returns the threads it settles on (2 cores, 1 worker)."""
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trial = cpu.CpuThreads("cpu", workers=1)
        assert trial.deciding and trial.options == [2, 1]
        for _ in range(trial.WARMUP):
            trial.record(64, 10.0)  # start-up chunks: ignored whatever they show
        for rate in rates:
            for _ in range(trial.WINDOW):
                trial.record(64, 64 / rate)
        assert not trial.deciding
        return torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_thread_trial_with_spinning_openmp_keeps_the_faster(monkeypatch) -> None:
    assert _trial(monkeypatch, rates=[400.0, 600.0]) == 1
    assert _trial(monkeypatch, rates=[600.0, 400.0]) == 2


def _policy(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Set or unset OMP_WAIT_POLICY so that monkeypatch restores the session's own value."""
    monkeypatch.setenv("OMP_WAIT_POLICY", value or "unset")
    if value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")


def test_sleeping_openmp_keeps_all_threads_and_nices_the_workers(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _policy(monkeypatch, "passive")
        assert not cpu.CpuThreads("cpu", workers=1).deciding
        _policy(monkeypatch, "ACTIVE")
        assert cpu.CpuThreads("cpu", workers=1).deciding
    finally:
        torch.set_num_threads(before)
    # score asks for niced workers on a CPU only when the threads sleep ...
    asked: list[bool] = []

    class Spy(score_mod.ShardStream):
        def __init__(self, *args, **kw) -> None:
            asked.append(kw["nice"])
            super().__init__(*args, **kw)

    monkeypatch.setattr(loop, "ShardStream", Spy)
    for policy in ("PASSIVE", "ACTIVE"):
        _policy(monkeypatch, policy)
        score([corpus], tmp_path / policy)
    assert asked == [True, False]
    # ... and a worker then lowers its priority before reading (simulated here in-process).
    niced: list[int] = []
    monkeypatch.setattr(cpu.os, "nice", niced.append)
    monkeypatch.setattr(stream, "default_sigterm", lambda: None)
    worker = type("Info", (), {"id": 0, "num_workers": 1})()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    shard = assign_names(expand_inputs([str(corpus)]))[:1]
    for nice, want in ((False, []), (True, [19])):
        niced.clear()
        shards = score_mod.ShardStream(
            shard, None, lambda c: torch.zeros(len(c), 4), 8, 10**9, Decoding("torch"), nice=nice
        )
        assert sum(len(chunk.rows) for chunk in shards) == 24
        assert niced == want


def test_cli_makes_openmp_sleep_unless_told_otherwise(monkeypatch) -> None:
    import subprocess
    import sys

    # The CLI and the policy must be importable without torch, or the policy would come too late.
    probe = "import sys, jestcurate.cli, jestcurate.pipelines.score.cpu as c; "
    probe += "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    _policy(monkeypatch, None)
    monkeypatch.delitem(sys.modules, "torch")
    cpu.sleeping_openmp(device="cuda")  # no decoding workers beside the model's threads
    cpu.sleeping_openmp(workers=0)
    assert not cpu.openmp_sleeps()
    cpu.sleeping_openmp()
    assert cpu.openmp_sleeps()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice stands
    cpu.sleeping_openmp()
    assert not cpu.openmp_sleeps()


def test_a_chunk_pickles_and_pins_its_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Chunk crosses from a DataLoader worker (pickled) and, on CUDA, through torch's
    pin_memory, which calls Chunk.pin_memory since it does not look inside dataclasses."""
    import pickle

    from torch.utils.data._utils.pin_memory import pin_memory

    deferred = [b"\xff\xd8jpeg", torch.zeros(3, 2, 2)]  # JPEG bytes and a worker-made tensor
    chunk = Chunk(3, 1.5, [{"key": "a"}, {"key": "b"}], [1], deferred=deferred)
    chunk.tokens, chunk.last, chunk.size = torch.ones(1, 4, dtype=torch.long), True, 10
    back = pickle.loads(pickle.dumps(chunk))
    assert (back.pos, back.started, back.rows, back.valid, back.last, back.size) == (
        3, 1.5, chunk.rows, [1], True, 10
    )  # fmt: skip
    assert torch.equal(back.tokens, chunk.tokens) and back.deferred[0] == deferred[0]
    pinned: list[torch.Tensor] = []

    def pin(tensor: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)  # no CUDA needed to see what is pinned
    out = pin_memory(chunk)
    assert isinstance(out, Chunk) and out.rows == chunk.rows and out.pos == 3
    assert {id(t) for t in pinned} == {id(chunk.tokens), id(deferred[1])}
    assert out.tokens is not chunk.tokens and out.deferred[0] is deferred[0]
    monkeypatch.undo()
    if torch.cuda.is_available():
        assert pin_memory(chunk).tokens.is_pinned()


def test_worker_chunks_hold_at_least_256_samples_within_the_pixel_budget() -> None:
    assert stream.chunk_size(16, (64, 64)) == 256  # small batches: chunks still large
    assert stream.chunk_size(1024, (64, 64)) == 1024  # a batch, when larger
    assert stream.chunk_size(64, (224, 224)) == (64 << 20) // (3 * 224 * 224 * 4) == 111
    assert stream.chunk_size(64, (4096, 4096)) == 1  # never below one sample


def test_batch_size_defaults_to_the_devices(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    batches: list[int] = []
    encoder = loop.Encoder

    class Spy(encoder):  # type: ignore[misc, valid-type]
        def __init__(self, model, batch_size: int) -> None:
            batches.append(batch_size)
            super().__init__(model, batch_size)

    monkeypatch.setattr(loop, "Encoder", Spy)
    score([corpus], tmp_path / "cpu", batch_size=None)
    assert batches == [score_mod.DEFAULT_BATCH["cpu"]] == [64]
