"""Tar shards to samples. Every sample found becomes a row; a bad one carries its error instead.

We read tars with the standard library's streaming tarfile rather than webdataset's iterators:
webdataset either raises or silently drops on damage, while the score contract needs the position
of every sample, an error row for each bad one, and the rows before a truncation kept.
Keys follow webdataset's convention (the member path up to the first dot of its file name), so a
key here is the `__key__` a WebDataset loader sees.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# webdataset's base_plus_ext: key = everything up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset skips its own metadata members such as __key__ or __index__.
_META = re.compile(r"(^|/)__[^/]*__($|/)")


class ShardReadError(Exception):
    """The tar itself is unreadable or damaged; samples yielded before this are valid."""


class SampleError(Exception):
    """A sample that cannot be scored. `reason` is a short category used in the run summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RawSample:
    key: str
    index: int
    files: dict[str, bytes] = field(default_factory=dict)
    damaged: bool = False  # the tar broke while this sample was being read


def split_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member, or None for members a WebDataset loader
    skips (directories, its own __meta__ files, names without an extension)."""
    if not member.isfile() or _META.search(member.name):
        return None
    match = _KEY_EXT.match(member.name)
    return None if match is None else (match.group(1), match.group(2).lower())


class _Tail:
    """A read-only stream wrapper that counts bytes and keeps the last few blocks read, so the
    end of the archive can be checked after tarfile has finished with it."""

    def __init__(self, raw: IO[bytes], head: bytes = b"") -> None:
        self.raw = raw
        self.head = head
        self.pos = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head[:size] if size >= 0 else self.head, b""
            if size < 0 or len(data) < size:
                data += self.raw.read(-1 if size < 0 else size - len(data))
        else:
            data = self.raw.read(size)
        self.pos += len(data)
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        return data

    def block_at(self, offset: int) -> bytes | None:
        start = offset - (self.pos - len(self.tail))
        if start < 0:
            return None
        return self.tail[start : start + tarfile.BLOCKSIZE]


_TAIL_BYTES = 64 * 1024


def _uncompressed(fileobj: IO[bytes]) -> _Tail:
    head = fileobj.read(2)
    if head == b"\x1f\x8b":  # gzip magic: decompress here so offsets below are tar offsets
        return _Tail(gzip.GzipFile(fileobj=_Tail(fileobj, head), mode="rb"))  # type: ignore[arg-type]
    return _Tail(fileobj, head)


def iter_raw_samples(fileobj: IO[bytes]) -> Iterator[RawSample]:
    """Group consecutive tar members by key, in file order. Raises ShardReadError on damage,
    after yielding the sample that was in progress (marked `damaged`).

    Python's tarfile ends iteration quietly at a truncated or garbled header, so after the
    last member we check for the all-zero end-of-archive block ourselves.
    """
    current: RawSample | None = None
    index = 0
    try:
        stream = _uncompressed(fileobj)
        tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        for member in tar:
            split = split_member(member)
            if split is None:
                continue
            key, ext = split
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if handle is not None and len(data) != member.size:
                raise tarfile.ReadError(f"{member.name} is cut short")
            if current is None or key != current.key:
                if current is not None:
                    yield current
                    index += 1
                current = RawSample(key=key, index=index)
            current.files[ext] = data
        end = stream.block_at(tar.offset)
        if end is None or len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError("no end-of-archive marker (truncated or garbled header)")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if current is not None:
            current.damaged = True
            yield current
            raise ShardReadError(f"tar damaged after {index + 1} samples: {exc}") from exc
        raise ShardReadError(f"not a readable tar: {exc}") from exc
    if current is not None:
        yield current


def image_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (PIL reads the header only) and check the pixel count, so a
    decompression bomb is refused before any pixel is decoded."""
    with warnings.catch_warnings():
        # The limit is enforced here; PIL's own warnings would flood the log.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise SampleError("image too large", str(exc)) from None
        except Exception as exc:  # any decoder failure on untrusted bytes becomes an error row
            raise SampleError("image decode failed", _describe(exc)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError("image too large", f"{width}x{height} pixels")
    return image


def load_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None
) -> Image.Image:
    """Decode image bytes to RGB, checking the pixel count from the header before decoding.

    With `draft`, a JPEG at least twice that size on both sides is decoded by DCT-domain
    scaling (Pillow's draft mode: 1/2, 1/4 or 1/8, the smallest that keeps both sides at least
    `draft`), several times cheaper than a full decode; the pixels differ slightly from a full
    decode followed by a resize (`score --decode pil-draft`, docs/benchmarks.md)."""
    image = image_header(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            if draft is not None and image.format == "JPEG":
                image.draft(None, (draft, draft))
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")
        except Exception as exc:  # truncated or corrupt data surfaces only when decoding
            raise SampleError("image decode failed", _describe(exc)) from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _text_field(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def parse_sample(
    raw: RawSample,
    seen_keys: set[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    defer_jpeg: bool = False,
    draft: int | None = None,
    need_caption: bool = True,
) -> tuple[dict[str, Any], Image.Image | bytes | None]:
    """Turn a raw sample into its metadata row and, if valid, its decoded RGB image; with
    `defer_jpeg`, an RGB or greyscale JPEG comes back undecoded, as its bytes (header checked);
    `draft` as for load_image. Without `need_caption` a sample with no caption is valid (an
    image-only evaluation set's, say) and its caption None."""
    row: dict[str, Any] = {
        "key": raw.key,
        "index": raw.index,
        "uid": None,
        "url": None,
        "caption": None,
        "sha256": None,
        "status": "ok",
        "error": None,
    }
    files = raw.files
    image_bytes = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image_bytes is not None:
        row["sha256"] = hashlib.sha256(image_bytes).hexdigest()
    duplicate = raw.key in seen_keys
    seen_keys.add(raw.key)
    try:
        meta: dict[str, Any] = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise SampleError("invalid json", _describe(exc)) from None
            if not isinstance(meta, dict):
                raise SampleError("invalid json", "not an object")
            row["uid"] = _text_field(meta, "uid")
            row["url"] = _text_field(meta, "url")
        if "txt" in files:
            try:
                row["caption"] = files["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SampleError("caption not utf-8", str(exc)) from None
        else:
            row["caption"] = _text_field(meta, "caption")
        if raw.damaged:
            raise SampleError("incomplete sample", "the tar broke while reading it")
        if duplicate:
            raise SampleError("duplicate key", "an earlier sample in this shard has the same key")
        if image_bytes is None:
            raise SampleError("missing image", f"no {'/'.join(IMAGE_EXTS[:3])} file")
        if row["caption"] is None and need_caption:
            raise SampleError("missing caption", "no .txt file and no caption in .json")
        if (
            defer_jpeg
            and image_bytes[:3] == JPEG_MAGIC
            and keep_jpeg(image_bytes, image_header(image_bytes, max_pixels).mode)
        ):
            return row, image_bytes
        return row, load_image(image_bytes, max_pixels, draft)
    except SampleError as exc:
        row["status"] = "error"
        row["error"] = str(exc)
        return row, None


def keep_jpeg(data: bytes, mode: str) -> bool:
    """Whether a worker should pass these bytes on undecoded: a baseline or progressive JPEG
    in a mode torchvision decodes to RGB as PIL does (not CMYK, whose conversions differ)."""
    return data[:3] == JPEG_MAGIC and mode in ("RGB", "L")


def error_reason(error: str | None) -> str:
    """The category of an error message (the part before the first colon)."""
    return (error or "").split(":", 1)[0] or "unknown"
