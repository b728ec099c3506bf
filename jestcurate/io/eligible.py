"""The eligible rows of a score set (or of a reference and learner pair), copied into a flat
on-disk cache: fixed-width .npy columns read back by row id with positioned reads, so memory
does not grow with the corpus (docs/architecture.md says why not Arrow or memory maps).

Two passes over the parts: `scan` reads what eligibility needs (the small columns, and the
caption or image embeddings only when a filter reads them), counts, measures the text columns
and keeps each part's eligible rows as a bitmask (1 bit per row, in memory); `fill_cache`
copies the rows those bitmasks name, so the filters run once per row and both passes agree by
construction. select and the online selector share both, so they see the same rows under the
same ids. The cache's columns are declared
here once (`layout`), for the cache and for select's scatter buckets (io/scatter.py) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jestcurate.errors import JCError
from jestcurate.io.notes import Notes
from jestcurate.io.rowcache import RowCache, column_writers, embedding_rows, fixed_bytes
from jestcurate.io.store import ScoreSet

# The row cache's columns: where each row is (part id, index and key in its shard), its uid, its
# scores, its dedup cluster (with --balance-clusters) and each model's embeddings.
PART, INDEX, KEY, UID = "part", "index", "key", "uid"
CLIP_SCORE, REF_LOSS, LEARNER_LOSS, CLUSTER = "clip_score", "ref_loss", "learner_loss", "cluster"
REF_IMG, REF_TXT, LEARNER_IMG, LEARNER_TXT = "ref_img", "ref_txt", "learner_img", "learner_txt"
EMBEDDINGS = {"ref": (REF_IMG, REF_TXT), "learner": (LEARNER_IMG, LEARNER_TXT)}


def score_columns(learner: bool) -> list[str]:
    """The cache's score columns: clip_score, ref_loss and, with a learner, learner_loss."""
    return [CLIP_SCORE, REF_LOSS, *([LEARNER_LOSS] if learner else [])]


def layout(
    key_width: int,
    uid_width: int,
    ref: ScoreSet,
    learner: ScoreSet | None,
    cluster: bool,
    embeddings: bool,
) -> np.dtype:
    """The cache's columns as one record: the cache holds one .npy per field, a scatter bucket
    whole records."""
    columns: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [
        (PART, "<i4"),
        (INDEX, "<i4"),
        (KEY, f"S{key_width}"),
        (UID, f"S{uid_width}"),
        (CLIP_SCORE, "<f4"),
        (REF_LOSS, "<f4"),
    ]
    if learner is not None:
        columns.append((LEARNER_LOSS, "<f4"))
    if cluster:
        columns.append((CLUSTER, "<i4"))
    if embeddings:
        columns += [(name, "<f2", (ref.dim,)) for name in EMBEDDINGS["ref"]]
        if learner is not None:
            columns += [(name, "<f2", (learner.dim,)) for name in EMBEDDINGS["learner"]]
    return np.dtype(columns)


@dataclass
class Counts:
    """Rows of the score set, what made ok rows ineligible (each filter counts only the rows
    the filters before it left), and the eligible rows. The fields are always reported; the
    other filters (select's caption, language and target-set filters) by name in `filtered`,
    only when given."""

    rows: int = 0
    errors: int = 0
    below_min_clip_score: int = 0
    duplicates: int = 0
    excluded: int = 0  # ok rows an exclusion (select --exclude: decontaminate) made ineligible
    eligible: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # by filter name, in filter order

    def add(self, name: str, n: int) -> None:
        if name in COUNTS:
            setattr(self, name, getattr(self, name) + n)
        else:
            self.filtered[name] = self.filtered.get(name, 0) + n

    def as_dict(self) -> dict[str, int]:
        """As summary.json's counts: the fields, each other filter's count, then eligible."""
        fixed = {name: getattr(self, name) for name in COUNTS if name != "eligible"}
        return {**fixed, **self.filtered, "eligible": self.eligible}

    @classmethod
    def from_summary(cls, counts: dict[str, Any], filtered: tuple[str, ...]) -> Counts:
        """Back from summary.json's counts (whose other fields are the selection's own), with
        the `filtered` counts in this order."""
        return cls.of((*COUNTS, *filtered), [counts.get(n) or 0 for n in (*COUNTS, *filtered)])

    @property
    def removed(self) -> int:
        """The ok rows some filter removed."""
        return (
            self.below_min_clip_score
            + self.duplicates
            + self.excluded
            + sum(self.filtered.values())
        )

    @classmethod
    def of(cls, names: tuple[str, ...], values: list[int]) -> Counts:
        counts = cls()
        for name, value in zip(names, values, strict=True):
            counts.add(name, int(value))
        return counts


