"""Hostile input for the error-handling tests: damaged images, odd files, truncated tars."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jestcurate.pipelines.synth.corpus import (
    draw_image,
    encode,
    write_tar,
)

# --- hostile input, for the error-handling tests --------------------------------------------


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def hostile_samples(seed: int = 0, size: int = 48) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Samples covering every bad-input case, with the expected outcome per key: "ok" or the
    error reason the reader must report."""
    rng = np.random.default_rng(seed)

    def good(label: int = 0) -> Image.Image:
        return draw_image(label, rng, size)

    palette = good(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    valid_jpg = encode(good(1))
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ok", {"jpg": valid_jpg, "txt": "a green circle"}),
        ("image decode failed", {"jpg": valid_jpg[: len(valid_jpg) // 2], "txt": "cut short"}),
        ("image decode failed", {"jpg": rng.bytes(300), "txt": "random bytes"}),
        ("missing image", {"txt": "caption without an image"}),
        ("missing caption", {"jpg": encode(good(2))}),
        ("caption not utf-8", {"jpg": encode(good(4)), "txt": b"caf\xe9 \xff\xfe"}),
        ("image too large", {"png": png_with_header(100_000, 100_000), "txt": "bomb"}),
        ("image too large", {"png": png_with_header(10_000, 10_000), "txt": "big header"}),
        ("ok", {"png": encode(good(5).convert("RGBA"), "PNG"), "txt": "an rgba png"}),
        ("ok", {"jpg": encode(good(6).convert("CMYK")), "txt": "a cmyk jpeg"}),
        ("ok", {"jpg": encode(good(7).convert("L")), "txt": "a grayscale jpeg"}),
        ("ok", {"png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "txt": "one pixel"}),
        ("ok", {"png": encode(palette, "PNG"), "txt": "a palette png with transparency"}),
        ("ok", {"webp": encode(good(8), "WEBP"), "txt": "a webp"}),
        ("invalid json", {"jpg": encode(good(9)), "txt": "bad json", "json": b"{not json"}),
        ("ok", {"jpg": encode(good(10)), "json": {"caption": "caption only in the json"}}),
        ("ok", {"jpg": encode(good(11)), "txt": ""}),
    ]
    samples = []
    expected: dict[str, str] = {}
    for i, (outcome, files) in enumerate(cases):
        key = f"h{i:04d}"
        meta = files.pop("json", None)
        if meta is None:
            meta = {"key": key, "url": f"https://hostile.example.invalid/{key}", "uid": f"{i:032x}"}
        samples.append({"__key__": key, "json": meta, **files})
        expected[key] = outcome
    # A key seen again later in the shard: the second copy is an error row.
    samples.append({"__key__": "h0000", "jpg": valid_jpg, "txt": "same key again"})
    return samples, expected


def write_truncated_tar(path: Path, samples: list[dict[str, Any]], keep: float) -> None:
    """Write the tar, then cut it to `keep` of its size, as an interrupted download leaves it."""
    write_tar(path, samples)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
