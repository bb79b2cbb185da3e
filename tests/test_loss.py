import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_sc.loss import NTXentLoss


def naive_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written straight from SimCLR's definition, one anchor at a time."""
    n = z.shape[0] // 2
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / temperature for k in range(2 * n)]
        denominator = sum(torch.exp(sims[k]) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(sims[positive]) / denominator)
    return total / (2 * n)


def test_matches_naive_implementation():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    for temperature in (0.07, 0.5, 1.0):
        got = NTXentLoss(temperature)(z)
        assert torch.allclose(got, naive_nt_xent(z, temperature), atol=1e-10)


def test_closed_form_for_identical_embeddings():
    n = 10
    z = F.normalize(torch.ones(2 * n, 4), dim=1)
    # every similarity is equal, so each anchor's softmax is uniform over 2n - 1 candidates
    assert NTXentLoss(0.07)(z).item() == pytest.approx(-math.log(1 / (2 * n - 1)), rel=1e-5)


def test_gradient_flows():
    z = F.normalize(torch.randn(8, 4), dim=1).requires_grad_(True)
    NTXentLoss(0.1)(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(temperature)


def test_rejects_odd_batch():
    with pytest.raises(ValueError, match=r"expected \(2n, d\)"):
        NTXentLoss()(torch.randn(5, 3))
