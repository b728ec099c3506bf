"""Joint example selection (JEST, Evans et al. 2024, Algorithm 1): pure torch, no I/O.

A batch's score is a signed sum of batch losses (learnability: learner loss minus reference loss;
easy-ref: minus the reference loss). The sampler grows the batch chunk by chunk, drawing each
chunk without replacement with probability proportional to exp(conditional score / T), where the
conditional score of candidate j is how much the batch score changes if j joins the chosen set C.

Conditional scores are exact for both losses (docs/select.md):
* sigmoid: the loss is a sum of pair terms, so ΔL_j = P_jj + Σ_{k∈C} (P_kj + P_jk), kept as one
  running length-B vector updated with a |chunk| x B block per step;
* softmax: adding j changes the log-sum-exp of every chosen example, so
  ΔL_j = ℓ_j(C ∪ {j}) + ½ Σ_{i∈C} [softplus(α s_ij − log R_i) + softplus(α s_ji − log T_i)],
  with log R_i and log T_i the chosen examples' running log-sum-exps. The |C| x B logit rows are
  cached when they fit the memory budget and recomputed in blocks otherwise.
Batch losses are sums over examples (not means): the normalisation is a constant per step and
does not change which examples are drawn. Random numbers come from a CPU generator, so the CPU
and the GPU draw the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

CRITERIA = ("learnability", "easy-ref", "hard-learner")


@dataclass(frozen=True)
class Embeddings:
    """One model's view of a super-batch: L2-normalised float32 (B, D) tensors on one device."""

    img: torch.Tensor
    txt: torch.Tensor
    scale: float
    bias: float | None
    kind: str  # "softmax" | "sigmoid"


class BatchLoss(Protocol):
    """A batch loss L(C) that can say, for every candidate j, L(C ∪ {j}) − L(C)."""

    def gains(self) -> torch.Tensor: ...

    def add(self, picked: torch.Tensor) -> None: ...


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class SigmoidLoss:
    """L(C) = Σ_{i,j∈C} P_ij with P_ii = softplus(−(α s_ii + β)), P_ij = softplus(α s_ij + β)."""

    def __init__(self, e: Embeddings, block: int = 1024) -> None:
        self.e = e
        self.block = block
        diag = e.scale * (e.img * e.txt).sum(-1) + (e.bias or 0.0)
        self.alone = F.softplus(-diag)
        self.pairs = torch.zeros_like(self.alone)  # Σ_{k∈C} (P_kj + P_jk) for every j

    def gains(self) -> torch.Tensor:
        return self.alone + self.pairs

    def add(self, picked: torch.Tensor) -> None:
        e, bias = self.e, self.e.bias or 0.0
        for part in _blocks(len(picked), self.block):
            rows = picked[part]
            # For j in `picked` itself the k = j term is wrong (a negative instead of a positive),
            # but chosen examples are never candidates again.
            self.pairs += F.softplus(e.scale * (e.img[rows] @ e.txt.T) + bias).sum(0)
            self.pairs += F.softplus(e.scale * (e.txt[rows] @ e.img.T) + bias).sum(0)


