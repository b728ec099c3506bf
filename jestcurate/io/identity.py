"""A score set's identity, its meta.json: what made the scores, created once by whichever task
comes first, and compared before a run may add parts."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.files import read_existing_json, tmp_name
from jestcurate.io.schema import META_NAME

# The fields of meta.json that must agree before a run may add parts to an existing score set.
IDENTITY_FIELDS = (
    "schema_version",
    "role",
    "model",
    "model_config_sha256",
    "pretrained_sha256",
    "init_seed",
    "precision",
    "decode",
)

# The fields that say which model made the embeddings: two score sets agreeing on these hold
# embeddings of one space (precision and decoding move them only by rounding).
MODEL_FIELDS = ("model", "model_config_sha256", "pretrained_sha256", "init_seed")


def identity_mismatches(
    existing: Mapping[str, Any],
    wanted: Mapping[str, Any],
    fields: tuple[str, ...] = IDENTITY_FIELDS,
) -> list[str]:
    """Names and values of the identity `fields` on which two metas disagree."""
    out = []
    for field in fields:
        if field == "model" and existing.get("model_config_sha256"):
            continue  # a config file is identified by its content, not its name
        if existing.get(field) == wanted.get(field):
            continue
        if field == "pretrained_sha256":  # the files (or tags), not only their hashes
            there, now = (_weights(meta) for meta in (existing, wanted))
            out.append(f"pretrained: {there} there, {now} now")
        else:
            out.append(f"{field}: {existing.get(field)!r} there, {wanted.get(field)!r} now")
    return out


def _weights(meta: Mapping[str, Any]) -> str:
    if meta.get("pretrained") is None:
        return "random weights"
    return f"{meta['pretrained']} (sha256 {str(meta.get('pretrained_sha256'))[:12]})"


def check_meta(out: Path, wanted: Mapping[str, Any]) -> None:
    """Refuse to add to a score set made by a different model, checkpoint, precision or role."""
    existing = read_existing_json(out / META_NAME)
    if existing is None:
        return
    diff = identity_mismatches(existing, wanted)
    if diff:
        raise JCError(
            f"{out} holds scores made differently ({'; '.join(diff)}); "
            "use another --out, or the options it was made with"
        )


def create_meta(out: Path, meta: Mapping[str, Any]) -> None:
    """Create meta.json if no task has yet; if one has, check that it agrees with ours.

    os.link fails if the target exists, so of N tasks starting together exactly one creates it.
    """
    path = out / META_NAME
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    check_meta(out, meta)