COUNTS = tuple(f.name for f in fields(Counts) if f.name != "filtered")
MIN_CLIP_SCORE = "min_clip_score"  # --min-clip-score's reason in select's ledger


@dataclass(frozen=True)
class Verdict:
    """A filter's verdict on one part's rows: which it removes and why, as data for select's
    ledger. Each of reason, detail and threshold is one value for every row or an array over
    the part's rows (read at the removed rows only); value is an array or None."""

    removed: np.ndarray
    reason: str | np.ndarray | None = None  # None: the filter's name
    detail: str | np.ndarray | None = None  # which bound, which language, which kind
    value: np.ndarray | None = None  # the row's value the filter compared (NaN: none)
    threshold: float | np.ndarray | None = None  # ... and what it was compared with


class RowFilter(Protocol):
    """A filter of the rows of a score-set part (--min-clip-score, --dedup, --exclude and
    select's caption, language and target-set filters: pipelines/select/filters). It sees the
    reference's part table, holding at least `columns`, and the rows still in play
    (`candidate`, ok and left by the filters before it); rows outside `candidate` it may
    skip. A filter whose rows point at another row (a duplicate's kept row, an evaluation
    item) also has `others(shard, n)`: that row's shard, key and set, over the part's n rows."""

    name: str  # its count in Counts and summary.json
    fate: str  # the ledger's fate of the rows it removes: filtered, duplicate or excluded
    columns: tuple[str, ...]  # the part columns it reads

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict: ...


@dataclass(frozen=True)
class Filters:
    """What makes an ok row ineligible, in this order: a low clip_score, being a duplicate
    (dedup), being excluded (decontaminate: a near copy of an evaluation image), then each
    of `rows` (select's other filters)."""

    min_clip: float | None = None
    dedup: Any = None  # a RowFilter: the rows a dedup output dropped
    clusters: dict[str, np.ndarray] | None = None  # shard -> dedup cluster by index
    exclude: Any = None  # a RowFilter: the rows decontamination outputs name
    rows: tuple[Any, ...] = ()  # RowFilter instances

    def chain(self) -> list[RowFilter]:
        """Every filter as a RowFilter, in the order they apply."""
        return [
            MinClip(self.min_clip),
            self.dedup or Nothing("duplicates", "duplicate"),
            self.exclude or Nothing("excluded", "excluded"),
            *self.rows,
        ]

    def pointing(self) -> dict[str, Any]:
        """The filters whose rows point at another row, by the fate of those rows."""
        return {f.fate: f for f in self.chain() if hasattr(f, "others")}

    @property
    def columns(self) -> tuple[str, ...]:
        """The part columns select's other filters read (beyond what eligibility reads)."""
        return tuple(dict.fromkeys(c for f in self.rows for c in f.columns))

    @property
    def names(self) -> tuple[str, ...]:
        """The counts, in order (the scatter's counts.npy columns)."""
        extra = tuple(f.name for f in self.rows)
        return (*COUNTS[:-1], *extra, COUNTS[-1])


@dataclass(frozen=True)
class MinClip:
    """--min-clip-score: rows whose clip_score is below it (or null; a NaN is not below)."""

    threshold: float | None
    name: str = "below_min_clip_score"
    fate: str = "filtered"
    columns: tuple[str, ...] = ("clip_score",)

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        if self.threshold is None:
            return Verdict(np.zeros(len(candidate), dtype=bool))
        column = table.column("clip_score")
        # as select always did: a null clip_score is below any threshold, a NaN one is not
        low = column.fill_null(-np.inf).to_numpy() < self.threshold
        clip = column.fill_null(np.nan).to_numpy().astype(np.float32)  # the ledger's value
        return Verdict(low, MIN_CLIP_SCORE, None, clip, self.threshold)


@dataclass(frozen=True)
class Nothing:
    """A filter not given (--dedup, --exclude): removes no row, counts 0."""

    name: str
    fate: str
    columns: tuple[str, ...] = ()

    def __call__(self, table: pa.Table, shard: str, candidate: np.ndarray) -> Verdict:
        return Verdict(np.zeros(len(candidate), dtype=bool))


def identities(part: str, table: pa.Table) -> np.ndarray:
    """Each row's identity for partitioning array tasks: its uid, else "PART/KEY" (bytes)."""
    keys = table.column("key").to_pylist()
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else [None] * len(keys)
    values = [u.encode() if u else f"{part}/{k}".encode() for u, k in zip(uids, keys, strict=True)]
    return np.array(values, dtype=bytes) if values else np.zeros(0, dtype="S1")


def check_same_parts(ref: ScoreSet, learner: ScoreSet | None) -> None:
    """The learner joins the reference part by part: both must cover the same shards."""
    if learner is None:
        return
    ours, theirs = set(ref.part_names()), set(learner.part_names())
    if ours != theirs:
        raise JCError(
            f"learner and reference cover different shards ({len(ours - theirs)} only in "
            f"the reference, {len(theirs - ours)} only in the learner): score both from "
            "the same inputs"
        )


