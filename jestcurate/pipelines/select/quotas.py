"""select --cluster-quotas density: how many rows each dedup cluster may keep, from the
cluster's complexity (math/density.py: Abbas et al. 2024's density-based pruning), applied
where --balance-clusters' equal caps are (pipelines/select/choosing.py).

The centroids are the normalised means of the eligible rows' reference image embeddings, read
from the row cache in chunks: memory O(clusters x D) beside the cluster column, never O(rows x
D). Rows without a cluster (-1: not in the dedup output) are one more group, of the others'
mean complexity. random and clip-score apply the quotas to the kept set; the super-batch
methods share each batch's b rows out in proportion to them (see `batch_caps`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from jestcurate.io.eligible import REF_IMG
from jestcurate.io.rowcache import RowCache
from jestcurate.math.density import (
    FLOOR,
    NEIGHBOURS,
    ClusterSums,
    allocate,
    complexity,
    floors,
    softmax,
)
from jestcurate.pipelines.select.config import SUPER_BATCH_METHODS, SelectConfig

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.5  # the authors' code's default
CHUNK = 1 << 16  # cache rows read at a time
REASON = "cluster_quota"  # the ledger's not_chosen reason for rows the quotas left out


def temperature(cfg: SelectConfig) -> float:
    return DEFAULT_TEMPERATURE if cfg.quota_temperature is None else cfg.quota_temperature


def floor(cfg: SelectConfig) -> float:
    return FLOOR if cfg.quota_floor is None else cfg.quota_floor


def identity(cfg: SelectConfig) -> dict[str, Any] | None:
    """What a selection records of the quotas: None without them (old selections keep theirs).
    The floor is always there: quotas made before it existed had none, and differ."""
    if cfg.cluster_quotas is None:
        return None
    return {"method": cfg.cluster_quotas, "temperature": temperature(cfg), "neighbours": NEIGHBOURS,
            "floor": floor(cfg)}  # fmt: skip


@dataclass(frozen=True)
class ClusterQuotas:
    """Each group's quota of the `total` kept rows, and its complexity."""

    groups: np.ndarray  # cluster ids, sorted (-1: rows without a cluster)
    sizes: np.ndarray  # eligible rows per group
    quota: np.ndarray  # kept rows per group; sums to total, never above its size
    complexity: np.ndarray
    total: int
    per_batch: bool  # super-batch methods: each batch's share, not the kept set's
    non_finite: int = 0  # rows whose image embedding is not finite: left out of the centroids
    shares: dict[int, int] | None = None  # an array task's share of each quota (its rows')

    def caps(self) -> dict[int, int]:
        """The kept set's quota of each group (an array task's: its share of it)."""
        if self.shares is not None:
            return self.shares
        return dict(zip(self.groups.tolist(), self.quota.tolist(), strict=True))

    def batch_caps(self, cluster: np.ndarray, b: int) -> dict[int, int]:
        """One super-batch's caps: its b picks shared out in proportion to the quotas among
        the clusters it holds (each capped at its candidates there, the excess spread as for
        the quotas), so that every batch has the kept set's mix, as --balance-clusters caps
        every batch; capping the kept set instead would let the first batches use up
        clusters' quotas."""
        present, counts = np.unique(cluster, return_counts=True)
        weights = self.quota[np.searchsorted(self.groups, present)]
        shares = allocate(weights.astype(np.float64), counts, b)
        return dict(zip(present.tolist(), shares.tolist(), strict=True))

    def summary(self, cfg: SelectConfig) -> dict[str, Any]:
        """summary.json's `cluster_quotas`: the parameters and min / median / max."""

        def spread(values: np.ndarray) -> dict[str, float]:
            return {"min": float(values.min()), "median": float(np.median(values)),
                    "max": float(values.max())}  # fmt: skip

        return {
            **(identity(cfg) or {}),
            "applied_to": "each batch" if self.per_batch else "kept set",
            "clusters": len(self.groups),
            "kept": self.total,
            "quota": spread(self.quota.astype(np.float64)),
            "complexity": {k: round(v, 6) for k, v in spread(self.complexity).items()},
            "clusters_at_size": int((self.quota == self.sizes).sum()),
            "clusters_without_rows_kept": int((self.quota == 0).sum()),
            "rows_without_finite_embedding": self.non_finite,
        }


def compute(cfg: SelectConfig, cache: RowCache, cluster: np.ndarray, total: int) -> ClusterQuotas:
    """The quotas of `total` kept rows from the cache's rows (`cluster`: each row's group)."""
    groups, where, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    dim = cache.read_range(REF_IMG, 0, min(1, cache.size)).shape[-1] if cache.size else 1
    sums = np.zeros((len(groups), dim))
    members = np.zeros(len(groups), dtype=np.int64)  # rows in the sums: finite embeddings
    for start in range(0, cache.size, CHUNK):
        stop = min(start + CHUNK, cache.size)
        part = ClusterSums.of(where[start:stop], cache.read_range(REF_IMG, start, stop))
        sums[part.ids] += part.sums
        members[part.ids] += part.finite
    found = ClusterSums(groups.astype(np.int64), sums, members, sizes.astype(np.int64))
    return from_sums(cfg, found, total)


def from_sums(cfg: SelectConfig, found: ClusterSums, total: int) -> ClusterQuotas:
    """The quotas of `total` kept rows from the groups' embedding sums: one run's (over its
    cache) and array tasks' (over every scatter's sums, added up) alike."""
    groups, sizes, members = found.ids, found.rows, found.finite
    non_finite = int(sizes.sum() - members.sum())
    if non_finite:
        log.warning("--cluster-quotas: %d rows have a non-finite image embedding; the "
                    "centroids leave them out", non_finite)  # fmt: skip
    known = groups >= 0
    c = np.zeros(len(groups))
    c[known] = complexity(found.sums[known], members[known], NEIGHBOURS)
    if not known.all():
        c[~known] = c[known].mean() if known.any() else 0.0
    lower = floors(sizes, total, floor(cfg))
    quota = allocate(softmax(c, temperature(cfg)), sizes, total, lower)
    per_batch = cfg.method in SUPER_BATCH_METHODS
    return ClusterQuotas(groups, sizes, quota, c, int(quota.sum()), per_batch, non_finite)
