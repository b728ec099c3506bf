"""Batch losses that say, for every candidate, what adding it to the chosen set would change:
the terms JEST's batch scores are made of. Pure torch, no I/O.

Conditional scores are exact for both losses (docs/select.md):
* sigmoid: the loss is a sum of pair terms, so ΔL_j = P_jj + Σ_{k∈C} (P_kj + P_jk), kept as one
  running length-B vector updated with a |chunk| x B block per step;
* softmax: adding j changes the log-sum-exp of every chosen example, so
  ΔL_j = ℓ_j(C ∪ {j}) + ½ Σ_{i∈C} [softplus(α s_ij − log R_i) + softplus(α s_ji − log T_i)],
  with log R_i and log T_i the chosen examples' running log-sum-exps. The |C| x B logit rows are
  cached when they fit the memory budget and recomputed in blocks otherwise.
The chosen set is held in slots (one per chunk), so a chunk can be taken out and put back.
Batch losses are sums over examples (not means): the normalisation is a constant per step and
does not change which examples are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


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
