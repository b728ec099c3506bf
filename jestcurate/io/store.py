"""Score sets opened for reading: ScoreSet (meta.json, parts, markers) and open_score_set, the
check every reader runs first, and a set's fingerprint for the outputs derived from it.

The rest of a score set lives beside this module, one idea each: its layout and part schema
(schema.py), its identity in meta.json (identity.py), its parts against their markers
(integrity.py), atomic files (files.py) and derived outputs (derived.py). Their names are
importable from here too, as they were when this module held them all.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import JCError, first_line
from jestcurate.io.derived import (
    digest_problem,
    file_digests,
    finished_output,
    read_output,
    value_differences,
)
from jestcurate.io.files import (
    atomic_write,
    dead_local_writer,
    file_digest,
    read_json,
    remove_stale_temps,
    write_json_atomic,
)
from jestcurate.io.identity import (
    IDENTITY_FIELDS,
    MODEL_FIELDS,
    check_meta,
    create_meta,
    identity_mismatches,
)
from jestcurate.io.integrity import (
    PartFiles,
    forget_unmatched,
    marker_settles,
    part_problem,
    read_markers,
    repair_hint,
    set_aside_strays,
    unhashed_problem,
)
from jestcurate.io.schema import (
    DONE_DIR,
    META_NAME,
    ORPHANED_DIR,
    PARTS_DIR,
    SCHEMA_VERSION,
    embedding_column,
    embedding_matrix,
    part_table,
    score_column,
    score_schema,
    write_part,
)

__all__ = [
    "DONE_DIR",
    "IDENTITY_FIELDS",
    "META_NAME",
    "ORPHANED_DIR",
    "PARTS_DIR",
    "SCHEMA_VERSION",
    "PartFiles",
    "ScoreSet",
    "atomic_write",
    "check_meta",
    "create_meta",
    "dead_local_writer",
    "digest_problem",
    "embedding_column",
    "embedding_matrix",
    "file_digest",
    "file_digests",
    "fingerprint",
    "finished_output",
    "forget_unmatched",
    "identity_mismatches",
    "marker_settles",
    "open_score_set",
    "part_problem",
    "part_table",
    "read_json",
    "read_markers",
    "read_output",
    "remove_stale_temps",
    "repair_hint",
    "require_selection_images",
    "score_column",
    "score_schema",
    "set_aside_strays",
    "unhashed_problem",
    "value_differences",
    "write_json_atomic",
    "write_part",
]


class ScoreSet:
    """A score set opened for reading: its meta.json, its parts (sorted by name) and markers."""

    def __init__(self, path: Path, meta: dict[str, Any], parts: list[Path]) -> None:
        self.path = path
        self.meta = meta
        self.parts = parts

    @property
    def repair(self) -> str:
        """The command that rewrites a damaged or missing part, in words."""
        return repair_hint(str(self.path), self.meta)

    @functools.cached_property
    def markers(self) -> dict[str, dict[str, Any]]:
        """The completion markers by shard name, read once: the set as it was opened."""
        return read_markers(self.path)

    def problems(self, full: bool = False) -> list[tuple[str, str]]:
        """(part name, what is wrong) for every part that does not match its marker, and every
        ok marker whose part is gone."""
        markers = self.markers
        names = sorted({p.stem for p in self.parts} | set(markers))
        found = []
        files = PartFiles(self.path)
        for name in names:
            problem = part_problem(files, name, markers.get(name), full)
            if problem:
                found.append((name, problem))
        return found

    def check(self) -> None:
        """The cheap check every reader runs first: sizes against markers, parts present."""
        found = self.problems()
        if found:
            name, problem = found[0]
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise JCError(
                f"{self.path}: part {name} is {problem}{more}; {self.repair}, or see "
                f"`jestcurate verify {self.path}`"
            )

    def failed_shards(self) -> list[str]:
        """One line per shard whose scoring failed (a truncated tar, say): only its rows read
        before the failure are in the set."""
        found = []
        for name, marker in sorted(self.markers.items()):
            if marker.get("status") == "ok":
                continue
            found.append(f"{name}: {marker.get('error') or 'failed, no reason recorded'}")
        return found

    @property
    def role(self) -> str:
        return str(self.meta.get("role"))

    @property
    def dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def scale(self) -> float:
        return float(self.meta["logit_scale"])

    @property
    def bias(self) -> float | None:
        bias = self.meta.get("logit_bias")
        return None if bias is None else float(bias)

    @property
    def kind(self) -> str:
        return str(self.meta["loss"])

    @property
    def has_images(self) -> bool:
        """False for a set made by `jestcurate import` without shards: rows are not samples of
        WebDataset tars, so there is nothing to export, load or show."""
        return self.meta.get("images", True) is not False

    def require_images(self, what: str) -> None:
        if not self.has_images:
            raise JCError(
                f"{self.path} was imported from embeddings, not scored from WebDataset shards: "
                f"its rows have no images, so {what} cannot read them"
            )

    def part_names(self) -> list[str]:
        return [p.stem for p in self.parts]

    def read_part(self, name: str, columns: list[str]) -> pa.Table:
        path = self.path / PARTS_DIR / f"{name}.parquet"
        try:  # page checksums: damage inside a data page fails here, not as wrong numbers
            table = pq.read_table(path, columns=columns, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise JCError(f"part {path} is unreadable ({first_line(exc)}); {self.repair}") from None
        for column in ("img_emb", "txt_emb"):
            if column in columns:
                width = table.schema.field(column).type.list_size
                if width != self.dim:
                    raise JCError(
                        f"{path} has {width}-wide embeddings but {self.path}/meta.json says "
                        f"embed_dim {self.dim}"
                    )
        return table


def require_selection_images(summary: Mapping[str, Any], what: str) -> None:
    """Refuse to read samples for a selection made from a set without images: by its summary
    (selections since the `images` output field), else by its reference's meta.json."""
    if summary.get("outputs", {}).get("images") is False:
        reference = summary["inputs"]["reference"]["path"]
        raise JCError(
            f"this selection was made from {reference}, imported from embeddings: its rows "
            f"have no images, so {what} cannot read them"
        )
    reference = Path(summary["inputs"]["reference"]["path"])
    if (reference / META_NAME).is_file():
        open_score_set(reference, check=False).require_images(what)


