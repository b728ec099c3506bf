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

Conditional scores are exact for both losses (docs/select.md):
* sigmoid: the loss is a sum of pair terms, so ΔL_j = P_jj + Σ_{k∈C} (P_kj + P_jk), kept as one
  running length-B vector updated with a |chunk| x B block per step;
* softmax: adding j changes the log-sum-exp of every chosen example, so
  ΔL_j = ℓ_j(C ∪ {j}) + ½ Σ_{i∈C} [softplus(α s_ij − log R_i) + softplus(α s_ji − log T_i)],
  with log R_i and log T_i the chosen examples' running log-sum-exps. The |C| x B logit rows are
  cached when they fit the memory budget and recomputed in blocks otherwise.
The chosen set is held in slots (one per chunk), so a chunk can be taken out and put back.
Batch losses are sums over examples (not means): the normalisation is a constant per step and
does not change which examples are drawn. Random numbers come from a CPU generator, so the CPU
and the GPU draw the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from jestcurate.math.scoring import example_losses

CRITERIA = ("learnability", "easy-ref", "hard-learner")
SAMPLERS = ("refine", "paper")
# The refine sampler's default temperature, relative to the spread of the conditional scores
# (docs/select.md has the measurements that chose it); the paper's is 1 in loss units.
DEFAULT_TEMPERATURE = {"refine": 0.1, "paper": 1.0}
# refine re-draws from the best DEFAULT_POOL · b candidates by independent score (docs/select.md).
DEFAULT_POOL = 3.0
DEFAULT_CHUNKS = 16  # chunks a batch is drawn in (at most b: chunk_sizes clamps)


@dataclass(frozen=True)
class Embeddings:
    """One model's view of a super-batch: L2-normalised float32 (B, D) tensors on one device."""

    img: torch.Tensor
    txt: torch.Tensor
    scale: float
    bias: float | None
    kind: str  # "softmax" | "sigmoid"


class BatchLoss(Protocol):
    """A batch loss L(C) that can say, for every candidate j, L(C ∪ {j}) − L(C).

    The chosen set C is held in slots: `add` fills the next slot (or the given one), `remove`
    empties a slot and returns what it held, `restore` puts that back unchanged."""

    def gains(self) -> torch.Tensor: ...

    def add(self, picked: torch.Tensor, slot: int | None = None) -> None: ...

    def remove(self, slot: int) -> Any: ...

    def restore(self, slot: int, held: Any) -> None: ...

    def total(self) -> float: ...


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _place(slots: list[Any], slot: int | None, value: Any) -> None:
    if slot is None or slot == len(slots):
        slots.append(value)
    else:
        assert slots[slot] is None, f"slot {slot} is taken"
        slots[slot] = value


def _members(slots: list[Any]) -> torch.Tensor:
    return torch.cat([s[0] for s in slots if s is not None])


class _Slotted:
    """Taking a slot out and putting it back; subclasses keep `slots` and re-sum their state
    from them in `_resum`."""

    slots: list[Any]

    def _resum(self) -> None:
        raise NotImplementedError

    def remove(self, slot: int) -> Any:
        held, self.slots[slot] = self.slots[slot], None
        self._resum()
        return held

    def restore(self, slot: int, held: Any) -> None:
        _place(self.slots, slot, held)
        self._resum()


class _PairSum(_Slotted):
    """Shared by the sigmoid and matrix losses: L(C) = Σ_{i,j∈C} P_ij, gains = P_jj plus the
    running Σ_{k∈C} (P_kj + P_jk). `self_terms` is the k = j term that the running sum counts
    for a chosen j (it is not a pair), taken out again by `total`."""

    alone: torch.Tensor
    self_terms: torch.Tensor

    def _start(self) -> None:
        self.pairs = torch.zeros_like(self.alone)
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def _contributions(self, picked: torch.Tensor) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def gains(self) -> torch.Tensor:
        return self.alone + self.pairs

    def add(self, picked: torch.Tensor, slot: int | None = None) -> None:
        part = torch.zeros_like(self.alone)
        for piece in self._contributions(picked):
            if slot is None:
                self.pairs += piece  # piece by piece, as Algorithm 1 always summed them
            part += piece
        _place(self.slots, slot, (picked, part))
        if slot is not None:
            self._resum()  # into a named slot (refine): the sum over slots, never drifting

    def _resum(self) -> None:
        # Summed afresh from the slots, so taking chunks out and putting them back is exact.
        parts = [s[1] for s in self.slots if s is not None]
        self.pairs = torch.stack(parts).sum(0) if parts else torch.zeros_like(self.alone)

    def total(self) -> float:
        if not any(s is not None for s in self.slots):
            return 0.0
        c = _members(self.slots)
        inside = self.alone[c] + 0.5 * (self.pairs[c] - 2 * self.self_terms[c])
        return float(inside.double().sum())


