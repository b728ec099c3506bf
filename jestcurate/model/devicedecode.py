"""The decoders of `score --decode`: pil (open_clip's own transform on PIL images), pil-draft
(PIL with JPEG DCT-domain downscaling first) and torch: JPEGs decoded in batches by torchvision
and preprocessed with torch's antialiased resize, on a CUDA device (nvJPEG) or, with a CPU
model, in the decoding workers.

For torch, workers still parse every sample and read each JPEG's header (size limit, colour
mode); other formats (PNG, WebP, CMYK JPEGs) are decoded and preprocessed by PIL as usual and
join the batch as tensors. The torch pipeline reproduces open_clip's standard eval transform
(shorter-side Resize with antialiasing, CenterCrop, scale to [0, 1], Normalize) on uint8
tensors: not bit-identical to PIL, but within float rounding in the embeddings (cosine 1.0000
on photo crops, docs/benchmarks.md) and about twice as cheap on a CPU. `--decode auto`, the
default, uses it everywhere it can (PIL after a failed CUDA probe or for a transform it cannot
copy), and an existing score set keeps its own decoder; a set records which decoder made it
and refuses to mix them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jestcurate.errors import JCError

log = logging.getLogger(__name__)

DECODERS = ("auto", "pil", "pil-draft", "torch")


def draft_size(transform: Any) -> int:
    """For `--decode pil-draft`: the side a JPEG may be reduced to before the transform runs,
    the largest side its Resize asks for (so DCT scaling never goes below the resize target);
    refuses a transform without a Resize."""
    from torchvision import transforms as T

    resize = next(
        (t for t in getattr(transform, "transforms", []) if isinstance(t, T.Resize)), None
    )
    if resize is None:
        raise JCError("--decode pil-draft needs a transform that resizes; use --decode pil")
    size = resize.size
    return int(size) if isinstance(size, int) else int(max(size))


@dataclass(frozen=True)
class DevicePreprocess:
    size: int
    crop: tuple[int, int]
    interpolation: Any  # torchvision InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Any) -> DevicePreprocess:
        """Read the parameters of open_clip's standard eval transform; refuse anything else."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        names = [type(t).__name__ for t in steps]
        known = {"Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "ToTensor"}
        known |= {"Normalize", "_convert_to_rgb", "function"}
        resize = next((t for t in steps if isinstance(t, T.Resize)), None)
        crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
        norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
        if (
            resize is None
            or crop is None
            or norm is None
            or not set(names) <= known
            or not isinstance(resize.size, int | list | tuple)
        ):
            raise JCError(
                "--decode torch reproduces open_clip's Resize/CenterCrop/Normalize transform; "
                f"this model's is {' -> '.join(names)}; use --decode pil"
            )
        size = resize.size if isinstance(resize.size, int) else resize.size[0]
        if not isinstance(resize.size, int) and len(resize.size) != 1:
            raise JCError("--decode torch needs a shorter-side Resize; use --decode pil")
        return cls(
            size=int(size),
            crop=(int(crop.size[0]), int(crop.size[1])),
            interpolation=resize.interpolation,
            mean=tuple(float(m) for m in norm.mean),
            std=tuple(float(s) for s in norm.std),
        )

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        image = F.resize(image, [self.size], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, list(self.crop))

    def batch(
        self, items: Sequence[bytes | torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
        """Preprocessed images for `items` (JPEG bytes, or tensors a worker already made), in
        order, on `device`; and (position, error) for the JPEGs that failed to decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, item in enumerate(items) if isinstance(item, bytes)]
        decoded: dict[int, torch.Tensor] = {}
        bad: list[tuple[int, str]] = []
        if jpegs:
            data = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in jpegs]
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                decoded = dict(zip(jpegs, images, strict=True))
            except RuntimeError:  # one bad JPEG fails the batch call: find it one at a time
                for i, d in zip(jpegs, data, strict=True):
                    try:
                        decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                    except RuntimeError as exc:
                        message = str(exc).strip().splitlines()
                        bad.append((i, f"image decode failed: {message[0] if message else exc}"))
        # Normalised as one batch, not image by image: the same float operations on the same
        # values (so the same result), without a few tensor ops of overhead per sample.
        order = sorted(decoded)
        pixels = None
        if order:
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            pixels = torch.stack([self._one(decoded[i]) for i in order]).float().div_(255)
            pixels = pixels.sub_(mean).div_(std)
            if len(order) == len(items):
                return pixels, bad
        ready = dict(zip(order, pixels if pixels is not None else [], strict=True))
        out = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                out.append(item.to(device, non_blocking=True))
            elif i in ready:
                out.append(ready[i])
        return (torch.stack(out) if out else None), bad


def _probe(device: torch.device) -> str | None:
    """Decode a tiny JPEG on `device`; None if that works, else why not."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except Exception as exc:  # a missing nvJPEG, an old driver: fall back, do not fail the run
        return f"{type(exc).__name__}: {exc}"
    return None


def supports_torch_decode(transform: Any) -> bool:
    """Whether DevicePreprocess reproduces this transform (open_clip's standard eval one)."""
    try:
        DevicePreprocess.from_transform(transform)
    except JCError:
        return False
    return True


def resolve_decode(decode: str, device: torch.device, existing: str | None = None) -> str:
    """`auto` becomes the decoder of the score set being added to (`existing`); else torch on
    the CPU (run in the decoding workers: as exact as PIL's path to float rounding and about
    twice as cheap, docs/benchmarks.md) and on a CUDA device whose JPEG decoder works; pil
    where that probe fails. (score falls back to pil for a transform torch cannot copy.)"""
    if decode != "auto":
        return decode
    if existing is not None:
        return existing
    if device.type != "cuda":
        return "torch"
    failure = _probe(device)
    if failure is not None:
        log.warning("decoding JPEGs on %s does not work (%s); decoding with PIL", device, failure)
        return "pil"
    return "torch"