def open_score_set(path: Path, role: str | None = None, check: bool = True) -> ScoreSet:
    """Open and check a score set (with `check`, every part against its marker's size); every
    problem is a one-line JCError."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        what = "does not exist" if not path.exists() else "has no meta.json"
        raise JCError(f"{path} is not a score set ({what}); make one with `jestcurate score`")
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{meta_path} is unreadable: {exc}") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise JCError(
            f"{path} has score-set schema version {version}; this jestcurate reads "
            f"version {SCHEMA_VERSION}"
        )
    missing = [k for k in ("embed_dim", "logit_scale", "loss", "role") if k not in meta]
    if missing:
        raise JCError(f"{meta_path} lacks {', '.join(missing)}")
    if role is not None and meta["role"] != role:
        raise JCError(
            f"{path} was scored with role {meta['role']!r}, but a {role} score set is needed here"
        )
    parts = sorted((path / PARTS_DIR).glob("*.parquet"))
    if not parts:
        raise JCError(f"{path} has no parts yet; run `jestcurate score` into it first")
    scores = ScoreSet(path, meta, parts)
    if check:
        scores.check()
    return scores


def fingerprint(s: ScoreSet) -> dict[str, Any]:
    """What identifies a score set's content for a derived output (not its timings)."""
    digest = hashlib.sha256()
    rows = 0
    for part in s.parts:
        try:
            n = pq.ParquetFile(part).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise JCError(f"part {part} is unreadable ({exc}); {s.repair}") from None
        rows += n
        digest.update(f"{part.name}:{n}\n".encode())
    keys = ("role", "model", "model_config_sha256", "pretrained_sha256", "init_seed", "precision")
    return {
        "path": str(s.path.resolve()),
        **{k: s.meta.get(k) for k in keys},
        "parts": len(s.parts),
        "rows": rows,
        "parts_sha256": digest.hexdigest(),
    }


def model_difference(pool: ScoreSet, other: ScoreSet) -> str | None:
    """How `other`'s embeddings differ in model from `pool`'s ("model: ... there, ... now",
    or the embedding widths), or None when both come from one model: what decontaminate's
    and select's target sets must share with the pool."""
    differs = identity_mismatches(pool.meta, other.meta, MODEL_FIELDS)
    if differs or other.dim != pool.dim:
        return "; ".join(differs) or f"embed_dim: {pool.dim} there, {other.dim} here"
    return None
