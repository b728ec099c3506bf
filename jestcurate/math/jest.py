"""Joint example selection (JEST, Evans et al. 2024): pure torch, no I/O.

A batch's score is a signed sum of batch losses (learnability: learner loss minus reference loss;
easy-ref: minus the reference loss). Two samplers choose b of a super-batch of B candidates:

* `refine_select` (the default, docs/select.md): start from the independent top-b (each
  candidate's own score with the whole super-batch as context, the paper's per-example
  baseline), then sweep over the batch's chunks: take a chunk out, re-draw it given the rest of
  the batch, keep the new chunk only if it raises the batch score (blocked conditional
  updates, the Gibbs view of the paper's sampler). Its batch score is never below top-k's
  (up to float rounding: a swap must gain more than that to be made).
  Draws are ∝ exp(score / (T · spread)), spread being the standard deviation of the b best
  candidates' conditional scores at that step, so T means the same sharpness at every batch
  size.
* `joint_select`: the paper's Algorithm 1 as written: grow the batch chunk by chunk, each chunk
  drawn ∝ exp(conditional score / T), T in loss units.

Conditional scores are exact for both losses (math/losses.py). Random numbers come from a CPU
generator, so the CPU and the GPU draw the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from jestcurate.math.losses import BatchLoss, Embeddings, batch_loss
from jestcurate.math.sampling import CRITERIA, DEFAULT_CHUNKS, DEFAULT_TEMPERATURE, SamplerOptions
from jestcurate.math.scoring import example_losses


def _criterion_parts(
    criterion: str, reference: Embeddings | None, learner: Embeddings | None
) -> list[tuple[float, Embeddings]]:
    """The signed models whose batch losses add up to a criterion's batch score."""
    if criterion == "learnability":
        if learner is None or reference is None:
            raise ValueError("learnability needs learner and reference embeddings")
        return [(1.0, learner), (-1.0, reference)]
    if criterion == "easy-ref":
        if reference is None:
            raise ValueError("easy-ref needs reference embeddings")
        return [(-1.0, reference)]
    if criterion == "hard-learner":
        if learner is None:
            raise ValueError("hard-learner needs learner embeddings")
        return [(1.0, learner)]
    raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")


def criterion_terms(
    criterion: str,
    reference: Embeddings | None,
    learner: Embeddings | None,
    cache_rows: bool = True,
) -> list[tuple[float, BatchLoss]]:
    """The signed batch losses whose sum is the batch score for a JEST criterion."""
    parts = _criterion_parts(criterion, reference, learner)
    return [(sign, batch_loss(e, cache_rows)) for sign, e in parts]


def independent_scores(
    criterion: str, reference: Embeddings | None, learner: Embeddings | None
) -> torch.Tensor:
    """Each candidate's own score with the whole super-batch as its negatives (the score set's
    loss formula): the paper's per-example prioritisation, and the refine sampler's start."""
    parts = _criterion_parts(criterion, reference, learner)
    score = torch.zeros(len(parts[0][1].img), dtype=torch.float32, device=parts[0][1].img.device)
    for sign, e in parts:
        score = score + sign * example_losses(e.img, e.txt, e.scale, e.bias, e.kind)
    return score


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
    """At most `cap` picks per group (cluster): one cap for all, or each group's own (a group
    not named gets none); if that cannot fill a batch, the best of the rest fill it, so every
    batch still has exactly b examples."""

    def __init__(
        self, groups: list[int], cap: int | dict[int, int], used: dict[int, int] | None = None
    ) -> None:
        self.groups = groups
        self.cap = cap
        self.used: dict[int, int] = used or {}

    def take(self, order: list[int], k: int) -> list[int]:
        chosen: list[int] = []
        over: list[int] = []
        for i in order:
            g = self.groups[i]
            if self.used.get(g, 0) < (
                self.cap if isinstance(self.cap, int) else self.cap.get(g, 0)
            ):
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

    def release(self, picked: list[int]) -> None:
        """Give back the places of examples taken out of the batch."""
        for i in picked:
            self.used[self.groups[i]] -= 1

    def claim(self, picked: list[int]) -> None:
        """Count examples put (back) into the batch."""
        for i in picked:
            self.used[self.groups[i]] = self.used.get(self.groups[i], 0) + 1


