"""`jestcurate select`: turn score sets into training batches (JEST and its baselines).

Flow:
1. Open the reference (and learner) score sets and join them on (part, key).
2. Build a flat on-disk cache of the eligible rows (status ok in both sets, clip_score at least
   --min-clip-score): fixed-width .npy columns read back by positioned reads, so memory does
   not grow with the corpus (docs/architecture.md says why not Arrow or memory maps).
3. Choose: a global seeded permutation of eligible rows cut into super-batches of
   B = round(b / ratio) for jest, easy-ref and learnability; global rankings for random and
   clip-score. Every method yields the same number of full batches of b.
4. Write manifest.parquet (step order), uids.npy and, last, summary.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console

from jestcurate import __version__, ui
from jestcurate.errors import JCError, some
from jestcurate.io import scatter as scatter_mod
from jestcurate.io.eligible import Counts, Filters, fill_cache, scan
from jestcurate.io.rowcache import RowCache
from jestcurate.io.shards import resolve_task
from jestcurate.io.store import (
    META_NAME,
    ScoreSet,
    atomic_write,
    file_digests,
    fingerprint,
    finished_output,
    open_score_set,
    read_json,
    write_json_atomic,
)
from jestcurate.math.jest import (
    CRITERIA,
    DEFAULT_CHUNKS,
    DEFAULT_POOL,
    DEFAULT_TEMPERATURE,
    SAMPLERS,
    Embeddings,
    Quota,
    independent_scores,
    row_cache_fits,
    select_batch,
)
from jestcurate.math.partition import PARTITION_BY, PARTITION_HASH, interleave
from jestcurate.model.openclip import resolve_device

log = logging.getLogger(__name__)

METHODS = ("random", "clip-score", "easy-ref", "learnability", "jest")
SUPER_BATCH_METHODS = ("easy-ref", "learnability", "jest")
MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
UIDS = "uids.npy"
TASKS_DIR = "tasks"
SCATTER_DIR = "scatter"
SELECTION_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SelectConfig:
    reference: Path
    out: Path
    learner: Path | None = None
    method: str = "jest"
    score: str | None = None  # jest's criterion; default learnability with a learner
    ratio: float = 0.2
    batch_size: int = 4096
    chunks: int | None = None  # jest: None draws each batch in 16 chunks, or b when smaller
    seed: int = 0
    temperature: float | None = None  # None: the sampler's default (jest.DEFAULT_TEMPERATURE)
    topk: bool = False
    sampler: str = "refine"  # jest: refine (the default) or paper (Algorithm 1 as written)
    sweeps: int = 1  # jest --sampler refine: refinement sweeps over the batch's chunks
    pool: float = DEFAULT_POOL  # jest --sampler refine: re-draw from the best pool x b candidates
    min_clip_score: float | None = None
    max_steps: int | None = None
    device: str = "auto"
    dedup: Path | None = None  # a `jestcurate dedup` output: its dropped rows are not eligible
    balance_clusters: bool = False  # cap each dedup cluster's share of every batch / kept set
    task_index: int | None = None  # array task I of N; None: from Slurm's variables, else 0 of 1
    num_tasks: int | None = None
    merge: bool = False  # only join finished task outputs into OUT
    overwrite: bool = False  # replace whatever selection OUT holds

    @property
    def super_batch(self) -> int:
        return max(self.batch_size, round(self.batch_size / self.ratio))

    @property
    def n_chunks(self) -> int:
        """jest's chunks per batch, as asked or the default (the sampler draws at most b)."""
        return self.chunks if self.chunks is not None else DEFAULT_CHUNKS

    @property
    def resolved_temperature(self) -> float:
        return (
            self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.sampler]
        )

    @property
    def criterion(self) -> str | None:
        if self.method != "jest":
            return None
        return self.score or ("learnability" if self.learner else "easy-ref")


