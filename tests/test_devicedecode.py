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
from jestcurate.io.reader import error_reason
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
    # One score set, one decoder: mixing is refused.
    code, output = run_cli("score", corpus, "--out", tmp_path / "dev", *args)
    assert code == 2 and "decode" in output, output

    # Every hostile sample gets the same status as with PIL decoding.
    shard, expected = hostile
    out = tmp_path / "hostile"
    code, _ = run_cli("score", shard, "--out", out, *args, "--decode", "torch")
    rows = pq.read_table(out / "parts" / "hostile.parquet").to_pylist()
    assert len(rows) == len(expected) + 1  # the last repeats the first key
    for row in rows[:-1]:
        got = "ok" if row["status"] == "ok" else error_reason(row["error"])
        assert got == expected[row["key"]], row
        assert (row["img_emb"] is None) == (row["status"] != "ok")


def test_auto_uses_the_device_decoder_only_where_it_works(monkeypatch) -> None:
    from jestcurate.model import devicedecode

    cuda = torch.device("cuda")
    assert devicedecode._probe(torch.device("cpu")) is None  # the probe itself works
    assert devicedecode.resolve_decode("auto", torch.device("cpu")) == "pil"
    assert devicedecode.resolve_decode("torch", torch.device("cpu")) == "torch"
    monkeypatch.setattr(devicedecode, "_probe", lambda device: None)
    assert devicedecode.resolve_decode("auto", cuda) == "torch"
    monkeypatch.setattr(devicedecode, "_probe", lambda device: "RuntimeError: no nvjpeg")
    assert devicedecode.resolve_decode("auto", cuda) == "pil"
