"""Pure math on L2-normalised embeddings: similarities and per-example contrastive losses.

Notation follows docs/scores.md: s_ij = img_i . txt_j, alpha the logit scale, beta the logit bias.
Every function takes tensors on any device and returns float32 tensors on that device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_KINDS = ("softmax", "sigmoid")


def clip_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Cosine similarity s_ii of each image with its own caption."""
    return (img.float() * txt.float()).sum(dim=-1)


def _row_and_column_reduce(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: float,
    bias: float,
    reduce: str,
    block: int,
    skip_diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce the logits L_ij = scale * img_i . txt_j + bias over each row and each column,
    computing each block of rows once, so the n x n matrix never exists at once.
    `reduce` is "logsumexp" or "softplus_sum"."""
    n = img.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=img.device)
    lse = reduce == "logsumexp"
    cols = torch.full((n,), -math.inf if lse else 0.0, dtype=torch.float32, device=img.device)
    for start in range(0, n, block):
        logits = scale * (img[start : start + block].float() @ txt.float().T) + bias
        if skip_diagonal:
            at = torch.arange(logits.shape[0], device=img.device)
            logits[at, at + start] = -math.inf
        if lse:
            rows[start : start + block] = torch.logsumexp(logits, dim=1)
            cols = torch.logaddexp(cols, torch.logsumexp(logits, dim=0))
        else:
            values = F.softplus(logits)
            rows[start : start + block] = values.sum(dim=1)
            cols += values.sum(dim=0)
    return rows, cols


def example_losses(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    logit_bias: float | None,
    kind: str,
    block: int = 2048,
) -> torch.Tensor:
    """Each example's contrastive loss with the other examples of the set as its negatives,
    normalised so that sets of different sizes compare (the score set's `ref_loss`).

    softmax (CLIP): 1/2 [(LSE_k a s_ik - a s_ii) + (LSE_k a s_ki - a s_ii)] - log n.
        Subtracting log n makes the loss 0 when the model cannot tell pairs apart, whatever n.
    sigmoid (SigLIP): softplus(-(a s_ii + b))
        + 1/2 * mean_{j != i} [softplus(a s_ij + b) + softplus(a s_ji + b)].
        The positive term plus the mean of the example's negative terms (row and column), so
        the size of the set does not scale the negative part.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}")
    n = img.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=img.device)
    img = img.float()
    txt = txt.float()
    diag = logit_scale * clip_scores(img, txt)
    if kind == "softmax":
        row, col = _row_and_column_reduce(img, txt, logit_scale, 0.0, "logsumexp", block)
        return 0.5 * ((row - diag) + (col - diag)) - math.log(n)
    bias = float(logit_bias or 0.0)
    positive = F.softplus(-(diag + bias))
    if n == 1:
        return positive
    row, col = _row_and_column_reduce(
        img, txt, logit_scale, bias, "softplus_sum", block, skip_diagonal=True
    )
    return positive + 0.5 * (row + col) / (n - 1)