def _validate(cfg: SelectConfig) -> None:
    if cfg.method not in METHODS:
        raise JCError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if not 0 < cfg.ratio <= 1:
        raise JCError(f"--ratio is the kept fraction and must be in (0, 1], got {cfg.ratio}")
    if cfg.batch_size < 1 or (cfg.chunks is not None and cfg.chunks < 1):
        raise JCError("--batch-size and --chunks must be at least 1")
    if cfg.temperature is not None and cfg.temperature <= 0:
        raise JCError("--temperature must be positive (use --topk for deterministic choice)")
    if cfg.sampler not in SAMPLERS:
        raise JCError(f"unknown --sampler {cfg.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if cfg.sweeps < 0:
        raise JCError("--sweeps must be 0 or more")
    if cfg.pool < 1:
        raise JCError(f"--pool is a multiple of the batch size, at least 1; got {cfg.pool}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise JCError("--max-steps must be at least 1")
    if cfg.score is not None and cfg.method != "jest":
        raise JCError("--score chooses jest's criterion; other methods have their own")
    if cfg.criterion is not None and cfg.criterion not in CRITERIA:
        raise JCError(f"unknown --score {cfg.criterion!r}; use one of {', '.join(CRITERIA)}")
    needs_learner = cfg.method == "learnability" or cfg.criterion in (
        "learnability",
        "hard-learner",
    )
    if needs_learner and cfg.learner is None:
        what = f"--score {cfg.criterion}" if cfg.method == "jest" else f"--method {cfg.method}"
        raise JCError(f"{what} needs --learner (a score set made with `score --role learner`)")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
    if cfg.method in SUPER_BATCH_METHODS:
        resolve_device(cfg.device)  # an unusable --device fails now, not after the cache pass
    if cfg.balance_clusters and cfg.dedup is None:
        raise JCError("--balance-clusters needs --dedup (the clusters come from jestcurate dedup)")
    if cfg.min_clip_score is not None and not -1 <= cfg.min_clip_score <= 1:
        raise JCError(
            f"--min-clip-score is a cosine similarity, in [-1, 1]; got {cfg.min_clip_score}"
        )
    if cfg.method == "jest" and cfg.chunks is not None and cfg.chunks > cfg.batch_size:
        raise JCError(
            f"--chunks {cfg.chunks} is more than the batch size {cfg.batch_size}: each chunk "
            f"draws at least one example; use at most {cfg.batch_size}"
        )
    if cfg.method in SUPER_BATCH_METHODS and cfg.super_batch == cfg.batch_size:
        # B = round(b / ratio) exceeds b from b / ratio >= b + 0.5 on: shown rounded down
        most = math.floor(cfg.batch_size / (cfg.batch_size + 0.5) * 1e4) / 1e4
        log.warning(
            "--ratio %s makes each super-batch exactly one batch of %d: %s keeps every "
            "candidate and chooses nothing (--ratio %s or less chooses)",
            cfg.ratio, cfg.batch_size, cfg.method, most,
        )  # fmt: skip


# --- choosing -------------------------------------------------------------------------------


Batch = tuple[np.ndarray, np.ndarray]  # (row ids, selection scores) of one training batch


def _embeddings(
    cache: RowCache, ids: np.ndarray, prefix: str, s: ScoreSet, device: torch.device
) -> Embeddings:
    img = torch.from_numpy(cache.read(f"{prefix}_img", ids)).to(device).float()
    txt = torch.from_numpy(cache.read(f"{prefix}_txt", ids)).to(device).float()
    return Embeddings(img, txt, s.scale, s.bias, s.kind)


def _shuffled(
    ids: np.ndarray, scores: np.ndarray, steps: int, b: int, seed: int
) -> Iterator[Batch]:
    """Non-joint methods: batches are a seeded shuffle of the kept set, never in score order."""
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    for s in range(steps):
        part = order[s * b : (s + 1) * b]
        yield ids[part], scores[part]


def _clusters(cfg: SelectConfig, cache: RowCache) -> tuple[np.ndarray, int] | None:
    """With --balance-clusters: each eligible row's cluster, and how many clusters there are."""
    if not cfg.balance_clusters:
        return None
    cluster = cache.read_range("cluster", 0, cache.size)
    return cluster, max(1, len(np.unique(cluster[cluster >= 0])))


def _cap(items: int, clusters: int) -> int:
    """A cluster's most: twice its even share."""
    return max(1, math.ceil(2 * items / clusters))


def _global(cfg: SelectConfig, cache: RowCache, steps: int) -> Iterator[Batch]:
    """random and clip-score: a kept set chosen over all eligible rows at once."""
    n, kept = cache.size, steps * cfg.batch_size
    if cfg.method == "random":
        order = np.random.default_rng([cfg.seed, 2]).permutation(n)
    else:
        order = np.argsort(-cache.read_range("clip_score", 0, n), kind="stable")
    balance = _clusters(cfg, cache)
    if balance is None:
        ids = order[:kept]
    else:
        cluster, count = balance
        quota = Quota(cluster.tolist(), _cap(kept, count))
        ids = np.array(quota.take(order.tolist(), kept), dtype=np.int64)
    if cfg.method == "random":
        scores = np.full(kept, np.nan, dtype=np.float32)
    else:
        scores = cache.read("clip_score", ids)
    yield from _shuffled(ids, scores, steps, cfg.batch_size, cfg.seed)


def _super_batches(
    cfg: SelectConfig, cache: RowCache, ref: ScoreSet, learner: ScoreSet | None, steps: int
) -> Iterator[tuple[np.ndarray, Embeddings, Embeddings | None]]:
    """Consecutive slices of B rows of a global seeded permutation, with their embeddings."""
    device = resolve_device(cfg.device)
    perm = np.random.default_rng([cfg.seed, 0]).permutation(cache.size)
    big = cfg.super_batch
    for s in range(steps):
        ids = perm[s * big : (s + 1) * big]
        ref_e = _embeddings(cache, ids, "ref", ref, device)
        learner_e = _embeddings(cache, ids, "learner", learner, device) if learner else None
        yield ids, ref_e, learner_e


def choose(
    cfg: SelectConfig,
    cache: RowCache,
    ref: ScoreSet,
    learner: ScoreSet | None,
    steps: int,
    on_batch: Callable[[], None] | None = None,
) -> Iterator[Batch]:
    """Yield (row ids, selection scores) of each training batch, in step order."""
    tick = on_batch or (lambda: None)
    b = cfg.batch_size
    if cfg.method in ("random", "clip-score"):
        for batch in _global(cfg, cache, steps):
            yield batch
            tick()
        return
    rows = _super_batches(cfg, cache, ref, learner, steps)
    balance = _clusters(cfg, cache)

    def quota(ids: np.ndarray) -> Quota | None:
        if balance is None:
            return None
        cluster, count = balance
        return Quota(cluster[ids].tolist(), _cap(b, count))

    if cfg.method == "jest":
        criterion = cfg.criterion or "easy-ref"
        generator = torch.Generator().manual_seed(cfg.seed)  # CPU: same draws on any device
        models = 2 if learner else 1
        cache_rows = row_cache_fits(
            cfg.batch_size, cfg.super_batch, models, resolve_device(cfg.device)
        )
        for ids, ref_e, learner_e in rows:
            picked, score = select_batch(
                criterion,
                ref_e,
                learner_e,
                b,
                sampler=cfg.sampler,
                n_chunks=cfg.n_chunks,
                generator=generator,
                temperature=cfg.temperature,
                topk=cfg.topk,
                quota=quota(ids),
                sweeps=cfg.sweeps,
                cache_rows=cache_rows,
                pool=cfg.pool,
            )
            yield ids[picked.cpu().numpy()], score.cpu().numpy()
            tick()
        return
    # Independent prioritisation (the paper's baseline): each candidate's own loss with the
    # super-batch as negatives; easy-ref keeps the lowest reference loss, learnability the
    # highest learner minus reference loss.
    kept_ids, kept_scores = [], []
    for ids, ref_e, learner_e in rows:
        score = independent_scores(cfg.method, ref_e, learner_e)
        order = torch.sort(score.double(), descending=True, stable=True).indices.cpu().numpy()
        limit = quota(ids)
        top = order[:b] if limit is None else np.array(limit.take(order.tolist(), b))
        kept_ids.append(ids[top])
        kept_scores.append(score.cpu().numpy()[top])
        tick()
    yield from _shuffled(np.concatenate(kept_ids), np.concatenate(kept_scores), steps, b, cfg.seed)


# --- outputs --------------------------------------------------------------------------------


def manifest_schema(learner: bool) -> pa.Schema:
    fields = [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("ref_loss", pa.float32()),
    ]
    if learner:
        fields.append(pa.field("learner_loss", pa.float32()))
    fields.append(pa.field("score", pa.float32()))
    return pa.schema(fields, metadata={"jestcurate.selection_schema_version": "1"})


class _Means:
    """Running sums of the stored scores, to report means of kept vs dropped rows."""

    COLUMNS = ("clip_score", "ref_loss", "learner_loss", "learnability")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.COLUMNS, 0.0)
        self.count = 0

    def add(self, columns: dict[str, np.ndarray]) -> None:
        if "learner_loss" in columns:
            columns = {**columns, "learnability": columns["learner_loss"] - columns["ref_loss"]}
        for name, values in columns.items():
            if name in self.sums:
                self.sums[name] += float(np.asarray(values, dtype=np.float64).sum())
        self.count += len(columns["clip_score"])

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sums": dict(self.sums)}

    def merge(self, state: dict[str, Any]) -> None:
        self.count += int(state["count"])
        for name, value in state["sums"].items():
            self.sums[name] += float(value)

    def means(self, learner: bool, minus: _Means | None = None) -> dict[str, float | None]:
        count = self.count - (minus.count if minus else 0)
        out: dict[str, float | None] = {}
        for name in self.COLUMNS:
            if not learner and name in ("learner_loss", "learnability"):
                continue
            total = self.sums[name] - (minus.sums[name] if minus else 0.0)
            out[name] = round(total / count, 6) if count else None
        return out


def _score_columns(cache: RowCache, ids: np.ndarray, learner: bool) -> dict[str, np.ndarray]:
    names = ["clip_score", "ref_loss", *(["learner_loss"] if learner else [])]
    return {name: cache.read(name, ids) for name in names}


def _uid_halves(uids: np.ndarray) -> np.ndarray | None:
    """128-bit hex uids (bytes) as an (n, 2) array of their high and low 64-bit halves, or None
    if any uid is not 32 hex digits."""
    if uids.dtype.itemsize < 32 or any(len(u) != 32 for u in uids.tolist()):
        return None
    try:
        raw = bytes.fromhex(b"".join(uids.tolist()).decode("ascii"))
    except ValueError:
        return None
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def write_manifest(
    path: Path,
    cache: RowCache,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    learner: bool,
) -> tuple[_Means, np.ndarray | None]:
    """Write the manifest in step order, one row group per step; returns the kept rows' score
    sums and, when every kept row has a 128-bit hex uid, their uid halves."""
    schema = manifest_schema(learner)
    kept = _Means()
    halves: list[np.ndarray] | None = []
    shard_names = pa.array(cache.shards, type=pa.string())

    def write(tmp: Path) -> None:
        nonlocal halves
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer:
            for step, (ids, scores) in enumerate(batches):
                n = len(ids)
                columns = _score_columns(cache, ids, learner)
                kept.add(columns)
                uid = cache.read("uid", ids)
                if halves is not None:
                    pairs = _uid_halves(uid)
                    halves = None if pairs is None else [*halves, pairs]
                arrays = {
                    "step": pa.array(np.full(n, step, dtype=np.int64)),
                    "position": pa.array(np.arange(n, dtype=np.int32)),
                    "shard": shard_names.take(pa.array(cache.read("part", ids))),
                    "key": pa.array(np.char.decode(cache.read("key", ids), "utf-8")),
                    "index": pa.array(cache.read("index", ids)),
                    "uid": pa.array(
                        [u.decode("utf-8") if u else None for u in uid.tolist()], pa.string()
                    ),
                    **{k: pa.array(v, pa.float32()) for k, v in columns.items()},
                    "score": pa.array(scores, pa.float32(), from_pandas=True),
                }
                writer.write_table(pa.table(arrays, schema=schema), row_group_size=max(n, 1))

    atomic_write(path, write)
    return kept, (np.concatenate(halves) if halves else None)


def datacomp_uids(halves: np.ndarray) -> np.ndarray:
    """DataComp's subset format: a sorted structured array of the uids' two 64-bit halves."""
    array = np.empty(len(halves), dtype=np.dtype("u8,u8"))
    array["f0"], array["f1"] = halves[:, 0], halves[:, 1]
    array.sort()
    return array


def _dedup_fingerprint(dedup: Path | None) -> dict[str, Any] | None:
    if dedup is None:
        return None
    summary = dedup / "summary.json"
    if not summary.is_file():
        raise JCError(f"{dedup} is not a finished dedup output (no summary.json)")
    content = summary.read_bytes()
    return {"path": str(dedup.resolve()), "summary_sha256": hashlib.sha256(content).hexdigest()}


def _identity(cfg: SelectConfig, ref: ScoreSet, learner: ScoreSet | None) -> dict[str, Any]:
    jest = cfg.method == "jest"
    return {
        "inputs": {
            "reference": fingerprint(ref),
            "learner": fingerprint(learner) if learner else None,
        },
        "method": cfg.method,
        "score": cfg.criterion,
        "parameters": {
            "ratio": cfg.ratio,
            "batch_size": cfg.batch_size,
            "super_batch_size": cfg.super_batch if cfg.method in SUPER_BATCH_METHODS else None,
            "chunks": cfg.n_chunks if jest else None,
            "seed": cfg.seed,
            "sampler": cfg.sampler if jest else None,
            "sweeps": cfg.sweeps if jest and cfg.sampler == "refine" else None,
            "pool": cfg.pool if jest and cfg.sampler == "refine" else None,
            "temperature": cfg.resolved_temperature if jest and not cfg.topk else None,
            "topk": cfg.topk if jest else None,
            "min_clip_score": cfg.min_clip_score,
            "max_steps": cfg.max_steps,
            "dedup": _dedup_fingerprint(cfg.dedup),
            "balance_clusters": cfg.balance_clusters,
        },
    }


@dataclass
class SelectReport:
    out: Path
    summary: dict[str, Any]
    reused: bool
    seconds: float
    task: int | None = None  # set when this was an array task whose merge is still to come
    waiting: str | None = None  # "scatter": this task bucketed its rows; others have still to


def _filters(cfg: SelectConfig, ref: ScoreSet) -> Filters:
    if cfg.dedup is None:
        return Filters(cfg.min_clip_score)
    from jestcurate.pipelines.dedup import SUMMARY, load_clusters, load_dropped

    try:
        summary = read_json(cfg.dedup / SUMMARY)
    except (OSError, ValueError) as exc:
        raise JCError(f"{cfg.dedup / SUMMARY} is unreadable ({exc})") from None
    made_from = summary.get("scores", {}).get("parts_sha256")
    if made_from != fingerprint(ref)["parts_sha256"]:
        raise JCError(
            f"{cfg.dedup} was made from another score set ({summary.get('scores', {}).get('path')}"
            f"), not {cfg.reference}; rerun jestcurate dedup on the reference"
        )
    clusters = load_clusters(cfg.dedup) if cfg.balance_clusters else None
    return Filters(cfg.min_clip_score, load_dropped(cfg.dedup), clusters)


def run(cfg: SelectConfig) -> SelectReport:
    """Select and write the outputs; rerunning with the same inputs reuses a finished selection.

    As array task I of N (--task-index/--num-tasks, or Slurm's variables) it selects from its
    own partition into OUT/tasks/ and, when it is the last task to finish, merges all of them;
    with --merge it only merges."""
    began = time.time()
    _validate(cfg)
    index, count = _task(cfg)
    ref = open_score_set(cfg.reference, role="reference")
    learner = open_score_set(cfg.learner, role="learner") if cfg.learner else None
    for scores in (ref, learner):
        _warn_failed_shards(scores)
    identity = _identity(cfg, ref, learner)
    if count > 1:
        identity["partition"] = partition_identity(count)
    done = _existing(cfg, identity, count)
    if done is not None:
        log.info("%s already holds this selection; nothing to do", cfg.out)
        return SelectReport(cfg.out, done, reused=True, seconds=time.time() - began)
    if cfg.merge:
        summary = merge(cfg.out, identity, count)
        return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)
    if count == 1:
        filters = _filters(cfg, ref)
        with ui.step_progress("checking score sets", len(ref.parts), "parts") as tick:
            found = scan(ref, learner, filters, on_part=tick)

        def build(cache_dir: Path) -> RowCache:
            embeddings = cfg.method in SUPER_BATCH_METHODS
            with ui.step_progress("copying eligible rows", len(ref.parts), "parts") as tick:
                return fill_cache(ref, learner, found, cache_dir, filters, embeddings, tick)

        summary = _select_into(cfg, cfg.out, ref, learner, identity, found.counts, build)
        return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)

    task_dir = task_directory(cfg.out, index, count)
    task_identity = {**identity, "task": index}
    mine = finished_output(task_dir, SUMMARY, MANIFEST, task_identity, "task selection")
    if mine is None:
        dones = _scatter(cfg, ref, learner, identity, index, count)
        if dones is None:  # round 2 waits for every task's round 1
            return SelectReport(task_dir, {}, reused=False, seconds=time.time() - began,
                                task=index, waiting="scatter")  # fmt: skip
        root = cfg.out / TASKS_DIR / SCATTER_DIR
        counts = scatter_mod.counts_for(root, count, index)

        def build(cache_dir: Path) -> RowCache:
            label = "gathering this task's rows"
            with ui.step_progress(label, len(ref.parts), "parts") as tick:
                return scatter_mod.gather(ref, learner, root, dones, index, cache_dir, tick)

        where = f" in task {index}'s partition"
        mine = _select_into(cfg, task_dir, ref, learner, task_identity, counts, build, where)
        scatter_mod.drop_buckets(root, index, count)
    else:
        log.info("task %d of %d already finished in %s", index, count, task_dir)
    waiting = unfinished_tasks(cfg.out, identity, count)
    if waiting:  # another task merges when it finishes last
        log.info("task %d of %d done; %d tasks still to finish", index, count, len(waiting))
        return SelectReport(task_dir, mine, reused=False, seconds=time.time() - began, task=index)
    summary = merge(cfg.out, identity, count)
    return SelectReport(cfg.out, summary, reused=False, seconds=time.time() - began)


