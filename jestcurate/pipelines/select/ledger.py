"""The ledger: what became of every row of the score set, and why (docs/select.md, "Ledger").

One Parquet file per score-set part, OUT/ledger/NAME.parquet, rows in the part's order, with
the schema io/schema.py declares (ledger_schema). A row's fate is one of
    error       status not ok in the reference or the learner (reason: the error)
    filtered    a filter took it (reason: which; value and threshold: what it compared)
    duplicate   --dedup dropped it (reason: exact | semantic; the kept row, the cosine)
    excluded    --exclude named it (reason: image | pair; the evaluation item, the cosine)
    kept        chosen (step, position; the super-batch it was drawn in)
    not_chosen  eligible but not chosen (super_batch: lost in that super-batch; below_cut:
                ranked after the kept rows by clip-score; not_drawn: random's sample missed it;
                cluster_cap: --balance-clusters skipped it; cluster_quota: its cluster's
                --cluster-quotas quota was full)
    tail        eligible but never drawn (no_full_super_batch: after the last full one;
                max_steps: in a super-batch beyond --max-steps)

Fates of ineligible rows come from what the filters said when they ran, in select's first
pass (io/notes.py: a code and a value per row, 5 bytes; no filter runs again), and each row's
status; those of eligible rows from what choosing did, kept per eligible row (its id in the
cache, assigned in part and row order): its place in the method's draw order and, when kept,
its slot step * b + position. That is 8 bytes per eligible row (16 from 2^31 eligible rows on),
held from choosing until the ledger is written. Filters whose rows point at another row
(--dedup, --exclude) name it from their outputs, read one shard at a time.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jestcurate.errors import JCError
from jestcurate.io.eligible import identities, join_learner, ok_rows
from jestcurate.io.files import atomic_write
from jestcurate.io.notes import Notes
from jestcurate.io.reader import error_reason
from jestcurate.io.rowcache import RowCache
from jestcurate.io.schema import LEDGER_FATES, LEDGER_VERSION, LEDGER_VERSION_KEY, ledger_schema
from jestcurate.io.store import ScoreSet
from jestcurate.math.partition import task_of
from jestcurate.pipelines.select.choosing import draw_order
from jestcurate.pipelines.select.config import LEDGER_DIR, SUPER_BATCH_METHODS, SelectConfig
from jestcurate.pipelines.select.quotas import REASON as QUOTA_REASON

CODE = {fate: code for code, fate in enumerate(LEDGER_FATES)}
CHANGED = "it changed meanwhile; rerun"  # the end of a refusal for a score set that changed
LEARNER_ERROR = "learner: "  # an error of the learner's score set (the reference's has none)


class Recorder:
    """Notes each kept row's slot (step * b + position) as the batches pass to the manifest."""

    def __init__(self, rows: int, b: int) -> None:
        self.dtype = np.int32 if rows < 2**31 else np.int64
        self.slot = np.full(rows, -1, dtype=self.dtype)
        self.b = b

    def watch(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[Any]:
        for step, (ids, scores) in enumerate(batches):
            self.slot[ids] = step * self.b + np.arange(len(ids), dtype=self.dtype)
            yield ids, scores


@dataclass(frozen=True)
class Choice:
    """What choosing did with one selection's (or array task's) eligible rows."""

    method: str
    b: int
    big: int | None  # B, for super-batch methods
    steps: int
    drawn: np.ndarray  # per eligible row: its place in the method's draw order
    slot: np.ndarray  # per eligible row: step * b + position when kept, else -1
    cut: int  # global methods: the last place in the draw order that was kept (-1: none)
    cut_value: float | None  # clip-score: the clip_score at that place
    capped: str = "cluster_cap"  # global methods: why a row drawn before the cut was skipped


def settle(cfg: SelectConfig, cache: RowCache, recorder: Recorder, steps: int) -> Choice:
    """Once the manifest is written (the cache still there): each eligible row's place in the
    draw order, beside the slots the recorder noted."""
    order = draw_order(cfg, cache)
    drawn = np.empty(len(order), dtype=recorder.dtype)
    drawn[order] = np.arange(len(order), dtype=recorder.dtype)
    kept = recorder.slot >= 0
    cut = int(drawn[kept].max()) if kept.any() else -1
    cut_value = None
    if cfg.method == "clip-score" and cut >= 0:
        cut_value = float(cache.read("clip_score", order[cut : cut + 1])[0])
    big = cfg.sampling.super_batch if cfg.method in SUPER_BATCH_METHODS else None
    b = cfg.sampling.batch_size
    capped = QUOTA_REASON if cfg.cluster_quotas is not None else "cluster_cap"
    return Choice(cfg.method, b, big, steps, drawn, recorder.slot, cut, cut_value, capped)


@dataclass
class Rows:
    """Ledger columns over one part's rows, filled fate by fate."""

    fate: np.ndarray
    reason: np.ndarray
    detail: np.ndarray
    value: np.ndarray
    threshold: np.ndarray
    other_shard: np.ndarray
    other_key: np.ndarray
    other_set: np.ndarray
    super_batch: np.ndarray
    step: np.ndarray
    position: np.ndarray
    task: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Rows:
        def none() -> np.ndarray:
            return np.full(n, None, dtype=object)

        def nan() -> np.ndarray:
            return np.full(n, np.nan, dtype=np.float32)

        def absent() -> np.ndarray:
            return np.full(n, -1, dtype=np.int64)

        return cls(np.full(n, -1, np.int8), none(), none(), nan(), nan(), none(), none(),
                   none(), absent(), absent(), absent(), absent())  # fmt: skip

    def filtered(self, notes: Notes, at: int, shard: str, pointing: dict[str, Any]) -> None:
        """The rows a filter removed, as its notes say (part `at` of them); the row each points
        at from the filters that point (by fate: --dedup's, --exclude's)."""
        code, value = notes.part(at)
        if len(code) != len(self.fate):
            raise JCError(f"shard {shard} has {len(self.fate):,} rows now but had {len(code):,} "
                          "when select first read it: it changed meanwhile; rerun")  # fmt: skip
        for c in np.unique(code[code > 0]).tolist():
            fate, reason, detail, threshold = notes.reasons[c - 1]
            rows = code == c
            self.fate[rows], self.reason[rows], self.detail[rows] = CODE[fate], reason, detail
            self.value[rows] = value[rows]
            self.threshold[rows] = np.nan if threshold is None else threshold
            if fate in pointing:
                for name, found in pointing[fate].others(shard, len(rows)).items():
                    getattr(self, name)[rows] = found[rows]


def _errors(table: pa.Table, other: pa.Table | None, ok: np.ndarray, rows: Rows) -> None:
    """Rows whose status is not ok: the reference's error, else the learner's."""
    bad = np.flatnonzero(~ok)
    if not len(bad):
        return
    index = pa.array(bad)
    ref_ok = np.asarray(table.column("status").take(index).to_numpy(zero_copy_only=False))
    texts = table.column("error").take(index).to_pylist()
    if other is not None:
        theirs = other.column("error").take(index).to_pylist()
        texts = [t if s != "ok" else f"{LEARNER_ERROR}{u}" for t, s, u in
                 zip(texts, ref_ok, theirs, strict=True)]  # fmt: skip
    rows.fate[bad] = CODE["error"]
    rows.reason[bad] = np.array([t or "error" for t in texts], dtype=object)


def _eligible(choice: Choice, ids: np.ndarray, clip: np.ndarray, rows: Rows, at: np.ndarray,
              step_of: np.ndarray | None = None) -> None:  # fmt: skip
    """The fates of eligible rows (`at`: their rows in the part; `ids`: in the cache)."""
    if len(ids) and ids[-1] >= len(choice.drawn):
        raise JCError(f"the score set has more eligible rows than select chose from: {CHANGED}")
    drawn, slot = choice.drawn[ids].astype(np.int64), choice.slot[ids].astype(np.int64)
    kept = slot >= 0
    fate = np.where(kept, CODE["kept"], CODE["not_chosen"]).astype(np.int8)
    reason = np.where(kept, "chosen", "").astype(object)
    step = np.full(len(slot), -1, dtype=np.int64)
    local = slot[kept] // choice.b  # steps of kept rows only: a task may have none (0 steps)
    step[kept] = local if step_of is None else step_of[local]
    rows.step[at] = step
    rows.position[at] = np.where(kept, slot % choice.b, -1)
    if choice.big is not None:
        batch = drawn // choice.big
        tail = ~kept & (batch >= choice.steps)
        full = len(choice.drawn) // choice.big
        fate[tail] = CODE["tail"]
        reason[tail] = np.where(batch[tail] < full, "max_steps", "no_full_super_batch")
        reason[~kept & ~tail] = "super_batch"
        rows.super_batch[at] = batch
    else:
        lost = ~kept
        below = "below_cut" if choice.method == "clip-score" else "not_drawn"
        reason[lost] = np.where(drawn[lost] > choice.cut, below, choice.capped)
        if choice.cut_value is not None:
            rows.value[at[lost]] = clip[lost]
            rows.threshold[at[lost]] = choice.cut_value
    rows.fate[at], rows.reason[at] = fate, reason


# Resolves one part's eligible rows: (part id, the part's table, eligible mask, rows to fill).
Resolve = Callable[[int, pa.Table, np.ndarray, Rows], None]


def one_run(choice: Choice) -> Resolve:
    """A single run's eligible rows take cache ids 0, 1, ... in part and row order."""
    taken = 0

    def resolve(part_id: int, table: pa.Table, eligible: np.ndarray, rows: Rows) -> None:
        nonlocal taken
        at = np.flatnonzero(eligible)
        ids = np.arange(taken, taken + len(at))
        taken += len(at)
        clip = table.column("clip_score").take(pa.array(at)).to_numpy(zero_copy_only=False)
        _eligible(choice, ids, clip, rows, at)

    return resolve


def merged(names: list[str], choices: list[Choice], step_of: list[np.ndarray],
           first: np.ndarray | None = None) -> Resolve:  # fmt: skip
    """Array tasks' eligible rows: each goes to the task its hash names (as the scatter sent
    it) and takes that task's next cache id (a task gathers its rows in part and row order);
    kept rows' steps are the merged manifest's (`step_of[task][local step]`). With `first`
    ((parts x tasks): each part's first cache id per task), the parts may come in any order."""
    count = len(choices)
    taken = np.zeros(count, dtype=np.int64)

    def resolve(part_id: int, table: pa.Table, eligible: np.ndarray, rows: Rows) -> None:
        if first is not None:
            taken[:] = first[part_id]
        at = np.flatnonzero(eligible)
        dest = task_of(identities(names[part_id], table), count)[at]
        clip = table.column("clip_score").take(pa.array(at)).to_numpy(zero_copy_only=False)
        for t in np.unique(dest).tolist():
            mine = dest == t
            ids = np.arange(taken[t], taken[t] + int(mine.sum()))
            taken[t] += len(ids)
            _eligible(choices[t], ids, clip[mine], rows, at[mine], step_of[t])
            rows.task[at[mine]] = t

    return resolve


CHOICE_FILES = ("ledger-drawn.npy", "ledger-slot.npy")


def save_choice(directory: Path, choice: Choice) -> dict[str, Any]:
    """An array task's choice, for the merge's ledger: its arrays beside its manifest (before
    its summary, which marks the task finished), and the rest for its summary."""
    for name, array in zip(CHOICE_FILES, (choice.drawn, choice.slot), strict=True):
        atomic_write(directory / name, lambda tmp, a=array: _save(tmp, a))
    return {"method": choice.method, "b": choice.b, "big": choice.big, "steps": choice.steps,
            "cut": choice.cut, "cut_value": choice.cut_value, "capped": choice.capped}  # fmt: skip


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file, not a name: np.save would add .npy to the name
        np.save(f, array)


def load_choice(directory: Path, facts: dict[str, Any]) -> Choice:
    """A task's saved choice (its arrays memory-mapped: the merge reads the rows it needs)."""
    drawn, slot = (np.load(directory / name, mmap_mode="r") for name in CHOICE_FILES)
    return Choice(drawn=drawn, slot=slot, **facts)


def _text(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).dictionary_encode()


def _ints(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    return pa.array(values, kind, mask=values < 0)


def _table(table: pa.Table, shard: str, rows: Rows) -> pa.Table:
    n = table.num_rows
    schema = ledger_schema()
    uid = table.column("uid") if "uid" in table.column_names else pa.nulls(n, pa.string())
    columns = [
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([shard])),
        table.column("key"),
        table.column("index"),
        uid,
        pa.DictionaryArray.from_arrays(pa.array(rows.fate, pa.int8()), pa.array(LEDGER_FATES)),
        _text(rows.reason),
        _text(rows.detail),
        pa.array(rows.value, pa.float32(), from_pandas=True),
        pa.array(rows.threshold, pa.float32(), from_pandas=True),
        _text(rows.other_shard),
        pa.array(rows.other_key, pa.string()),
        _text(rows.other_set),
        _ints(rows.super_batch, pa.int64()),
        _ints(rows.step, pa.int64()),
        _ints(rows.position, pa.int32()),
        _ints(rows.task, pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def category(fate: str, reason: str) -> str:
    """A reason as summary.json counts it: an error by its kind (the text before the colon)."""
    if fate != "error":
        return reason
    if reason.startswith(LEARNER_ERROR):
        return LEARNER_ERROR + error_reason(reason.removeprefix(LEARNER_ERROR))
    return error_reason(reason)


def _count(ledger: pa.Table, counts: Counter[tuple[str, str]]) -> None:
    fate, reason = ledger.column("fate").combine_chunks(), ledger.column("reason").combine_chunks()
    words = reason.dictionary.to_pylist()
    codes = fate.indices.to_numpy().astype(np.int64) * (len(words) + 1)
    codes += reason.indices.fill_null(len(words)).to_numpy().astype(np.int64)
    found, times = np.unique(codes, return_counts=True)
    for code, n in zip(found.tolist(), times.tolist(), strict=True):
        f, r = LEDGER_FATES[code // (len(words) + 1)], code % (len(words) + 1)
        counts[(f, category(f, words[r] if r < len(words) else ""))] += n


def fates(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{fate: {reason: rows}} in LEDGER_FATES order, reasons sorted (summary.json's `fates`)."""
    out: dict[str, dict[str, int]] = {}
    for fate in LEDGER_FATES:
        found = {r: n for (f, r), n in counts.items() if f == fate}
        if found:
            out[fate] = dict(sorted(found.items()))
    return out


# part id -> the notes that hold the part (io/notes.py) and its place in them
NotesOf = Callable[[int], tuple[Notes, int]]


@dataclass(frozen=True)
class LedgerSource:
    """What every ledger part is written from, by one run (write_ledger) or by array tasks
    (ledger_round.write_parts): the score sets, where the filters' notes of each part are,
    the filters whose rows point at another row (Filters.pointing()), and how the eligible
    rows get their fates (one_run or merged)."""

    ref: ScoreSet
    learner: ScoreSet | None
    notes_of: NotesOf
    pointing: dict[str, Any]
    resolve: Resolve

    def part(self, part: tuple[int, str]) -> tuple[pa.Table, int]:
        """One part's (id, name) ledger table, and how many of its rows were eligible."""
        part_id, name = part
        columns = ["key", "shard", "index", "uid", "status", "error", "clip_score"]
        table = self.ref.read_part(name, columns)
        learner = self.learner
        other = learner.read_part(name, ["key", "status", "error"]) if learner else None
        join_learner(name, table, other)
        shard = table.column("shard")[0].as_py() if table.num_rows else name
        ok = ok_rows(table, other)
        rows = Rows.empty(table.num_rows)
        _errors(table, other, ok, rows)
        rows.filtered(*self.notes_of(part_id), shard, self.pointing)
        eligible = ok & (rows.fate < 0)
        self.resolve(part_id, table, eligible, rows)
        if (rows.fate < 0).any():  # a bug, never a -1 written as a fate
            raise JCError(f"{int((rows.fate < 0).sum()):,} rows of part {name} got no fate")
        return _table(table, shard, rows), int(eligible.sum())


def write_ledger(
    out: Path,
    source: LedgerSource,
    chosen_from: int,
    on_part: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """OUT/ledger/NAME.parquet for every part, written into a hidden folder renamed into
    place once whole (a crash leaves no partial OUT/ledger for a glob to read); returns what
    summary.json records: `fates` (counts by fate and reason) and `ledger` (parts, rows,
    bytes). `chosen_from`: the eligible rows choosing saw (the choices' drawn), checked."""
    final = out / LEDGER_DIR
    shutil.rmtree(final, ignore_errors=True)  # an earlier selection's: not this one's
    directory = out / f".{LEDGER_DIR}.partial"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    counts: Counter[tuple[str, str]] = Counter()
    total_rows = total_bytes = eligible_rows = 0
    try:
        for part_id, name in enumerate(source.ref.part_names()):
            ledger, eligible = source.part((part_id, name))
            _count(ledger, counts)
            path = directory / f"{name}.parquet"
            pq.write_table(ledger, path, compression="zstd", write_page_checksum=True)
            total_rows, eligible_rows = total_rows + ledger.num_rows, eligible_rows + eligible
            total_bytes += path.stat().st_size
            if on_part:
                on_part()
        parts = len(source.ref.parts)
        record = ledger_record(counts, parts, total_rows, total_bytes, eligible_rows, chosen_from)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    os.replace(directory, final)
    return record


def ledger_record(counts: Counter[tuple[str, str]], parts: int, rows: int, size: int,
                  eligible: int, chosen_from: int) -> dict[str, Any]:  # fmt: skip
    """summary.json's `fates` and `ledger` for a whole ledger (one run's or the array tasks'
    parts added up), once its eligible rows are checked against those select chose from."""
    if eligible != chosen_from:
        raise JCError(f"the score set has {eligible:,} eligible rows, but select chose from "
                      f"{chosen_from:,}: {CHANGED}")  # fmt: skip
    per_row = round(size / rows, 1) if rows else None
    ledger = {"folder": LEDGER_DIR, "parts": parts, "rows": rows, "bytes": size,
              "bytes_per_row": per_row}  # fmt: skip
    return {"fates": fates(counts), "ledger": ledger}


def ledger_parts(folder: Path) -> list[Path]:
    """A selection's ledger files, each checked to be of this version of the ledger's schema
    (one line otherwise)."""
    files = sorted(folder.glob("*.parquet"))
    for path in files:
        try:
            found = (pq.read_schema(path).metadata or {}).get(LEDGER_VERSION_KEY)
        except (OSError, pa.ArrowException) as exc:
            raise JCError(f"{path} is unreadable ({str(exc).splitlines()[0]})") from None
        version = found.decode() if found is not None else None
        if version != LEDGER_VERSION:
            raise JCError(
                f"{path} is a ledger of schema version {version or 'unknown'}, not "
                f"{LEDGER_VERSION}: rerun select with --ledger to write it again"
            )
    return files
