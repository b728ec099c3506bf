"""`score --decode torch`: batched JPEG decoding and preprocessing on the model's device (the
CPU here runs the same code as CUDA would, with torchvision's CPU decoder)."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from PIL import Image

from jestcurate.errors import JCError
from jestcurate.io.reader import error_reason, load_image
from jestcurate.io.store import embedding_matrix
from jestcurate.model.devicedecode import DevicePreprocess


def jpeg(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> bytes:
    small = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_device_preprocessing_matches_open_clip_within_rounding() -> None:
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    on_device = DevicePreprocess.from_transform(preprocess)
    assert on_device.size == 224 and on_device.crop == (224, 224)
    rng = np.random.default_rng(0)
    items = [jpeg(rng, *rng.integers(150, 700, 2)) for _ in range(8)]
    items.append(jpeg(rng, 300, 200, mode="L"))
    png = io.BytesIO()
    Image.new("RGB", (90, 60), (10, 200, 30)).save(png, "PNG")
    png_tensor = preprocess(Image.open(io.BytesIO(png.getvalue())).convert("RGB"))
    items.append(png_tensor)  # what a worker sends for a non-JPEG: its preprocessed tensor
    got, bad = on_device.batch(items, torch.device("cpu"))
    want = torch.stack(
        [preprocess(Image.open(io.BytesIO(i)).convert("RGB")) for i in items[:-1]] + [png_tensor]
    )
    assert not bad and got.shape == want.shape
    difference = (got - want).abs()
    # Normalised units: 0.05 is under 4 grey levels of 255; the mean is far smaller.
    assert difference.max() < 0.05 and difference.mean() < 1e-3, difference.max()
    # JPEGs alone take the batched path; the same values, bit for bit, as image by image.
    jpegs, _ = on_device.batch(items[:-1], torch.device("cpu"))
    assert torch.equal(jpegs, got[:-1])
    from torchvision.io import decode_jpeg

    mean = torch.tensor(on_device.mean).view(3, 1, 1)
    std = torch.tensor(on_device.std).view(3, 1, 1)
    one = on_device._one(decode_jpeg(torch.frombuffer(bytearray(items[0]), dtype=torch.uint8)))
    assert torch.equal(one.float().div_(255).sub_(mean).div_(std), jpegs[0])


def test_undecodable_jpegs_are_reported_not_raised() -> None:
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    on_device = DevicePreprocess.from_transform(preprocess)
    good = jpeg(np.random.default_rng(1), 240, 180)
    got, bad = on_device.batch([good, good[: len(good) // 3], good], torch.device("cpu"))
    assert got.shape[0] == 2 and [i for i, _ in bad] == [1]
    assert bad[0][1].startswith("image decode failed")


def test_other_transforms_are_refused() -> None:
    from torchvision import transforms as T

    with pytest.raises(JCError, match="use --decode pil"):
        DevicePreprocess.from_transform(T.Compose([T.RandomResizedCrop(64), T.ToTensor()]))


def test_score_with_torch_decoding(corpus, hostile, tmp_path) -> None:
    args = ["-m", "jc-tiny", "--workers", "1"]
    assert run_cli("score", corpus, "--out", tmp_path / "pil", *args)[0] == 0
    code, output = run_cli("score", corpus, "--out", tmp_path / "dev", *args, "--decode", "torch")
    assert code == 0, output
    for part in sorted((tmp_path / "pil" / "parts").glob("*.parquet")):
        a, b = pq.read_table(part), pq.read_table(tmp_path / "dev" / "parts" / part.name)
        assert a.column("status").equals(b.column("status"))
        ea, eb = embedding_matrix(a.column("img_emb")), embedding_matrix(b.column("img_emb"))
        ok = ~np.isnan(ea).any(axis=1)
        cos = (ea[ok] * eb[ok]).sum(1) / np.linalg.norm(ea[ok], axis=1)
        cos /= np.linalg.norm(eb[ok], axis=1)
        assert cos.min() > 0.99, cos.min()
    meta = json.loads((tmp_path / "dev" / "meta.json").read_text())
    assert meta["decode"] == "torch"
    # One score set, one decoder: mixing is refused; `auto` carries on with the set's own.
    code, output = run_cli("score", corpus, "--out", tmp_path / "dev", *args, "--decode", "pil")
    assert code == 2 and "decode" in output, output
    (tmp_path / "dev" / "done" / "00000.json").unlink()
    code, output = run_cli("score", corpus, "--out", tmp_path / "dev", *args)
    assert code == 0 and (tmp_path / "dev" / "done" / "00000.json").exists(), output

    # Every hostile sample gets the same status as with PIL decoding, whether the workers
    # decode (a CPU model with workers) or the main process does (as on a GPU).
    shard, expected = hostile
    for workers in (0, 1):
        out = tmp_path / f"hostile-{workers}"
        code, _ = run_cli("score", shard, "--out", out, "-m", "jc-tiny", "--workers", workers,
                          "--decode", "torch")  # fmt: skip
        rows = pq.read_table(out / "parts" / "hostile.parquet").to_pylist()
        assert len(rows) == len(expected) + 1  # the last repeats the first key
        for row in rows[:-1]:
            got = "ok" if row["status"] == "ok" else error_reason(row["error"])
            assert got == expected[row["key"]], row
            assert (row["img_emb"] is None) == (row["status"] != "ok")


def test_draft_decoding_reduces_large_jpegs_only() -> None:
    from torchvision import transforms as T

    from jestcurate.model import devicedecode
    from jestcurate.pipelines.synth import draw_image, encode

    jpeg = encode(draw_image(3, np.random.default_rng(0), 256))
    assert load_image(jpeg).size == (256, 256)
    assert load_image(jpeg, draft=64).size == (64, 64)  # 1/4: both sides stay >= 64
    assert load_image(jpeg, draft=100).size == (128, 128)  # 1/2
    assert load_image(jpeg, draft=200).size == (256, 256)  # under twice the size: untouched
    png = encode(Image.new("RGB", (256, 256), (9, 9, 9)), "PNG")
    assert load_image(png, draft=64).size == (256, 256)  # not a JPEG: decoded in full
    with pytest.raises(JCError, match="use --decode pil"):
        devicedecode.draft_size(T.Compose([T.CenterCrop(64), T.ToTensor()]))


def test_score_with_draft_decoding(tmp_path) -> None:
    from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus

    pool = tmp_path / "pool"  # 256 px images for a 64 px model: decoded at 1/4 scale
    write_corpus(pool, CorpusSpec(shards=1, samples_per_shard=24, seed=4, image_size=256,
                                  noise=PRESETS["noisy"]))  # fmt: skip
    args = ["-m", "jc-tiny", "--workers", "1"]
    assert run_cli("score", pool, "--out", tmp_path / "pil", *args)[0] == 0
    code, output = run_cli("score", pool, "--out", tmp_path / "draft", *args, "--decode",
                           "pil-draft")  # fmt: skip
    assert code == 0, output
    assert json.loads((tmp_path / "draft" / "meta.json").read_text())["decode"] == "pil-draft"
    a = pq.read_table(tmp_path / "pil" / "parts" / "00000.parquet")
    b = pq.read_table(tmp_path / "draft" / "parts" / "00000.parquet")
    assert a.column("status").equals(b.column("status"))
    ea, eb = embedding_matrix(a.column("img_emb")), embedding_matrix(b.column("img_emb"))
    ok = ~np.isnan(ea).any(axis=1)
    cos = (ea[ok] * eb[ok]).sum(1) / np.linalg.norm(ea[ok], axis=1) / np.linalg.norm(eb[ok], axis=1)
    assert cos.min() > 0.99 and not np.array_equal(ea[ok], eb[ok])  # close, and not the same
    code, output = run_cli("score", pool, "--out", tmp_path / "draft", *args, "--decode", "pil")
    assert code == 2 and "decode" in output, output


def test_auto_uses_the_device_decoder_only_where_it_works(monkeypatch) -> None:
    from jestcurate.model import devicedecode

    cuda = torch.device("cuda")
    assert devicedecode._probe(torch.device("cpu")) is None  # the probe itself works
    assert devicedecode.resolve_decode("auto", torch.device("cpu")) == "torch"
    assert devicedecode.resolve_decode("auto", torch.device("cpu"), existing="pil") == "pil"
    assert devicedecode.resolve_decode("torch", torch.device("cpu")) == "torch"
    monkeypatch.setattr(devicedecode, "_probe", lambda device: None)
    assert devicedecode.resolve_decode("auto", cuda) == "torch"
    monkeypatch.setattr(devicedecode, "_probe", lambda device: "RuntimeError: no nvjpeg")
    assert devicedecode.resolve_decode("auto", cuda) == "pil"


def test_auto_decodes_with_torch_on_a_cpu_and_falls_back_to_pil(
    corpus, tmp_path, monkeypatch
) -> None:
    from jestcurate.pipelines.score import decoding

    code, output = run_cli("score", corpus, "--out", tmp_path / "auto", "-m", "jc-tiny")
    assert code == 0, output
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["decode"] == "torch"
    # A transform torch does not reproduce (say, a squashing resize): auto decodes with PIL.
    monkeypatch.setattr(decoding, "supports_torch_decode", lambda transform: False)
    code, output = run_cli("score", corpus, "--out", tmp_path / "pil", "-m", "jc-tiny")
    assert code == 0, output
    assert "decode" not in json.loads((tmp_path / "pil" / "meta.json").read_text())


def test_a_decoder_that_cannot_follow_the_transform_is_refused_before_meta_json(
    corpus, tmp_path, monkeypatch
) -> None:
    """An explicit --decode torch the model's transform rules out leaves OUT unwritten, so
    the advice to use --decode pil works on the same OUT."""

    def refuse(transform):
        raise JCError("--decode torch reproduces open_clip's ... transform; use --decode pil")

    monkeypatch.setattr(DevicePreprocess, "from_transform", refuse)
    out = tmp_path / "out"
    code, output = run_cli("score", corpus, "--out", out, "-m", "jc-tiny", "--decode", "torch")
    assert code == 2 and "use --decode pil" in output, output
    assert not (out / "meta.json").exists()
    code, output = run_cli("score", corpus, "--out", out, "-m", "jc-tiny", "--decode", "pil")
    assert code == 0, output