def _scatter(
    cfg: SelectConfig,
    ref: ScoreSet,
    learner: ScoreSet | None,
    identity: dict[str, Any],
    index: int,
    count: int,
) -> list[dict[str, Any]] | None:
    """Round 1 (io/scatter.py): bucket this task's share of the parts, unless done; then every
    task's done.json, or None while some task has still to scatter."""
    root = cfg.out / TASKS_DIR / SCATTER_DIR
    parts = len(range(index, len(ref.parts), count))
    mine = scatter_mod.scatter_directory(root, index, count)
    if scatter_mod.read_done(mine, identity) is not None:
        log.info("task %d of %d already scattered its rows", index, count)
    else:
        with ui.step_progress("scattering rows to tasks", parts, "parts") as tick:
            scatter_mod.scatter(
                ref,
                learner,
                _filters(cfg, ref),
                cfg.method in SUPER_BATCH_METHODS,
                root,
                index,
                count,
                identity,
                on_part=tick,
            )
    dones = [scatter_mod.read_done(scatter_mod.scatter_directory(root, s, count), identity)
             for s in range(count)]  # fmt: skip
    missing = [s for s, d in enumerate(dones) if d is None]
    if missing:
        log.info("task %d scattered; %d tasks have still to scatter", index, len(missing))
        return None
    return [d for d in dones if d is not None]


