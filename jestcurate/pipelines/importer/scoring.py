"""A part from embeddings: normalised, scored as `score` scores, written, then its marker."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from jestcurate import __version__
from jestcurate.io.schema import part_table
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.math.scoring import clip_scores, example_losses


def _normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as float32, and which rows were usable (finite, non-zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norm[ok, None]
    return out, ok


def score_and_write(
    writer: ScoreSetWriter,
    name: str,
    shard: str,
    rows: list[dict[str, Any]],
    img: np.ndarray,
    txt: np.ndarray,
    params: dict[str, Any],
    began: float,
    input_bytes: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Normalise, score and write one part and, last, its marker. Rows whose status is still
    "ok" need usable embeddings (`img`, `txt` hold one row per entry of `rows`)."""
    img, img_ok = _normalised(img)
    txt, txt_ok = _normalised(txt)
    for i, row in enumerate(rows):
        if row["status"] == "ok" and not (img_ok[i] and txt_ok[i]):
            row.update(status="error", error="missing embedding: zero or not finite")
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)
    img16 = torch.from_numpy(img[ok]).half()
    txt16 = torch.from_numpy(txt[ok]).half()
    clip = clip_scores(img16, txt16)
    loss = example_losses(img16, txt16, params["logit_scale"], params["logit_bias"], params["loss"])
    dim = params["embed_dim"]
    part = part_table(shard, rows, img16.numpy(), txt16.numpy(), clip.numpy(), loss.numpy(), dim)
    digest = writer.write_part(name, part)
    reasons = Counter(r["error"].split(":")[0] for r in rows if r["status"] != "ok")
    errors = int((~ok).sum())
    marker = {
        "shard": shard,
        "name": name,
        "status": "ok",
        "error": None,
        "counts": {"samples": len(rows), "ok": len(rows) - errors, "errors": errors},
        "error_reasons": dict(sorted(reasons.items())),
        "seconds": round(time.time() - began, 3),
        "input_bytes": input_bytes,
        **digest,
        **(extra or {}),
        "tool_version": __version__,
    }
    writer.mark(name, marker)  # last: the part is whole
    return marker