def join_learner(name: str, ref: pa.Table, learner: pa.Table | None) -> None:
    """...and row by row: the same samples in the same order in each part."""
    if learner is None:
        return
    if ref.num_rows != learner.num_rows or not ref.column("key").equals(learner.column("key")):
        raise JCError(
            f"learner and reference differ in part {name} (other samples or order): "
            "score both from the same shards"
        )


def ok_rows(ref: pa.Table, learner: pa.Table | None) -> np.ndarray:
    """The rows whose status is ok in the reference and (given) the learner."""
    ok = np.asarray(ref.column("status").to_numpy(zero_copy_only=False)) == "ok"
    if learner is not None:
        ok &= np.asarray(learner.column("status").to_numpy(zero_copy_only=False)) == "ok"
    return ok


def eligible_masks(
    ref: pa.Table,
    learner: pa.Table | None,
    filters: Filters | None,
    shard: str,
    notes: Notes | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per row: ok (status ok in both sets) and, per filter in order (Filters.chain), the ok
    rows it removed that the filters before it left. Eligible: ok and removed by none. With
    `notes`, each filter's verdict on the rows it removed is noted too (for the ledger)."""
    filters = filters or Filters()
    ok = ok_rows(ref, learner)
    if notes is not None:
        notes.start(len(ok))
    left = ok.copy()
    removed = {}
    for step in filters.chain():
        gone = np.zeros_like(ok)
        if left.any():
            verdict = step(ref, shard, left)
            gone = verdict.removed & left
            if notes is not None:
                notes.note(step.fate, _named_reason(verdict, step.name), gone)
        removed[step.name] = gone
        left &= ~gone
    return ok, removed


def _named_reason(verdict: Verdict, name: str) -> Verdict:
    """A verdict whose reason is given (the filter's name where it gave none)."""
    return verdict if verdict.reason is not None else replace(verdict, reason=name)


def count_masks(ok: np.ndarray, removed: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The rows each count counts, in Filters.names order; the last is the eligible rows."""
    eligible = ok.copy()
    for gone in removed.values():
        eligible &= ~gone
    return (np.ones_like(ok), ~ok, *removed.values(), eligible)


def _eligible(
    ref: pa.Table,
    learner: pa.Table | None,
    filters: Filters | None,
    counts: Counts,
    shard: str,
    notes: Notes | None = None,
) -> np.ndarray:
    masks = count_masks(*eligible_masks(ref, learner, filters, shard, notes))
    for name, mask in zip((filters or Filters()).names, masks, strict=True):
        counts.add(name, int(mask.sum()))
    return masks[-1]


SCAN_COLUMNS = ["key", "shard", "status", "clip_score", "uid"]


@dataclass
class Scan:
    """What the first pass learns: counts, each part's shard, the widths of the text columns,
    and each part's eligible rows (np.packbits: 1 bit per row, 125 MB per 10⁹ rows)."""

    counts: Counts
    shards: list[str]
    key_width: int
    uid_width: int
    masks: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (bits, rows) by part
    notes: Notes | None = None  # with select --ledger: what the filters said of each row

    def keep(self, mask: np.ndarray) -> None:
        self.masks.append((np.packbits(mask), len(mask)))

    def eligible(self, part_id: int) -> np.ndarray:
        """The eligible rows of part `part_id`, as the scan found them."""
        bits, rows = self.masks[part_id]
        return np.unpackbits(bits, count=rows).astype(bool)


def scan(
    ref: ScoreSet,
    learner: ScoreSet | None,
    filters: Filters | None,
    on_part: Callable[[], None] | None = None,
    notes: Notes | None = None,
) -> Scan:
    """First pass: join check, eligibility counts, column widths, each part's eligible rows
    (and, given `notes`, what the filters said of each row). It reads the small columns, and
    a filter's (the caption, the image embeddings) only when one is given."""
    check_same_parts(ref, learner)
    result = Scan(Counts(), [], 1, 1, notes=notes)
    extra = [c for c in (filters or Filters()).columns if c not in SCAN_COLUMNS]
    for name in ref.part_names():
        table = ref.read_part(name, [*SCAN_COLUMNS, *extra])
        other = learner.read_part(name, ["key", "status"]) if learner else None
        join_learner(name, table, other)
        shard = table.column("shard")
        result.shards.append(shard[0].as_py() if len(shard) else name)
        eligible = _eligible(table, other, filters, result.counts, result.shards[-1], notes)
        result.keep(eligible)
        ok = pa.array(eligible)
        widths = [
            pc.max(pc.binary_length(table.column(c).cast(pa.binary())).filter(ok)).as_py() or 0
            for c in ("key", "uid")
        ]
        result.key_width = max(result.key_width, widths[0])
        result.uid_width = max(result.uid_width, widths[1])
        del table, other
        if on_part:
            on_part()
    return result


def read_rows(
    ref: ScoreSet,
    learner: ScoreSet | None,
    name: str,
    embeddings: bool,
    extra: tuple[str, ...] = (),
) -> tuple[pa.Table, pa.Table | None]:
    """One part's columns that the cache is filled from, of the reference and the learner
    (joined: the same rows in the same order), and the reference's `extra` columns (what
    the filters read)."""
    emb = ["img_emb", "txt_emb"] if embeddings else []
    wanted = ["key", "shard", "status", "clip_score", "index", "uid", "ref_loss", *emb]
    table = ref.read_part(name, [*wanted, *(c for c in extra if c not in wanted)])
    other = learner.read_part(name, ["key", "status", "ref_loss", *emb]) if learner else None
    join_learner(name, table, other)
    return table, other


def row_values(
    table: pa.Table,
    other: pa.Table | None,
    keep: pa.Array,
    part_id: int,
    shard: str,
    clusters: dict[str, np.ndarray] | None,
    widths: tuple[int, int],
    embeddings: bool | None = None,
) -> dict[str, np.ndarray]:
    """The cache's columns of one part's kept rows (key and uid `widths` bytes wide;
    embeddings when asked, by default when the tables hold them (a filter may have read the
    image embeddings alone); the dedup cluster when `clusters` is given)."""
    if embeddings is None:
        embeddings = "img_emb" in table.column_names
    rows = table.filter(keep)
    values = {
        PART: np.full(rows.num_rows, part_id, dtype=np.int32),
        INDEX: rows.column("index").to_numpy(),
        KEY: fixed_bytes(rows.column("key"), widths[0]),
        UID: fixed_bytes(rows.column("uid"), widths[1]),
        CLIP_SCORE: rows.column("clip_score").to_numpy(),
        REF_LOSS: rows.column("ref_loss").to_numpy(),
    }
    if clusters is not None:
        known = clusters.get(shard)
        index = values[INDEX]
        cluster = np.full(len(index), -1, dtype=np.int32)
        if known is not None:
            inside = index < len(known)
            cluster[inside] = known[index[inside]]
        values[CLUSTER] = cluster
    if embeddings:
        values[REF_IMG] = embedding_rows(rows.column("img_emb"))
        values[REF_TXT] = embedding_rows(rows.column("txt_emb"))
    if other is not None:
        theirs = other.filter(keep)
        values[LEARNER_LOSS] = theirs.column("ref_loss").to_numpy()
        if embeddings:
            values[LEARNER_IMG] = embedding_rows(theirs.column("img_emb"))
            values[LEARNER_TXT] = embedding_rows(theirs.column("txt_emb"))
    return values


def fill_cache(
    ref: ScoreSet,
    learner: ScoreSet | None,
    found: Scan,
    directory: Path,
    filters: Filters | None,
    embeddings: bool,
    on_part: Callable[[], None] | None = None,
) -> RowCache:
    """Second pass: copy the rows the scan found eligible into the flat cache (the filters do
    not run again; `filters` gives only the dedup clusters)."""
    n = found.counts.eligible
    clusters = filters.clusters if filters is not None else None
    widths = (found.key_width, found.uid_width)
    record = layout(*widths, ref, learner, clusters is not None, embeddings)
    directory.mkdir(parents=True, exist_ok=True)
    writers = column_writers(directory, record, n)
    written = 0
    try:
        for part_id, name in enumerate(ref.part_names()):
            table, other = read_rows(ref, learner, name, embeddings)
            keep = found.eligible(part_id)
            if len(keep) != table.num_rows:
                raise JCError(
                    f"part {name} of {ref.path} has {table.num_rows:,} rows now but had "
                    f"{len(keep):,} when first read: it changed while select read it; rerun"
                )
            shard = found.shards[part_id]
            values = row_values(
                table, other, pa.array(keep), part_id, shard, clusters, widths, embeddings
            )
            for column, data in values.items():
                writers[column].append(data)
            written += len(values[PART])
            if on_part:
                on_part()
    finally:
        for writer in writers.values():
            writer.close()
        pa.default_memory_pool().release_unused()  # parts are read; give their buffers back
    check_written(written, n, directory)
    return RowCache(directory, found.shards, n)


def check_written(written: int, counted: int, directory: Path) -> None:
    """A cache holds exactly the rows the first pass counted: never a silently wrong one."""
    if written != counted:
        raise JCError(
            f"the row cache in {directory} got {written:,} rows but {counted:,} were counted "
            "eligible: the score set changed while it was read; rerun"
        )