def _existing(cfg: SelectConfig, identity: dict[str, Any], count: int) -> dict[str, Any] | None:
    """The summary of the finished selection OUT holds with this identity (to reuse), or None
    (to select); a refusal for anything else OUT holds, unless --overwrite replaces it."""
    _refuse_other_outputs(cfg.out)
    if cfg.overwrite:
        if count > 1 or cfg.merge:
            raise JCError(
                "--overwrite replaces a selection made in one run; array tasks would remove "
                f"each other's work: remove {cfg.out} first instead"
            )
        return None  # removed once the new selection is known to be possible (_select_into)
    _refuse_other_task_counts(cfg.out, count)
    instead = "use another --out, or --overwrite to replace it"
    done = finished_output(cfg.out, SUMMARY, MANIFEST, identity, "selection", instead)
    if done is not None and done.get("partition") != identity.get("partition"):
        there, now = (_made_as(x.get("partition")) for x in (done, identity))
        raise JCError(
            f"{cfg.out} holds a different selection (partition: {there} there, {now} now); "
            f"{instead}"
        )
    return done


def _refuse_other_outputs(out: Path) -> None:
    """A score set or a dedup output in OUT is not a selection, to reuse or to replace."""
    from jestcurate.pipelines.dedup import OUTPUT as DEDUP_OUTPUT

    for name, what in ((META_NAME, "a score set"), (DEDUP_OUTPUT, "a dedup output")):
        if (out / name).exists():
            raise JCError(f"{out} is {what}, not a selection; use another --out")
    summary = out / SUMMARY
    if summary.is_file():
        try:
            found = read_json(summary)
        except (OSError, ValueError):
            return  # finished_output reports it; --overwrite replaces it
        if "method" not in found:
            raise JCError(f"{summary} is not a selection's summary; use another --out")


