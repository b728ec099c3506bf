"""Choosing training batches from the eligible rows' cache: global rankings (random,
clip-score) or super-batches (easy-ref, learnability, jest)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from jestcurate.io.eligible import CLIP_SCORE, CLUSTER, EMBEDDINGS
from jestcurate.io.rowcache import RowCache
from jestcurate.io.store import (
    ScoreSet,
)
from jestcurate.math.jest import (
    Quota,
    independent_scores,
    row_cache_fits,
    select_batch,
)
from jestcurate.math.losses import Embeddings
from jestcurate.model.openclip import resolve_device
from jestcurate.pipelines.select.config import SUPER_BATCH_METHODS, SelectConfig
from jestcurate.pipelines.select.quotas import ClusterQuotas

Batch = tuple[np.ndarray, np.ndarray]  # (row ids, selection scores) of one training batch


def embeddings(
    cache: RowCache, ids: np.ndarray, model: str, s: ScoreSet, device: torch.device
) -> Embeddings:
    img_column, txt_column = EMBEDDINGS[model]
    img = torch.from_numpy(cache.read(img_column, ids)).to(device).float()
    txt = torch.from_numpy(cache.read(txt_column, ids)).to(device).float()
    return Embeddings(img, txt, s.scale, s.bias, s.kind)


def _shuffled(
    ids: np.ndarray, scores: np.ndarray, steps: int, b: int, seed: int
) -> Iterator[Batch]:
    """Non-joint methods: batches are a seeded shuffle of the kept set, never in score order."""
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    for s in range(steps):
        part = order[s * b : (s + 1) * b]
        yield ids[part], scores[part]


def clusters(cfg: SelectConfig, cache: RowCache) -> tuple[np.ndarray, int] | None:
    """With --balance-clusters or --cluster-quotas: each eligible row's cluster, and how many
    clusters there are."""
    if not cfg.balance_clusters and cfg.cluster_quotas is None:
        return None
    cluster = cache.read_range(CLUSTER, 0, cache.size)
    return cluster, max(1, len(np.unique(cluster[cluster >= 0])))


def _cap(items: int, clusters: int) -> int:
    """A cluster's most: twice its even share."""
    return max(1, math.ceil(2 * items / clusters))


def draw_order(cfg: SelectConfig, cache: RowCache) -> np.ndarray:
    """The order a method draws the eligible rows in (the ledger reads it too): a seeded
    permutation cut into super-batches (easy-ref, learnability, jest), a seeded permutation
    (random) or the ranking by clip_score (clip-score), whose first kept rows are kept."""
    n = cache.size
    if cfg.method in SUPER_BATCH_METHODS:
        return np.random.default_rng([cfg.seed, 0]).permutation(n)
    if cfg.method == "random":
        return np.random.default_rng([cfg.seed, 2]).permutation(n)
    return np.argsort(-cache.read_range(CLIP_SCORE, 0, n), kind="stable")


def _global(
    cfg: SelectConfig, cache: RowCache, steps: int, quotas: ClusterQuotas | None
) -> Iterator[Batch]:
    """random and clip-score: a kept set chosen over all eligible rows at once."""
    b = cfg.sampling.batch_size
    kept = steps * b
    order = draw_order(cfg, cache)
    balance = clusters(cfg, cache)
    if balance is None:
        ids = order[:kept]
    else:
        cluster, count = balance
        caps = quotas.caps() if quotas is not None else _cap(kept, count)
        quota = Quota(cluster.tolist(), caps)
        ids = np.array(quota.take(order.tolist(), kept), dtype=np.int64)
    if cfg.method == "random":
        scores = np.full(kept, np.nan, dtype=np.float32)
    else:
        scores = cache.read(CLIP_SCORE, ids)
    yield from _shuffled(ids, scores, steps, b, cfg.seed)


def super_batches(
    cfg: SelectConfig, cache: RowCache, ref: ScoreSet, learner: ScoreSet | None, steps: int
) -> Iterator[tuple[np.ndarray, Embeddings, Embeddings | None]]:
    """Consecutive slices of B rows of a global seeded permutation, with their embeddings."""
    device = resolve_device(cfg.device)
    perm = draw_order(cfg, cache)
    big = cfg.sampling.super_batch
    for s in range(steps):
        ids = perm[s * big : (s + 1) * big]
        ref_e = embeddings(cache, ids, "ref", ref, device)
        learner_e = embeddings(cache, ids, "learner", learner, device) if learner else None
        yield ids, ref_e, learner_e


def choose(
    cfg: SelectConfig,
    cache: RowCache,
    ref: ScoreSet,
    learner: ScoreSet | None,
    steps: int,
    on_batch: Callable[[], None] | None = None,
    quotas: ClusterQuotas | None = None,
) -> Iterator[Batch]:
    """Yield (row ids, selection scores) of each training batch, in step order. `quotas`
    (--cluster-quotas) replace --balance-clusters' equal caps."""
    tick = on_batch or (lambda: None)
    b = cfg.sampling.batch_size
    if cfg.method in ("random", "clip-score"):
        for batch in _global(cfg, cache, steps, quotas):
            yield batch
            tick()
        return
    rows = super_batches(cfg, cache, ref, learner, steps)
    balance = clusters(cfg, cache)

    def quota(ids: np.ndarray) -> Quota | None:
        if balance is None:
            return None
        cluster, count = balance
        if quotas is not None:
            return Quota(cluster[ids].tolist(), quotas.batch_caps(cluster[ids], b))
        return Quota(cluster[ids].tolist(), _cap(b, count))

    if cfg.method == "jest":
        generator = torch.Generator().manual_seed(cfg.seed)  # CPU: same draws on any device
        models = 2 if learner else 1
        big, device = cfg.sampling.super_batch, resolve_device(cfg.device)
        cache_rows = row_cache_fits(b, big, models, device)
        for ids, ref_e, learner_e in rows:
            picked, score = select_batch(
                cfg.sampling, ref_e, learner_e, generator, quota(ids), cache_rows
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
