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


def _row_reduce(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: float,
    reduce: str,
    block: int,
    skip_diagonal: bool = False,
) -> torch.Tensor:
    """For each row i of `a`, reduce over j of (scale * a_i . b_j + bias), in row blocks so the
    full n x n matrix never exists at once. `reduce` is "logsumexp" or "softplus_sum"."""
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], block):
        logits = scale * (a[start : start + block].float() @ b.float().T) + bias
        if skip_diagonal:
            rows = torch.arange(logits.shape[0], device=a.device)
            logits[rows, rows + start] = -math.inf
        if reduce == "logsumexp":
            out[start : start + block] = torch.logsumexp(logits, dim=1)
        else:
            out[start : start + block] = F.softplus(logits).sum(dim=1)
    return out


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
        row = _row_reduce(img, txt, logit_scale, 0.0, "logsumexp", block)
        col = _row_reduce(txt, img, logit_scale, 0.0, "logsumexp", block)
        return 0.5 * ((row - diag) + (col - diag)) - math.log(n)
    bias = float(logit_bias or 0.0)
    positive = F.softplus(-(diag + bias))
    if n == 1:
        return positive
    row = _row_reduce(img, txt, logit_scale, bias, "softplus_sum", block, skip_diagonal=True)
    col = _row_reduce(txt, img, logit_scale, bias, "softplus_sum", block, skip_diagonal=True)
    return positive + 0.5 * (row + col) / (n - 1)