def _made_as(partition: dict[str, Any] | None) -> str:
    return f"{partition.get('num_tasks')} array tasks" if partition else "one run"


def _warn_failed_shards(scores: ScoreSet | None) -> None:
    """Rows lost with a failed shard are missing from the pool: say so, once per run."""
    failed = [] if scores is None else scores.failed_shards()
    if not failed:
        return
    shown = some(failed)
    assert scores is not None
    log.warning(
        "%s: %d of %d shards failed when scored, so their rows after each failure are not in "
        "the pool: %s. `jestcurate status %s` lists them; rerunning `jestcurate score` with the "
        "same options retries them",
        scores.path, len(failed), len(scores.parts), shown, scores.path,
    )  # fmt: skip


def remove_selection(out: Path) -> None:
    """What select (and its export) wrote into OUT, summary first: an interrupted removal
    leaves an unfinished selection, which the next run redoes. Other files are left alone."""
    from jestcurate.pipelines.export import SHARD_LIST, SHARDS_DIR

    if not out.is_dir():
        return
    for name in (SUMMARY, MANIFEST, UIDS, SHARD_LIST):
        (out / name).unlink(missing_ok=True)
    for name in (TASKS_DIR, SHARDS_DIR, ".cache"):
        shutil.rmtree(out / name, ignore_errors=True)


