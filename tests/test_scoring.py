from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jestcurate.math.scoring import clip_scores, example_losses


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def brute_softmax(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLIP loss of each example, written out term by term from the definition."""
    n = img.shape[0]
    out = []
    for i in range(n):
        s_ii = scale * float(img[i] @ txt[i])
        row = math.log(sum(math.exp(scale * float(img[i] @ txt[k])) for k in range(n)))
        col = math.log(sum(math.exp(scale * float(img[k] @ txt[i])) for k in range(n)))
        out.append(0.5 * ((row - s_ii) + (col - s_ii)) - math.log(n))
    return torch.tensor(out)


def brute_sigmoid(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    n = img.shape[0]
    out = []
    for i in range(n):
        pos = softplus(-(scale * float(img[i] @ txt[i]) + bias))
        negs = [
            softplus(scale * float(img[i] @ txt[j]) + bias)
            + softplus(scale * float(img[j] @ txt[i]) + bias)
            for j in range(n)
            if j != i
        ]
        out.append(pos + (0.5 * sum(negs) / (n - 1) if negs else 0.0))
    return torch.tensor(out)


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_softmax_matches_definition(n: int) -> None:
    img, txt = unit(n, 16, 0), unit(n, 16, 1)
    got = example_losses(img, txt, 10.0, None, "softmax", block=5)
    torch.testing.assert_close(got, brute_softmax(img, txt, 10.0).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_sigmoid_matches_definition(n: int) -> None:
    img, txt = unit(n, 16, 2), unit(n, 16, 3)
    got = example_losses(img, txt, 10.0, -3.0, "sigmoid", block=4)
    want = brute_sigmoid(img, txt, 10.0, -3.0).float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 50), kind=st.sampled_from(["softmax", "sigmoid"]))
def test_blocking_does_not_change_losses(n: int, block: int, kind: str) -> None:
    img, txt = unit(n, 8, n), unit(n, 8, n + 100)
    whole = example_losses(img, txt, 20.0, -5.0, kind, block=10_000)
    torch.testing.assert_close(example_losses(img, txt, 20.0, -5.0, kind, block=block), whole)


def test_softmax_is_size_normalised() -> None:
    # A model that cannot tell pairs apart (all similarities equal) has loss 0 at any size.
    for n in (2, 10, 500):
        same = F.normalize(torch.ones(n, 4), dim=-1)
        assert example_losses(same, same, 30.0, None, "softmax").abs().max() < 1e-4


def test_matched_pairs_have_lower_loss_than_mismatched() -> None:
    img = unit(20, 256, 5)
    txt = img.clone()
    txt[:5] = unit(5, 256, 6)  # the first five captions belong to other images
    # Typical trained CLIP scale, and SigLIP's initial scale and bias.
    for kind, scale, bias in (("softmax", 20.0, None), ("sigmoid", 10.0, -10.0)):
        loss = example_losses(img, txt, scale, bias, kind)
        assert loss[:5].min() > loss[5:].max() + 1.0
    assert clip_scores(img, txt)[5:].min() > 0.999


def test_unknown_kind_and_empty_input() -> None:
    with pytest.raises(ValueError):
        example_losses(unit(2, 4, 0), unit(2, 4, 1), 1.0, None, "hinge")
    assert example_losses(torch.empty(0, 4), torch.empty(0, 4), 1.0, None, "softmax").shape == (0,)
