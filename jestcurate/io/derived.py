"""Outputs derived from score sets (selections, dedup outputs): reading them, recording and
checking their files' sizes and hashes, and telling a finished output made from the same
inputs and parameters from a different one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import JCError, first_line, some
from jestcurate.io.files import file_digest, read_existing_json


def file_digests(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """file_digest of each named file in `directory` that exists."""
    return {name: file_digest(directory / name) for name in names if (directory / name).is_file()}


def digest_problem(path: Path, recorded: Mapping[str, Any], full: bool = True) -> str | None:
    """A file against its recorded size (and, with `full`, sha256), or None if it matches."""
    if not path.is_file():
        return "missing"
    size, wanted = path.stat().st_size, recorded.get("bytes")
    if size != wanted:
        return f"damaged ({size:,} bytes; {wanted} recorded)"
    if full and file_digest(path)["sha256"] != recorded.get("sha256"):
        return "damaged (its sha256 differs from the recorded one)"
    return None


def read_output(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A selection's manifest or a dedup output, page checksums verified: damage is one line
    naming the file and the repair, not a traceback."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise JCError(
            f"{path} is unreadable ({first_line(exc)}); rerun the command that wrote it "
            f"(`jestcurate verify {path.parent}` lists what is damaged)"
        ) from None


def finished_output(
    out: Path,
    summary_name: str,
    product: str,
    identity: Mapping[str, Any],
    what: str,
    instead: str = "use another --out",
) -> dict[str, Any] | None:
    """Rerun identity for a derived output (a selection, a dedup): the summary of a finished
    output made from the same inputs and parameters, None if there is none yet, and an error if
    OUT holds a different one, naming each differing field with both values and ending in
    `instead`. `product` is the file whose presence means finished."""
    summary = read_existing_json(out / summary_name)
    if summary is None:
        return None
    differs = value_differences(summary, identity)
    if differs:
        raise JCError(f"{out} holds a different {what} ({some(differs)}); {instead}")
    return summary if (out / product).exists() else None


def value_differences(
    existing: Mapping[str, Any], wanted: Mapping[str, Any], at: str = ""
) -> list[str]:
    """Each field of `wanted` whose value `existing` does not share, named by its dotted path
    with both values: "parameters.ratio: 0.2 there, 0.25 now". Below the top level (whose
    other fields are the output's own: counts, files) a field either side lacks differs too."""
    keys = list(wanted) + ([k for k in existing if k not in wanted] if at else [])
    found = []
    for key in keys:
        old, new = existing.get(key), wanted.get(key)
        name = f"{at}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += value_differences(old, new, f"{name}.")
        elif old != new:
            found.append(f"{name}: {_shown(old)} there, {_shown(new)} now")
    return found


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else f"{text[:77]}..."
