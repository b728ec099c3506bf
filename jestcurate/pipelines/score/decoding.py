"""score's decoding choice, made once per run and passed on as one Decoding: the decoder the
score set records (pil, pil-draft or torch, model/devicedecode.py) and, for torch, whether the
decoding workers or the main process runs the batched decode. It is planned before the model
loads (to refuse a mismatched score set in seconds) and settled once the model is loaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from jestcurate.io.store import META_NAME, read_json
from jestcurate.model.devicedecode import (
    DevicePreprocess,
    draft_size,
    resolve_decode,
    supports_torch_decode,
)
from jestcurate.model.openclip import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """How a run turns image bytes into model input (it pickles: workers receive it)."""

    name: str = "pil"  # as meta.json records it: pil, pil-draft or torch
    draft: int | None = None  # pil-draft: JPEGs DCT-scaled towards this side
    batched: DevicePreprocess | None = None  # torch: the batched decode and transform
    # torch with a CPU model and decoding workers: they run `batched`, so it spreads over the
    # workers instead of taking the model's threads; otherwise the main process runs it on the
    # model's device.
    in_workers: bool = False

    @property
    def defers_jpeg(self) -> bool:
        """Workers keep JPEGs undecoded (header checked) for the batched torch decode."""
        return self.name == "torch"


def existing_decoder(out: Path) -> str | None:
    """The decoder of the score set at `out`, if there is one (absent from meta.json: pil), so
    that `--decode auto` carries on as the set was begun, whatever the default is now."""
    try:
        meta = read_json(out / META_NAME)
    except (OSError, ValueError):  # none yet; an unreadable one is check_meta's to report
        return None
    return str(meta.get("decode", "pil"))


def planned_decoder(requested: str, device: torch.device, out: Path) -> str:
    """The decoder, before the model loads (so a mismatched score set is refused in seconds):
    --decode, or for auto the score set's own, else the device's (resolve_decode)."""
    return resolve_decode(requested, device, existing_decoder(out))


def choose_decoding(requested: str, planned: str, model: LoadedModel, workers: int) -> Decoding:
    """The run's Decoding once its model is loaded, before anything is written: auto falls back
    to PIL for a transform the torch decoding does not reproduce; an explicit --decode torch or
    pil-draft that cannot follow the transform is refused."""
    name = planned
    if requested == "auto" and planned == "torch" and not supports_torch_decode(model.preprocess):
        log.info("this model's transform has no torch equivalent here: decoding with PIL")
        name = "pil"
    if name == "pil-draft":
        return Decoding(name, draft=draft_size(model.preprocess))
    if name == "torch":
        batched = DevicePreprocess.from_transform(model.preprocess)
        in_workers = model.device.type == "cpu" and workers > 0  # where the cores are
        return Decoding(name, batched=batched, in_workers=in_workers)
    return Decoding(name)
