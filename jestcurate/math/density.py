"""Density-based cluster quotas (Abbas et al. 2024, "Effective pruning of web-scale datasets
based on complexity of concept clusters", arXiv 2401.04578): how many examples each cluster
keeps, from how diffuse the cluster is and how far it lies from its neighbours. Arrays in,
arrays out.

Per cluster j with n_j members x (unit vectors) and centroid c_j = normalise(sum x):
    d_intra_j = mean over members of 1 - cos(x, c_j) = 1 - |sum x| / n_j
    d_inter_j = mean of 1 - cos(c_j, c_k) over its `neighbours` nearest other centroids
    C_j = d_inter_j * d_intra_j,  p = softmax(C / temperature)
and the quotas N_j solve the authors' quadratic program (prune.py's pruning_qp): N_j as near
p_j * N as possible with sum N_j = N and lb_j <= N_j <= n_j, where the floor
lb_j = min(int(N / K * ratio), n_j - 1) (ratio: their cls_bal_ratio, default 0.5; 0 gives a
floor of 1), so every cluster keeps some rows; the excess of a capped cluster is spread as an
equal shift over the others. Where the authors solve it with OSQP and round with np.rint
(whose sum may miss N by a few), this is the exact projection, rounded by largest remainders
so that the sum is N and both bounds hold.

What matches the authors' code: the softmax over C / temperature (default 0.5), the QP's
objective, equality and bounds (floor included), and an empty cluster's complexity (their
NaN, replaced by the mean). d_intra and d_inter are the paper's definitions; the authors
compute them in separate scripts, not compared here. K is the number of clusters with
eligible rows (theirs: every k-means centroid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jestcurate.errors import JCError

NEIGHBOURS = 20  # l: the authors' default number of nearest centroids for d_inter
FLOOR = 0.5  # the authors' cls_bal_ratio default: each cluster's floor, of an even share
BLOCK = 1024  # centroids compared with all the others at a time (memory BLOCK x clusters)


def complexity(sums: np.ndarray, counts: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """C_j = d_inter_j * d_intra_j from each cluster's sum of unit embeddings (K x D) and
    member count (K). A cluster without members takes the mean complexity of the others."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    norms = np.linalg.norm(sums, axis=1)
    filled = counts > 0
    d_intra = np.zeros(len(counts))
    d_intra[filled] = np.clip(1.0 - norms[filled] / counts[filled], 0.0, 2.0)
    centroids = sums / np.maximum(norms, 1e-12)[:, None]
    d_inter = inter_distances(centroids, filled, neighbours)
    out = d_inter * d_intra
    if filled.any() and not filled.all():
        out[~filled] = out[filled].mean()
    return out


def inter_distances(centroids: np.ndarray, filled: np.ndarray, neighbours: int) -> np.ndarray:
    """Mean cosine distance of each centroid to its `neighbours` nearest other (filled)
    centroids, in blocks so that memory is O(BLOCK x K), not O(K^2)."""
    k = len(centroids)
    out = np.zeros(k)
    others = np.flatnonzero(filled)
    near = min(neighbours, len(others) - 1)
    if near < 1:
        return np.ones(k)  # one cluster: nothing to be near, every C_j scales alike
    pool = centroids[others]
    for start in range(0, k, BLOCK):
        block = centroids[start : start + BLOCK]
        sim = block @ pool.T
        own = np.flatnonzero((others >= start) & (others < start + len(block)))
        sim[others[own] - start, own] = -np.inf  # not itself
        top = -np.partition(-sim, near - 1, axis=1)[:, :near]
        out[start : start + len(block)] = np.mean(1.0 - top, axis=1)
    return out


def softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(values, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def floors(sizes: np.ndarray, total: int, ratio: float = FLOOR) -> np.ndarray:
    """The authors' lower bounds: lb_j = min(int(total / K * ratio), n_j - 1), a floor of 1
    for ratio 0, never below 0; none at all where they would not fit in `total` (ratio 0 with
    more clusters than kept rows)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not len(sizes):
        return sizes.copy()
    least = int(total / len(sizes) * ratio) if ratio > 0 else 1
    lb = np.clip(np.minimum(least, sizes - 1), 0, None)
    return lb if lb.sum() <= min(total, sizes.sum()) else np.zeros_like(sizes)


def allocate(
    weights: np.ndarray, sizes: np.ndarray, total: int, lower: np.ndarray | None = None
) -> np.ndarray:
    """Integer quotas summing to `total` (at most sizes.sum()), each within [lower, size]
    (`lower`: integers, summing to at most `total`; default 0): the nearest to
    weights / sum(weights) * total (the box-capped simplex projection: one shift added to every
    cluster off its bounds), then largest remainders for the rounding."""
    sizes = np.asarray(sizes, dtype=np.int64)
    lb = np.zeros_like(sizes) if lower is None else np.minimum(lower, sizes).astype(np.int64)
    total = int(min(total, sizes.sum()))
    w = np.asarray(weights, dtype=np.float64)
    w = np.full(len(sizes), 1.0) if w.sum() <= 0 else w
    target = w / w.sum() * total

    def filled(shift: float) -> float:
        return float(np.clip(target + shift, lb, sizes).sum())

    low, high = -float(target.max()) - 1.0, float(sizes.max()) + 1.0
    for _ in range(200):  # bisection on the shift; filled() is monotone in it
        mid = (low + high) / 2
        if filled(mid) < total:
            low = mid
        else:
            high = mid
    real = np.clip(target + high, lb, sizes)
    quota = np.clip(np.floor(real + 1e-9).astype(np.int64), lb, sizes)
    short = total - int(quota.sum())
    if short > 0:
        room = quota < sizes
        order = np.lexsort((np.arange(len(sizes)), -(real - quota)))  # stable: ties by index
        order = order[room[order]]
        quota[order[:short]] += 1
    elif short < 0:
        order = np.lexsort((np.arange(len(sizes)), real - quota))
        order = order[quota[order] > lb[order]]
        quota[order[:-short]] -= 1
    return quota


def density_quotas(
    sums: np.ndarray, counts: np.ndarray, total: int, temperature: float,
    neighbours: int = NEIGHBOURS, floor: float = FLOOR,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(quotas, complexities) of clusters with these unit-embedding sums and member counts,
    for `total` kept rows (`floor`: the authors' cls_bal_ratio)."""
    c = complexity(sums, counts, neighbours)
    lower = floors(counts, total, floor)
    return allocate(softmax(c, temperature), counts, total, lower), c


KINDS = ("density",)  # select's --cluster-quotas


@dataclass(frozen=True)
class ClusterSums:
    """Per group (dedup cluster; -1: rows without one): the sum of its rows' finite unit
    image embeddings (float64), its finite rows and all its rows. Sums of disjoint row sets
    add up (`plus`), so array tasks' scatters each keep theirs and every task adds them all
    up to the whole pool's: the quotas of one run."""

    ids: np.ndarray  # sorted group ids
    sums: np.ndarray  # len(ids) x D
    finite: np.ndarray  # rows in the sums
    rows: np.ndarray  # all rows, the non-finite too

    @staticmethod
    def empty(dim: int) -> ClusterSums:
        none = np.zeros(0, dtype=np.int64)
        return ClusterSums(none, np.zeros((0, dim)), none, none)

    @staticmethod
    def of(group: np.ndarray, emb: np.ndarray) -> ClusterSums:
        """The sums of rows with these groups and image embeddings (N x D)."""
        emb = np.asarray(emb, dtype=np.float64)
        ids, where, rows = np.unique(np.asarray(group, dtype=np.int64), return_inverse=True,
                                     return_counts=True)  # fmt: skip
        ok = np.isfinite(emb).all(axis=1)  # one NaN would make its cluster's sum NaN
        unit = emb[ok] / np.maximum(np.linalg.norm(emb[ok], axis=1), 1e-12)[:, None]
        sums = np.zeros((len(ids), emb.shape[1]))
        np.add.at(sums, where[ok], unit)
        finite = np.bincount(where[ok], minlength=len(ids)).astype(np.int64)
        return ClusterSums(ids, sums, finite, rows.astype(np.int64))

    def plus(self, other: ClusterSums) -> ClusterSums:
        """Both row sets' sums (in place where `other` has no new group: cheap per part)."""
        at = np.searchsorted(self.ids, other.ids)
        known = len(self.ids) > 0 and (at < len(self.ids)).all()
        if known and (self.ids[np.minimum(at, len(self.ids) - 1)] == other.ids).all():
            self.sums[at] += other.sums
            self.finite[at] += other.finite
            self.rows[at] += other.rows
            return self
        ids = np.union1d(self.ids, other.ids).astype(np.int64)
        dim = max(self.sums.shape[1], other.sums.shape[1])
        sums, finite, rows = np.zeros((len(ids), dim)), np.zeros_like(ids), np.zeros_like(ids)
        for part in (self, other):
            at = np.searchsorted(ids, part.ids)
            sums[at, : part.sums.shape[1]] += part.sums
            finite[at] += part.finite
            rows[at] += part.rows
        return ClusterSums(ids, sums, finite, rows)


def task_shares(quota: np.ndarray, task: np.ndarray, group: np.ndarray, rows: np.ndarray,
                kept: np.ndarray) -> np.ndarray:  # fmt: skip
    """Each array task's share of the groups' quotas (`quota`: per group 0..K-1), from the
    (task, group, rows) triples of every task's eligible rows (one per pair, with rows > 0):
    integers, per triple, that sum to each group's quota over the tasks and to each task's
    `kept` over the groups, never above the task's rows there. The tasks in turn: each takes
    the allocation (largest remainders) nearest to its rows' share of what is left of each
    quota, at least what the later tasks' rows could not hold. Deterministic."""
    shares = np.zeros(len(task), dtype=np.int64)
    left = np.asarray(quota, dtype=np.int64).copy()
    later = np.bincount(group, weights=rows, minlength=len(left)).astype(np.int64)
    for t in range(len(kept)):
        mine = np.flatnonzero(task == t)
        g, r = group[mine], rows[mine]
        later[g] -= r
        hi = np.minimum(r, left[g])
        lo = np.clip(left[g] - later[g], 0, None)
        target = left[g] * r / np.maximum(r + later[g], 1)
        take = allocate(target, hi, int(kept[t]), lo) if len(mine) else np.zeros(0, np.int64)
        if take.sum() != kept[t] or (take < lo).any():
            raise JCError(TASKS_UNFIT)
        shares[mine] = take
        left[g] -= take
    return shares


TASKS_UNFIT = (
    "--cluster-quotas: the array tasks' partitions cannot hold the global quotas exactly "
    "(rare, with few rows per cluster); run select as one task (--num-tasks 1)"
)
