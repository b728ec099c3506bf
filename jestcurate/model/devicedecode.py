"""`score --decode torch`: JPEGs decoded in batches by torchvision on the model's device (nvJPEG
on CUDA) and preprocessed there, so CPU decoding stops capping throughput for small models.

Workers still parse every sample and read each JPEG's header (size limit, colour mode), which is
cheap; they hand over the compressed bytes instead of pixels. Other formats (PNG, WebP, CMYK
JPEGs) are decoded and preprocessed by PIL in the workers as usual and join the batch as tensors.

The device pipeline reproduces open_clip's standard eval transform (shorter-side Resize with
antialiasing, CenterCrop, scale to [0, 1], Normalize) on uint8 tensors. It is not bit-identical
to PIL: the embeddings agree closely but not exactly (docs/benchmarks.md). `--decode auto`, the
default, uses it on CUDA (after a probe decode on the device succeeds) and PIL on the CPU, the
way the default precision differs by device; a score set records which decoder made it and
refuses to mix them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jestcurate.errors import JCError

log = logging.getLogger(__name__)

DECODERS = ("auto", "pil", "torch")


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
        mean = torch.tensor(self.mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.std, device=device).view(3, 1, 1)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                out.append(item.to(device, non_blocking=True))
            elif i in decoded:
                pixels = self._one(decoded[i]).float().div_(255)
                out.append(pixels.sub_(mean).div_(std))
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


def resolve_decode(decode: str, device: torch.device) -> str:
    """`auto` becomes torch on a CUDA device whose JPEG decoder works, else pil."""
    if decode != "auto":
        return decode
    if device.type != "cuda":
        return "pil"
    failure = _probe(device)
    if failure is not None:
        log.warning("decoding JPEGs on %s does not work (%s); decoding with PIL", device, failure)
        return "pil"
    return "torch"