class SoftmaxLoss:
    """L(C) = Σ_{i∈C} ½ [(LSE_{k∈C} α s_ik − α s_ii) + (LSE_{k∈C} α s_ki − α s_ii)]."""

    def __init__(self, e: Embeddings, cache_rows: bool = True, block: int = 1024) -> None:
        self.e = e
        self.cache_rows = cache_rows
        self.block = block
        self.diag = e.scale * (e.img * e.txt).sum(-1)
        n = len(self.diag)
        # U_j = LSE_{k∈C} α s_jk (image j vs chosen texts), V_j = LSE_{k∈C} α s_kj (text j vs
        # chosen images). For a chosen i they are its log R_i and log T_i.
        self.u = torch.full((n,), -math.inf, dtype=self.diag.dtype, device=e.img.device)
        self.v = torch.full((n,), -math.inf, dtype=self.diag.dtype, device=e.img.device)
        self.chosen: list[torch.Tensor] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # cached (α s_i·, α s_·i)

    def _logits(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.e
        return e.scale * (e.img[idx] @ e.txt.T), e.scale * (e.txt[idx] @ e.img.T)

    def gains(self) -> torch.Tensor:
        own = 0.5 * (F.softplus(self.u - self.diag) + F.softplus(self.v - self.diag))
        if not self.chosen:
            return own
        spill = torch.zeros_like(own)
        pieces: Iterable[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
        if self.cache_rows:
            pieces = zip(self.chosen, self.rows, strict=True)
        else:  # recomputed block by block: memory O(block x B) instead of O(|C| x B)
            chosen = torch.cat(self.chosen)
            blocks = _blocks(len(chosen), self.block)
            pieces = ((chosen[p], self._logits(chosen[p])) for p in blocks)
        for idx, (to_texts, to_images) in pieces:
            spill += F.softplus(to_texts - self.u[idx, None]).sum(0)
            spill += F.softplus(to_images - self.v[idx, None]).sum(0)
        return own + 0.5 * spill

    def add(self, picked: torch.Tensor) -> None:
        for part in _blocks(len(picked), self.block):
            idx = picked[part]
            to_texts, to_images = self._logits(idx)  # α s_kj and α s_jk for k in idx
            self.v = torch.logaddexp(self.v, torch.logsumexp(to_texts, 0))
            self.u = torch.logaddexp(self.u, torch.logsumexp(to_images, 0))
            self.chosen.append(idx)
            if self.cache_rows:
                self.rows.append((to_texts, to_images))


class MatrixLoss:
    """A batch score given as an explicit pairwise matrix: L(C) = Σ_{i,j∈C} S_ij. For small
    problems and tests; S_jj is the score of j alone."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.pairs = torch.zeros(len(matrix), dtype=matrix.dtype, device=matrix.device)

    def gains(self) -> torch.Tensor:
        return self.matrix.diagonal() + self.pairs

    def add(self, picked: torch.Tensor) -> None:
        self.pairs += self.matrix[picked].sum(0) + self.matrix[:, picked].sum(1)


def batch_loss(e: Embeddings, cache_rows: bool = True) -> BatchLoss:
    if e.kind == "sigmoid":
        return SigmoidLoss(e)
    if e.kind == "softmax":
        return SoftmaxLoss(e, cache_rows=cache_rows)
    raise ValueError(f"unknown loss kind {e.kind!r}")


def criterion_terms(
    criterion: str,
    reference: Embeddings | None,
    learner: Embeddings | None,
    cache_rows: bool = True,
) -> list[tuple[float, BatchLoss]]:
    """The signed batch losses whose sum is the batch score for a JEST criterion."""
    if criterion == "learnability":
        if learner is None or reference is None:
            raise ValueError("learnability needs learner and reference embeddings")
        return [(1.0, batch_loss(learner, cache_rows)), (-1.0, batch_loss(reference, cache_rows))]
    if criterion == "easy-ref":
        if reference is None:
            raise ValueError("easy-ref needs reference embeddings")
        return [(-1.0, batch_loss(reference, cache_rows))]
    if criterion == "hard-learner":
        if learner is None:
            raise ValueError("hard-learner needs learner embeddings")
        return [(1.0, batch_loss(learner, cache_rows))]
    raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")


def softmax_cache_bytes(batch_size: int, candidates: int, models: int) -> int:
    """Memory the cached softmax logit rows take at the end of a super-batch (float32)."""
    return 2 * models * batch_size * candidates * 4


# The softmax sampler caches the chosen examples' logit rows up to this size on the CPU (half the
# free memory on CUDA), else recomputes them.
CPU_ROW_CACHE_BYTES = 2 << 30


def row_cache_fits(batch_size: int, candidates: int, models: int, device: torch.device) -> bool:
    """Whether to cache logit rows (criterion_terms' cache_rows) for this batch on `device`.
    select and the online selector decide alike, so they compute the same numbers."""
    budget = CPU_ROW_CACHE_BYTES
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    return softmax_cache_bytes(batch_size, candidates, models) <= budget


def chunk_sizes(batch_size: int, n_chunks: int) -> list[int]:
    """Split b into n_chunks near-equal chunk sizes (the first ones one larger)."""
    n_chunks = max(1, min(n_chunks, batch_size))
    base, extra = divmod(batch_size, n_chunks)
    return [base + (1 if i < extra else 0) for i in range(n_chunks)]


def gumbel(n: int, generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise drawn on the CPU (float64 so tiny uniforms stay finite)."""
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1 - 1e-16)))


def _top(logits: torch.Tensor, k: int, quota: Quota | None = None) -> torch.Tensor:
    # A stable sort breaks ties by position, identically on every device.
    order = torch.sort(logits, descending=True, stable=True).indices
    if quota is None:
        return order[:k]
    return torch.as_tensor(quota.take(order[torch.isfinite(logits[order])].tolist(), k)).to(order)


class Quota:
    """At most `cap` picks per group (cluster); if that cannot fill a batch, the best of the
    rest fill it, so every batch still has exactly b examples."""

    def __init__(self, groups: list[int], cap: int) -> None:
        self.groups = groups
        self.cap = cap
        self.used: dict[int, int] = {}

    def take(self, order: list[int], k: int) -> list[int]:
        chosen: list[int] = []
        over: list[int] = []
        for i in order:
            g = self.groups[i]
            if self.used.get(g, 0) < self.cap:
                chosen.append(i)
                self.used[g] = self.used.get(g, 0) + 1
                if len(chosen) == k:
                    return chosen
            else:
                over.append(i)
        for i in over[: k - len(chosen)]:
            self.used[self.groups[i]] = self.used.get(self.groups[i], 0) + 1
            chosen.append(i)
        return chosen


def joint_select(
    terms: Sequence[tuple[float, BatchLoss]],
    batch_size: int,
    n_chunks: int = 16,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    topk: bool = False,
    quota: Quota | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `batch_size` of the B candidates jointly. Returns (indices in pick order, the
    conditional score each had when picked).

    Each chunk is a draw without replacement ∝ exp(score / temperature) (Gumbel-top-k), or with
    `topk` the chunk's highest conditional scores (deterministic). With a `quota`, each group
    contributes at most its cap to the batch.
    """
    if not terms:
        raise ValueError("no score terms")
    device = terms[0][1].gains().device
    n = len(terms[0][1].gains())
    if not 0 < batch_size <= n:
        raise ValueError(f"cannot choose {batch_size} of {n} candidates")
    if temperature <= 0 and not topk:
        raise ValueError("temperature must be positive (or use topk)")
    generator = generator or torch.Generator().manual_seed(0)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    picks: list[torch.Tensor] = []
    picked_scores: list[torch.Tensor] = []
    for size in chunk_sizes(batch_size, n_chunks):
        score = terms[0][0] * terms[0][1].gains()
        for sign, term in terms[1:]:
            score = score + sign * term.gains()
        logits = score.double() if topk else score.double() / temperature
        if not topk:
            logits = logits + gumbel(n, generator).to(device)
        logits = logits.masked_fill(taken, -math.inf)
        pick = _top(logits, size, quota)
        taken[pick] = True
        picks.append(pick)
        picked_scores.append(score[pick])
        for _, term in terms:
            term.add(pick)
    return torch.cat(picks), torch.cat(picked_scores).float()