def _task(cfg: SelectConfig) -> tuple[int, int]:
    """(index, count) of this array task; --merge needs only the count."""
    if cfg.merge:
        count = cfg.num_tasks or _tasks_in(cfg.out)
        if count < 2:
            raise JCError("--merge joins the outputs of 2 or more array tasks (--num-tasks N)")
        return 0, count
    if cfg.task_index is None and cfg.num_tasks == 1:
        return 0, 1  # --num-tasks 1: one selection over every row, whatever Slurm says
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    if cfg.task_index is None and count > 1:
        log.warning(
            "selecting as array task %d of %d (from Slurm's variables): from 1/%d of the rows; "
            "pass --num-tasks 1 for one selection over every row",
            index,
            count,
            count,
        )
    return index, count


def _refuse_other_task_counts(out: Path, count: int) -> None:
    """Array-task outputs of another N (or any, for a single run) in OUT are another selection."""
    found = _task_counts(out)
    if found and found != {count}:
        shown = ", ".join(str(n) for n in sorted(found))
        raise JCError(
            f"{out / TASKS_DIR} holds array-task outputs for N = {shown}, not {count}; use "
            "the same --num-tasks or another --out"
        )


def _task_counts(out: Path) -> set[int]:
    folders = [*(out / TASKS_DIR).glob("*-of-*"), *(out / TASKS_DIR / SCATTER_DIR).glob("*-of-*")]
    return {int(p.name[-5:]) for p in folders if re.fullmatch(r"\d{5}-of-\d{5}", p.name)}


def _tasks_in(out: Path) -> int:
    """The N of the OUT/tasks/I-of-N folders, when --merge is not told it."""
    counts = _task_counts(out)
    if len(counts) != 1:
        found = "none" if not counts else ", ".join(map(str, sorted(counts)))
        raise JCError(f"pass --num-tasks: {out / TASKS_DIR} holds task outputs for N = {found}")
    return counts.pop()


def _too_few_rows(cfg: SelectConfig, counts: Counts) -> str:
    """Why there is no super-batch: the eligible rows, what the filters took out of the rows and
    the option to change (the filter's own when one took most of what it was given)."""
    removed = [
        (counts.errors, "are errors"),
        (counts.below_min_clip_score, "are below --min-clip-score"),
        (counts.duplicates, f"were dropped by --dedup {cfg.dedup}"),
    ]
    said = ", ".join(f"{n:,} {what}" for n, what in removed if n)
    line = (
        f"{counts.eligible:,} eligible rows{f' (of {counts.rows:,}: {said})' if said else ''} are "
        f"fewer than one super-batch of B = round(b / ratio) = {cfg.super_batch:,}; "
    )
    ok = counts.rows - counts.errors
    offered = ok - counts.below_min_clip_score  # what dedup's verdicts applied to
    if counts.duplicates > offered / 2:
        line += (
            f"the dedup dropped most rows ({counts.duplicates:,} of {offered:,}): rerun "
            "`jestcurate dedup` with a smaller --eps (its warning suggests one when the embedding "
            "space looks collapsed), or "
        )
    elif counts.below_min_clip_score and counts.below_min_clip_score == ok:
        return (
            f"no row passes --min-clip-score {cfg.min_clip_score}: all {ok:,} scored rows are "
            "below it (`jestcurate info` on the score set shows its clip_score quantiles)"
        )
    elif counts.below_min_clip_score > ok / 2:
        line += "lower --min-clip-score, or "
    fits = _largest_batch(counts.eligible, cfg.ratio)
    if fits < 1:
        return f"{line}raise --ratio"
    return f"{line}pass --batch-size {fits:,} or less (at --ratio {cfg.ratio:g}), or raise --ratio"


