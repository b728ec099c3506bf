"""On-disk score sets: Parquet schema, atomic writes, meta.json and completion markers.

Layout (the contract in docs/scores.md):
    DIR/meta.json              what made the scores
    DIR/parts/NAME.parquet     one per input shard, rows in shard order
    DIR/done/NAME.json         completion marker, status "ok" or "failed"
    DIR/orphaned/NAME.parquet  a part with no marker and no input shard, set aside by score
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import NO_SPACE, JCError, first_line, no_space, some

SCHEMA_VERSION = 1
META_NAME = "meta.json"
PARTS_DIR = "parts"
DONE_DIR = "done"
ORPHANED_DIR = "orphaned"  # parts with no marker, set aside by score
_TMP_SUFFIX = ".tmp"
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


def score_schema(dim: int) -> pa.Schema:
    emb = pa.list_(pa.float16(), dim)
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("index", pa.int32(), nullable=False),
            pa.field("uid", pa.string()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("img_emb", emb),
            pa.field("txt_emb", emb),
            pa.field("clip_score", pa.float32()),
            pa.field("ref_loss", pa.float32()),
        ],
        metadata={"jestcurate.schema_version": str(SCHEMA_VERSION)},
    )


def embedding_column(values: np.ndarray, ok: np.ndarray, dim: int) -> pa.Array:
    full = np.zeros((ok.shape[0], dim), dtype=np.float16)
    full[ok] = values
    return pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1), type=pa.float16()),
        type=pa.list_(pa.float16(), dim),
        mask=pa.array(~ok),
    )


def score_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    full = np.zeros(ok.shape[0], dtype=np.float32)
    full[ok] = values
    return pa.array(full, type=pa.float32(), mask=~ok)


def part_table(
    shard: str,
    rows: list[dict[str, Any]],
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    clip_score: np.ndarray,
    ref_loss: np.ndarray,
    dim: int,
) -> pa.Table:
    """One shard's rows as a table. The arrays hold the rows whose status is "ok", in row order."""
    ok = np.array([r["status"] == "ok" for r in rows], dtype=bool)
    if int(ok.sum()) != len(img_emb):
        raise ValueError(f"{int(ok.sum())} ok rows but {len(img_emb)} embeddings")
    schema = score_schema(dim)
    columns = {
        name: pa.array([r[name] for r in rows], type=schema.field(name).type)
        for name in ("key", "index", "uid", "url", "caption", "sha256", "status", "error")
    }
    columns["shard"] = pa.array([shard] * len(rows), type=pa.string())
    columns["img_emb"] = embedding_column(img_emb, ok, dim)
    columns["txt_emb"] = embedding_column(txt_emb, ok, dim)
    columns["clip_score"] = score_column(clip_score, ok)
    columns["ref_loss"] = score_column(ref_loss, ok)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float16> column as an (n, D) float32 array; null rows become NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    start = column.offset * dim
    values = column.values[start : start + len(column) * dim]
    out = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    out[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def _tmp_name(path: Path) -> Path:
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live one's.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{_TMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` then rename over `path`: readers see the old file or the whole
    new one, never a partial one, whatever kills the process."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(exc, path) from None
        raise
    except Exception as exc:  # torch.save and others say "write failed", not ENOSPC
        if _nearly_full(path.parent):
            raise no_space(OSError(errno.ENOSPC, str(exc)), path) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_part(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write a part atomically, with Parquet page checksums (verified on every read); returns
    the fields its marker records to find damage later: byte size and sha256."""
    digest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
        found = file_digest(tmp)
        digest.update(part_bytes=found["bytes"], part_sha256=found["sha256"])

    atomic_write(path, write)
    return digest


def file_digest(path: Path) -> dict[str, Any]:
    """A file's byte size and sha256: what summaries record of their outputs."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": sha}


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


class PartFiles:
    """A score set's part files as the checks see them: names present, sizes, sha256. This is
    a local folder; remote.RemoteParts answers the same from one listing of a URL."""

    local = True

    def __init__(self, out: Path) -> None:
        self.out = out

    def path(self, name: str) -> Path:
        return self.out / PARTS_DIR / f"{name}.parquet"

    def names(self) -> set[str]:
        return {p.stem for p in (self.out / PARTS_DIR).glob("*.parquet")}

    def size(self, name: str) -> int | None:
        """The part's byte size, None if it is not there."""
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def sha256(self, name: str) -> str:
        return str(file_digest(self.path(name))["sha256"])

    def claimed(self, name: str) -> bool:
        """A claim file names it (scale/claims.py): a run may be writing it now."""
        return (self.out / "claims" / f"{name}.json").is_file()


def part_problem(
    files: PartFiles, name: str, marker: Mapping[str, Any] | None, full: bool = False
) -> str | None:
    """What is wrong with part `name` against its marker, or None: the size always, the sha256
    with `full`. Markers from before sizes were recorded are taken on trust."""
    size = files.size(name)
    if marker is None:
        if size is None:
            return None
        if files.claimed(name):
            return "orphaned, or still being written (no marker yet, and a score run claims it)"
        return "orphaned (a part with no marker in done/)"
    if size is None:
        wrote = marker.get("status") == "ok" or marker.get("part_bytes") is not None
        return "missing (its marker says it was written)" if wrote else None
    wanted = marker.get("part_bytes")
    if wanted is not None and size != wanted:
        return f"damaged ({size:,} bytes; its marker says {wanted:,})"
    sha = marker.get("part_sha256")
    if full and sha and files.sha256(name) != sha:
        return "damaged (its sha256 differs from its marker's)"
    return None


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by writers on this host that no longer run (killed mid-write)."""
    host = socket.gethostname()
    removed = 0
    for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
        parts = tmp.name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        if not _pid_alive(int(parts[2])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def dead_local_writer(host: str, pid: int) -> bool:
    """Whether a writer named by host and pid is gone: only knowable for this host."""
    return host == socket.gethostname() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def identity_mismatches(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Names and values of the identity fields on which two metas disagree."""
    out = []
    for field in IDENTITY_FIELDS:
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
    path = out / META_NAME
    if not path.exists():
        return
    try:
        existing = read_json(path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable ({exc}); remove it or use another --out") from None
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
        tmp = _tmp_name(path)
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


def read_markers(out: Path) -> dict[str, dict[str, Any]]:
    """Completion markers by shard name. An unreadable marker counts as absent (shard redone)."""
    markers = {}
    done = out / DONE_DIR
    if not done.is_dir():
        return markers
    for path in done.glob("*.json"):
        try:
            markers[path.stem] = read_json(path)
        except (OSError, ValueError):
            continue
    return markers


def unhashed_problem(path: Path, marker: Mapping[str, Any]) -> str | None:
    """A part whose marker predates recorded hashes, read in full: what fails (unreadable, or
    not the marker's row count), or None."""
    try:
        rows = pq.read_table(path, columns=["key"], page_checksum_verification=True).num_rows
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({first_line(exc)})"
    wanted = marker.get("counts", {}).get("samples")
    if wanted is not None and rows != wanted:
        return f"damaged ({rows:,} rows; its marker says {wanted:,})"
    return None


def forget_unmatched(
    out: Path,
    markers: dict[str, dict[str, Any]],
    names: list[str],
    full: bool = False,
    files: PartFiles | None = None,
) -> list[tuple[str, str]]:
    """Of `names`, the ok shards whose part no longer matches its marker (the size; with
    `full`, the sha256): their markers are removed, on disk and from `markers`, so a rerun
    redoes them. A marker another run rewrote meanwhile is left alone. Returns (name, problem).

    With `full`, a local part whose marker predates recorded hashes is read in full; if it
    reads whole, its size and sha256 are added to the marker, so later checks have them."""
    files = files or PartFiles(out)
    forgotten = []
    for name in names:
        marker = markers.get(name)
        if marker is None or marker.get("status") != "ok":
            continue
        problem = part_problem(files, name, marker, full)
        unhashed = full and problem is None and not marker.get("part_sha256")
        if unhashed and files.local and files.size(name) is not None:
            problem = unhashed_problem(files.path(name), marker)
            if problem is None and read_markers(out).get(name) == marker:
                marker.update({"part_bytes": files.size(name), "part_sha256": files.sha256(name)})
                write_json_atomic(out / DONE_DIR / f"{name}.json", marker)
                continue
        if problem is None or read_markers(out).get(name) != marker:
            continue
        (out / DONE_DIR / f"{name}.json").unlink(missing_ok=True)
        markers.pop(name)
        forgotten.append((name, problem))
    return forgotten


def set_aside_strays(
    out: Path, markers: Mapping[str, Any], names: set[str], live: Callable[[str], bool]
) -> list[str]:
    """Move parts with no marker whose shard is none of `names` (so no rerun of these inputs
    would redo them) from parts/ to orphaned/, where readers do not look, unless `live(name)`
    says a run holds a claim on it. Returns the names moved."""
    moved = []
    for name in sorted(PartFiles(out).names() - set(markers) - names):
        # The claim is checked before the marker: a writer renames its part, then writes the
        # marker, then releases the claim, so a part seen unclaimed here has its marker by now.
        if live(name) or (out / DONE_DIR / f"{name}.json").exists():
            continue
        target = out / ORPHANED_DIR / f"{name}.parquet"
        target.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(out / PARTS_DIR / f"{name}.parquet", target)
            moved.append(name)
    return moved


def marker_settles(out: Path, name: str, since: float) -> bool:
    """Whether shard `name` needs no more work in a run that began at `since`: it is done, or
    it failed in an attempt that started during this run (a broken shard is retried by the
    next run, not again and again by this one)."""
    path = out / DONE_DIR / f"{name}.json"
    try:
        marker = read_json(path)
        mtime = path.stat().st_mtime
    except (OSError, ValueError):
        return False
    return marker.get("status") == "ok" or mtime >= since


def repair_hint(where: str, meta: Mapping[str, Any]) -> str:
    """The command that rewrites a damaged or missing part of the set at `where`, in words."""
    made = "import" if meta.get("imported") else "score"
    return f"rerun the `jestcurate {made}` that wrote {where} to redo it"


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

    def problems(self, full: bool = False) -> list[tuple[str, str]]:
        """(part name, what is wrong) for every part that does not match its marker, and every
        ok marker whose part is gone."""
        markers = read_markers(self.path)
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
        for name, marker in sorted(read_markers(self.path).items()):
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
    path = out / summary_name
    if not path.exists():
        return None
    try:
        summary = read_json(path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable ({exc}); remove it or use another --out") from None
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