def _combined(terms: Sequence[tuple[float, BatchLoss]]) -> torch.Tensor:
    score = terms[0][0] * terms[0][1].gains()
    for sign, term in terms[1:]:
        score = score + sign * term.gains()
    return score


def _check(terms: Sequence[tuple[float, BatchLoss]], batch_size: int) -> int:
    if not terms:
        raise ValueError("no score terms")
    n = len(terms[0][1].gains())
    if not 0 < batch_size <= n:
        raise ValueError(f"cannot choose {batch_size} of {n} candidates")
    return n


def joint_select(
    terms: Sequence[tuple[float, BatchLoss]],
    batch_size: int,
    n_chunks: int = DEFAULT_CHUNKS,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    topk: bool = False,
    quota: Quota | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Algorithm 1: choose `batch_size` of the B candidates by growing the batch
    chunk by chunk. Returns (indices in pick order, the conditional score each had when picked).

    Each chunk is a draw without replacement ∝ exp(score / temperature) (Gumbel-top-k), the
    temperature in loss units, or with `topk` the chunk's highest conditional scores
    (deterministic). With a `quota`, each group contributes at most its cap to the batch.
    """
    n = _check(terms, batch_size)
    if temperature <= 0 and not topk:
        raise ValueError("temperature must be positive (or use topk)")
    device = terms[0][1].gains().device
    generator = generator or torch.Generator().manual_seed(0)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    picks: list[torch.Tensor] = []
    picked_scores: list[torch.Tensor] = []
    for size in chunk_sizes(batch_size, n_chunks):
        score = _combined(terms)
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


def batch_score(terms: Sequence[tuple[float, BatchLoss]]) -> float:
    """The batch score of the set the terms hold now (the objective the samplers raise)."""
    return sum(sign * term.total() for sign, term in terms)


def _spread(logits: torch.Tensor, k: int) -> float:
    """The standard deviation of the k best finite scores: the scale of the competition for a
    place in the batch. The k best, because the far tail (noise with very negative scores) would
    otherwise set it and soften every draw."""
    free = logits[torch.isfinite(logits)]
    if len(free) < 2:
        return 0.0
    return float(torch.topk(free, min(max(k, 2), len(free))).values.std())


# A re-drawn chunk must beat the batch score by more than float rounding to replace the old one,
# so ties (flat scores, a batch of one) keep what is there instead of drifting.
_RELATIVE_GAIN = 1e-6


def refine_select(
    terms: Sequence[tuple[float, BatchLoss]],
    start: torch.Tensor,
    start_scores: torch.Tensor,
    n_chunks: int = DEFAULT_CHUNKS,
    generator: torch.Generator | None = None,
    temperature: float = DEFAULT_TEMPERATURE["refine"],
    topk: bool = False,
    quota: Quota | None = None,
    sweeps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Improve a starting batch (`start`, b indices; `quota` already counting them) by sweeps of
    blocked conditional updates: each chunk in turn is taken out and re-drawn given the rest of
    the batch, ∝ exp(conditional score / (temperature · spread)) (Gumbel-top-k; top-k where the
    spread is 0) or its top scores with `topk`. The new chunk replaces the old one only if it
    raises the batch score (beyond rounding), so the result never scores below the start.

    Returns (indices by chunk, each chunk in the order it was drawn when it last changed; each
    one's conditional score given the other chunks at its chunk's last turn, or its start score
    with no sweeps)."""
    batch_size = len(start)
    n = _check(terms, batch_size)
    if temperature <= 0 and not topk:
        raise ValueError("temperature must be positive (or use topk)")
    if sweeps < 0:
        raise ValueError("sweeps must be 0 or more")
    device = terms[0][1].gains().device
    generator = generator or torch.Generator().manual_seed(0)
    start, start_scores = start.to(device), start_scores.to(device).float()
    slots: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    at = 0
    for c, size in enumerate(chunk_sizes(batch_size, n_chunks)):
        slots.append(start[at : at + size])
        scores.append(start_scores[at : at + size])
        at += size
        for _, term in terms:
            term.add(slots[-1], slot=c)
    inside = torch.zeros(n, dtype=torch.bool, device=device)
    inside[start] = True
    best = batch_score(terms)
    for _ in range(sweeps if len(slots) > 1 else 0):  # one chunk has no rest to condition on
        for c, old in enumerate(slots):
            held = [term.remove(c) for _, term in terms]
            inside[old] = False
            if quota is not None:
                quota.release(old.tolist())
            score = _combined(terms)
            logits = score.double().masked_fill(inside, -math.inf)
            if not topk:
                noise = gumbel(n, generator).to(device)  # drawn every turn: one stream
                spread = _spread(logits, batch_size)
                if spread > 0:
                    logits = logits / (temperature * spread) + noise
            new = _top(logits, len(old), quota)  # a quota now counts `new` instead of `old`
            keep = old
            if set(new.tolist()) == set(old.tolist()):
                for (_, term), h in zip(terms, held, strict=True):
                    term.restore(c, h)
            else:
                for _, term in terms:
                    term.add(new, slot=c)
                value = batch_score(terms)
                if value > best + _RELATIVE_GAIN * max(1.0, abs(best)):
                    best, keep = value, new
                else:  # the old chunk back, exactly as it was
                    for (_, term), h in zip(terms, held, strict=True):
                        term.remove(c)
                        term.restore(c, h)
                    if quota is not None:
                        quota.release(new.tolist())
                        quota.claim(old.tolist())
            slots[c] = keep
            scores[c] = score[keep].float()
            inside[keep] = True
    return torch.cat(slots), torch.cat(scores)


def _subset(e: Embeddings | None, keep: torch.Tensor) -> Embeddings | None:
    return None if e is None else Embeddings(e.img[keep], e.txt[keep], e.scale, e.bias, e.kind)


def select_batch(
    options: SamplerOptions,
    reference: Embeddings | None,
    learner: Embeddings | None,
    generator: torch.Generator | None = None,
    quota: Quota | None = None,
    cache_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One JEST batch of b = options.batch_size from a super-batch, as `select --method jest`
    and the online selector both choose it: (indices into the super-batch, each one's
    conditional score). `quota`, a fresh one per super-batch, caps each group's picks.

    refine re-draws chunks from the start and the best of the other candidates by independent
    score, `pool` · b of them in all (all B when that is more): conditional scores stay exact
    (they depend on the batch, not on the candidates considered), a sweep costs
    O(chunks · pool · b²) instead of O(chunks · B · b), and candidates that the independent
    score ranks lower are not reconsidered (docs/select.md measures what that costs)."""
    criterion = options.criterion_for(learner is not None)
    b, chunks, t = options.batch_size, options.n_chunks, options.resolved_temperature
    if options.sampler == "paper":
        terms = criterion_terms(criterion, reference, learner, cache_rows=cache_rows)
        return joint_select(terms, b, chunks, generator, t, options.topk, quota)
    own = independent_scores(criterion, reference, learner)
    order = torch.sort(own.double(), descending=True, stable=True).indices
    start = order[:b]
    if quota is not None:
        start = torch.as_tensor(quota.take(order.tolist(), b)).to(order)
    size = min(len(order), max(b, math.ceil(options.pool * b)))
    outside = torch.ones(len(order), dtype=torch.bool, device=order.device)
    outside[start] = False
    rest = order[outside[order]]
    keep = torch.cat([start, rest[: size - b]])  # the start first, in its order
    if quota is not None:  # the same caps and counts, by position in `keep`
        groups = [quota.groups[i] for i in keep.tolist()]
        quota = Quota(groups, quota.cap, dict(quota.used))
    terms = criterion_terms(
        criterion, _subset(reference, keep), _subset(learner, keep), cache_rows=cache_rows
    )
    first = torch.arange(b, device=keep.device)
    picked, scores = refine_select(
        terms, first, own[start], chunks, generator, t, options.topk, quota, options.sweeps
    )
    return keep[picked], scores