class SigmoidLoss(_PairSum):
    """L(C) = Σ_{i,j∈C} P_ij with P_ii = softplus(−(α s_ii + β)), P_ij = softplus(α s_ij + β)."""

    def __init__(self, e: Embeddings, block: int = 1024) -> None:
        self.e = e
        self.block = block
        diag = e.scale * (e.img * e.txt).sum(-1) + (e.bias or 0.0)
        self.alone = F.softplus(-diag)
        self.self_terms = F.softplus(diag)
        self._start()

    def _contributions(self, picked: torch.Tensor) -> Iterator[torch.Tensor]:
        e, bias = self.e, self.e.bias or 0.0
        for block in _blocks(len(picked), self.block):
            rows = picked[block]
            # For j in `picked` itself the k = j term is wrong (a negative instead of a
            # positive); chosen examples are not candidates, and total() takes it out.
            yield F.softplus(e.scale * (e.img[rows] @ e.txt.T) + bias).sum(0)
            yield F.softplus(e.scale * (e.txt[rows] @ e.img.T) + bias).sum(0)


class MatrixLoss(_PairSum):
    """A batch score given as an explicit pairwise matrix: L(C) = Σ_{i,j∈C} S_ij. For small
    problems and tests; S_jj is the score of j alone."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.alone = matrix.diagonal()
        self.self_terms = matrix.diagonal()
        self._start()

    def _contributions(self, picked: torch.Tensor) -> Iterator[torch.Tensor]:
        yield self.matrix[picked].sum(0) + self.matrix[:, picked].sum(1)


class SoftmaxLoss(_Slotted):
    """L(C) = Σ_{i∈C} ½ [(LSE_{k∈C} α s_ik − α s_ii) + (LSE_{k∈C} α s_ki − α s_ii)]."""

    def __init__(self, e: Embeddings, cache_rows: bool = True, block: int = 1024) -> None:
        self.e = e
        self.cache_rows = cache_rows
        self.block = block
        self.diag = e.scale * (e.img * e.txt).sum(-1)
        # U_j = LSE_{k∈C} α s_jk (image j vs chosen texts), V_j = LSE_{k∈C} α s_kj (text j vs
        # chosen images). For a chosen i they are its log R_i and log T_i.
        self.u = self._empty()
        self.v = self._empty()
        # Per slot: its indices, its own U and V, and its cached (α s_k·, α s_·k) blocks.
        self.slots: list[Any] = []

    def _empty(self) -> torch.Tensor:
        return torch.full_like(self.diag, -math.inf)

    def _logits(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.e
        return e.scale * (e.img[idx] @ e.txt.T), e.scale * (e.txt[idx] @ e.img.T)

    def _pieces(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        held = [s for s in self.slots if s is not None]
        if self.cache_rows:
            for slot in held:
                yield from slot[3]
            return
        # Recomputed block by block: memory O(block x B) instead of O(|C| x B).
        chosen = torch.cat([s[0] for s in held])
        for block in _blocks(len(chosen), self.block):
            yield chosen[block], self._logits(chosen[block])

    def gains(self) -> torch.Tensor:
        own = 0.5 * (F.softplus(self.u - self.diag) + F.softplus(self.v - self.diag))
        if not any(s is not None for s in self.slots):
            return own
        spill = torch.zeros_like(own)
        for idx, (to_texts, to_images) in self._pieces():
            spill += F.softplus(to_texts - self.u[idx, None]).sum(0)
            spill += F.softplus(to_images - self.v[idx, None]).sum(0)
        return own + 0.5 * spill

    def add(self, picked: torch.Tensor, slot: int | None = None) -> None:
        u, v = self._empty(), self._empty()
        cached = []
        for block in _blocks(len(picked), self.block):
            idx = picked[block]
            to_texts, to_images = self._logits(idx)  # α s_kj and α s_jk for k in idx
            v_part, u_part = torch.logsumexp(to_texts, 0), torch.logsumexp(to_images, 0)
            if slot is None:  # running log-sum-exps, as Algorithm 1 always kept them
                self.v = torch.logaddexp(self.v, v_part)
                self.u = torch.logaddexp(self.u, u_part)
            v, u = torch.logaddexp(v, v_part), torch.logaddexp(u, u_part)
            if self.cache_rows:
                cached.append((idx, (to_texts, to_images)))
        _place(self.slots, slot, (picked, u, v, cached))
        if slot is not None:
            self._resum()  # into a named slot (refine): the sum over slots, never drifting

    def _resum(self) -> None:
        held = [s for s in self.slots if s is not None]
        if not held:
            self.u, self.v = self._empty(), self._empty()
            return
        self.u = torch.logsumexp(torch.stack([s[1] for s in held]), 0)
        self.v = torch.logsumexp(torch.stack([s[2] for s in held]), 0)

    def total(self) -> float:
        if not any(s is not None for s in self.slots):
            return 0.0
        c = _members(self.slots)
        d = self.diag[c]
        return float((0.5 * ((self.u[c] - d) + (self.v[c] - d))).double().sum())


def batch_loss(e: Embeddings, cache_rows: bool = True) -> BatchLoss:
    if e.kind == "sigmoid":
        return SigmoidLoss(e)
    if e.kind == "softmax":
        return SoftmaxLoss(e, cache_rows=cache_rows)
    raise ValueError(f"unknown loss kind {e.kind!r}")


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
    """At most `cap` picks per group (cluster); if that cannot fill a batch, the best of the
    rest fill it, so every batch still has exactly b examples."""

    def __init__(self, groups: list[int], cap: int, used: dict[int, int] | None = None) -> None:
        self.groups = groups
        self.cap = cap
        self.used: dict[int, int] = used or {}

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
    criterion: str,
    reference: Embeddings | None,
    learner: Embeddings | None,
    batch_size: int,
    sampler: str = "refine",
    n_chunks: int = DEFAULT_CHUNKS,
    generator: torch.Generator | None = None,
    temperature: float | None = None,
    topk: bool = False,
    quota: Quota | None = None,
    sweeps: int = 1,
    cache_rows: bool = True,
    pool: float = DEFAULT_POOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One JEST batch of a super-batch, as `select --method jest` and the online selector both
    choose it: (indices into the super-batch, each one's conditional score). `quota`, a fresh
    one per super-batch, caps each group's picks.

    refine re-draws chunks from the start and the best of the other candidates by independent
    score, `pool` · b of them in all (all B when that is more): conditional scores stay exact
    (they depend on the batch, not on the candidates considered), a sweep costs
    O(chunks · pool · b²) instead of O(chunks · B · b), and candidates that the independent
    score ranks lower are not reconsidered (docs/select.md measures what that costs)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    t = DEFAULT_TEMPERATURE[sampler] if temperature is None else temperature
    if sampler == "paper":
        terms = criterion_terms(criterion, reference, learner, cache_rows=cache_rows)
        return joint_select(terms, batch_size, n_chunks, generator, t, topk, quota)
    if pool < 1:
        raise ValueError(f"pool is a multiple of the batch size, at least 1; got {pool}")
    own = independent_scores(criterion, reference, learner)
    order = torch.sort(own.double(), descending=True, stable=True).indices
    if quota is None:
        start = order[:batch_size]
    else:
        start = torch.as_tensor(quota.take(order.tolist(), batch_size)).to(order)
    size = min(len(order), max(batch_size, math.ceil(pool * batch_size)))
    outside = torch.ones(len(order), dtype=torch.bool, device=order.device)
    outside[start] = False
    rest = order[outside[order]]
    keep = torch.cat([start, rest[: size - batch_size]])  # the start first, in its order
    if quota is not None:  # the same caps and counts, by position in `keep`
        groups = [quota.groups[i] for i in keep.tolist()]
        quota = Quota(groups, quota.cap, dict(quota.used))
    terms = criterion_terms(
        criterion, _subset(reference, keep), _subset(learner, keep), cache_rows=cache_rows
    )
    first = torch.arange(batch_size, device=keep.device)
    picked, scores = refine_select(
        terms, first, own[start], n_chunks, generator, t, topk, quota, sweeps
    )
    return keep[picked], scores