def _largest_batch(rows: int, ratio: float) -> int:
    """The largest b whose super-batch max(b, round(b / ratio)) fits in `rows`."""
    b = int(rows * ratio) + 1
    while b > 0 and max(b, round(b / ratio)) > rows:
        b -= 1
    return b


def _select_into(
    cfg: SelectConfig,
    out: Path,
    ref: ScoreSet,
    learner: ScoreSet | None,
    identity: dict[str, Any],
    counts: Counts,
    build: Callable[[Path], RowCache],
    where: str = "",
) -> dict[str, Any]:
    """Choose from the eligible rows `build` copies into a cache, and write manifest, uids and
    (last) summary into `out`."""
    big = cfg.super_batch if cfg.method in SUPER_BATCH_METHODS else None
    steps = counts.eligible // cfg.super_batch
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps == 0 and not where:
        raise JCError(_too_few_rows(cfg, counts))
    if steps == 0:  # a task's partition too small: its rows are tail, the other tasks go on
        log.warning("%d eligible rows%s: less than one super-batch", counts.eligible, where)
    if cfg.overwrite:  # the new selection is possible: now the old one goes
        remove_selection(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / ".cache"
    try:
        cache = build(cache_dir)
        everything = _Means()
        score_names = ["clip_score", "ref_loss", *(["learner_loss"] if learner else [])]
        for start in range(0, cache.size, 1 << 20):
            stop = min(start + (1 << 20), cache.size)
            everything.add({c: cache.read_range(c, start, stop) for c in score_names})
        label = f"selecting ({cfg.method})"
        with ui.step_progress(label, steps, "batches") as tick:
            batches = choose(cfg, cache, ref, learner, steps, on_batch=tick)
            kept, halves = write_manifest(out / MANIFEST, cache, batches, learner is not None)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    subset = None if halves is None else datacomp_uids(halves)
    _write_uids(out, subset)
    candidates = steps * cfg.super_batch if big else counts.eligible
    summary = {
        **identity,
        "schema_version": SELECTION_SCHEMA_VERSION,
        "tool_version": __version__,
        "counts": {
            **asdict(counts),
            "steps": steps,
            "super_batches": steps if big else None,
            "candidates": candidates,
            "tail_dropped": counts.eligible - candidates,
            "kept": kept.count,
            "dropped": counts.eligible - kept.count,
        },
        "means": {
            "kept": kept.means(learner is not None),
            "dropped": everything.means(learner is not None, minus=kept),
        },
        "outputs": _outputs(subset is not None, ref.has_images),
        "files": file_digests(out, [MANIFEST, UIDS]),  # what `jestcurate verify` checks
    }
    if where:  # an array task's: the merge needs exact sums, not rounded means
        summary["sums"] = {"kept": kept.state(), "eligible": everything.state()}
    write_json_atomic(out / SUMMARY, summary)  # last: its presence means the selection is whole
    return summary


def _outputs(uids: bool, images: bool) -> dict[str, Any]:
    return {
        "manifest": MANIFEST,
        "uids": UIDS if uids else None,
        # false for a set imported from embeddings: nothing to export or load (kept here, so
        # the check holds after the score set moves)
        "images": images,
    }


def _write_uids(out: Path, subset: np.ndarray | None) -> None:
    if subset is not None:
        atomic_write(out / UIDS, lambda tmp: _save_npy(tmp, subset))
    else:
        with contextlib.suppress(FileNotFoundError):
            (out / UIDS).unlink()


# --- array tasks ----------------------------------------------------------------------------


def partition_identity(count: int) -> dict[str, Any]:
    return {"num_tasks": count, "by": PARTITION_BY, "hash": PARTITION_HASH}


def task_directory(out: Path, index: int, count: int) -> Path:
    return out / TASKS_DIR / f"{index:05d}-of-{count:05d}"


def _task_summary(out: Path, identity: dict[str, Any], index: int) -> dict[str, Any] | None:
    count = identity["partition"]["num_tasks"]
    directory = task_directory(out, index, count)
    return finished_output(directory, SUMMARY, MANIFEST, {**identity, "task": index}, "task")


def unfinished_tasks(out: Path, identity: dict[str, Any], count: int) -> list[int]:
    """Tasks of this selection whose outputs are not finished yet."""
    return [i for i in range(count) if _task_summary(out, identity, i) is None]


def merge(out: Path, identity: dict[str, Any], count: int) -> dict[str, Any]:
    """Join the N tasks' selections into OUT/manifest.parquet, uids.npy and summary.json: their
    batches interleaved into one step order (partition.interleave), counts summed, means from
    the tasks' exact sums. Deterministic: the same task outputs give the same bytes."""
    summaries = [_task_summary(out, identity, i) for i in range(count)]
    missing = [i for i, s in enumerate(summaries) if s is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise JCError(
            f"cannot merge {out}: {len(missing)} of {count} tasks have not finished ({shown}); "
            "run them (select --task-index I --num-tasks N) first"
        )
    tasks: list[dict[str, Any]] = [s for s in summaries if s is not None]
    steps = [int(s["counts"]["steps"]) for s in tasks]
    if not sum(steps):
        eligible = sum(int(s["counts"]["eligible"]) for s in tasks)
        b, ratio = identity["parameters"]["batch_size"], identity["parameters"]["ratio"]
        raise JCError(
            f"no task's partition holds one super-batch of B = {max(b, round(b / ratio))} rows "
            f"({eligible} eligible in all, about {eligible // count} per task); use fewer "
            "tasks, a lower --batch-size or a higher --ratio"
        )
    learner = identity["inputs"]["learner"] is not None
    order = interleave(steps)
    files = [pq.ParquetFile(task_directory(out, i, count) / MANIFEST) for i in range(count)]

    def write(tmp: Path) -> None:
        schema = manifest_schema(learner)
        with (
            pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer,
            ui.step_progress("merging task manifests", len(order), "batches") as tick,
        ):
            for step, (task, local) in enumerate(order):
                table = files[task].read_row_group(local)
                renumbered = pa.array(np.full(table.num_rows, step, dtype=np.int64))
                table = table.set_column(0, schema.field("step"), renumbered)
                writer.write_table(table, row_group_size=max(table.num_rows, 1))  # one per step
                tick()

    atomic_write(out / MANIFEST, write)
    with_uids = all(s["outputs"]["uids"] for s in tasks)
    subset = None
    if with_uids:
        parts = [np.load(task_directory(out, i, count) / UIDS) for i in range(count)]
        subset = np.sort(np.concatenate(parts))
    _write_uids(out, subset)
    counts: dict[str, Any] = {}
    for s in tasks:
        for name, value in s["counts"].items():
            counts[name] = None if value is None else counts.get(name, 0) + value
    kept, eligible = _Means(), _Means()
    for s in tasks:
        kept.merge(s["sums"]["kept"])
        eligible.merge(s["sums"]["eligible"])
    summary = {
        **identity,
        "schema_version": SELECTION_SCHEMA_VERSION,
        "tool_version": __version__,
        "counts": counts,
        "means": {
            "kept": kept.means(learner),
            "dropped": eligible.means(learner, minus=kept),
        },
        "outputs": _outputs(subset is not None, all(s["outputs"]["images"] for s in tasks)),
        "tasks": [
            {"task": i, "steps": s["counts"]["steps"], "eligible": s["counts"]["eligible"]}
            for i, s in enumerate(tasks)
        ],
        "files": file_digests(out, [MANIFEST, UIDS]),
    }
    write_json_atomic(out / SUMMARY, summary)
    shutil.rmtree(out / TASKS_DIR / SCATTER_DIR, ignore_errors=True)  # every task has its rows
    return summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def print_summary(report: Any, console: Console = ui.stdout) -> None:
    summary = report.summary
    counts = summary["counts"]
    table = ui.facts(f"jestcurate select: {summary['method']}")
    if summary.get("score"):
        table.add_row("batch score", summary["score"])
    table.add_row("rows in score set", f"{counts['rows']:,}")
    table.add_row("  errors (never selected)", f"{counts['errors']:,}")
    if counts["below_min_clip_score"]:
        table.add_row("  below --min-clip-score", f"{counts['below_min_clip_score']:,}")
    table.add_row("eligible", f"{counts['eligible']:,}")
    if counts["tail_dropped"]:
        table.add_row("  tail (no full super-batch)", f"{counts['tail_dropped']:,}")
    batch = summary["parameters"]["batch_size"]
    table.add_row("batches", f"{counts['steps']:,} x {batch:,}")
    table.add_row("kept", f"{counts['kept']:,}")
    for name, value in summary["means"]["kept"].items():
        dropped = summary["means"]["dropped"].get(name)
        if value is not None and dropped is not None:
            table.add_row(f"  mean {name}", f"{value:.4f} kept, {dropped:.4f} dropped")
    partition = summary.get("partition")
    if report.task is not None:
        count = partition["num_tasks"]
        table.add_row("array task", f"{report.task} of {count} (its partition only)")
        table.add_row("", "the last task to finish merges them")
    elif partition:
        table.add_row("array tasks", f"{partition['num_tasks']:,}, merged")
    if report.reused:
        table.add_row("", "already selected (reused)")
    else:
        table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"selection: {report.out}", highlight=False, soft_wrap=True)
