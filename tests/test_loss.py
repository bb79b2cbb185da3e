import math
import re

import pytest
import torch
import torch.nn.functional as F

from contrastive_sc.method.loss import NTXentLoss, _NTXentFunction


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


@pytest.mark.parametrize("shape", [(5, 3), (2, 3), (8,), (4, 2, 3)])
def test_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"expected \(2n, d\).*got shape " + re.escape(str(shape))):
        NTXentLoss()(torch.randn(shape))


def autograd_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain formula, differentiated by autograd (what the hand-written backward replaces)."""
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(2 * n).roll(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 0.003])
def test_value_and_gradient_equal_autograds(temperature, dtype):
    torch.manual_seed(0)
    z = F.normalize(torch.randn(40, 6, dtype=dtype), dim=1).requires_grad_()
    expected = autograd_nt_xent(z, temperature)
    expected_grad, = torch.autograd.grad(expected, z)
    got = NTXentLoss(temperature)(z)
    got_grad, = torch.autograd.grad(got, z)
    tight = dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12 if tight else 1e-5, atol=0)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10 if tight else 1e-4, atol=1e-14 if tight else 1e-7)


def test_upstream_gradient_scales():
    z = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1).requires_grad_()
    plain, = torch.autograd.grad(3.0 * autograd_nt_xent(z, 0.2), z)
    got, = torch.autograd.grad(3.0 * NTXentLoss(0.2)(z), z)
    torch.testing.assert_close(got, plain)


def test_swapping_the_views_keeps_the_loss_and_swaps_the_gradient():
    torch.manual_seed(1)
    a, b = (F.normalize(torch.randn(20, 8), dim=1) for _ in range(2))
    loss = NTXentLoss(0.07)
    ab = torch.cat([a, b]).requires_grad_()
    ba = torch.cat([b, a]).requires_grad_()
    l_ab, l_ba = loss(ab), loss(ba)
    assert abs(l_ab.item() - l_ba.item()) <= 1e-6
    (g_ab,), (g_ba,) = torch.autograd.grad(l_ab, ab), torch.autograd.grad(l_ba, ba)
    torch.testing.assert_close(g_ab[:20], g_ba[20:], rtol=1e-5, atol=1e-7)  # d/da in both orders
    torch.testing.assert_close(g_ab[20:], g_ba[:20], rtol=1e-5, atol=1e-7)  # d/db


def test_function_is_the_module_without_checks():
    z = F.normalize(torch.randn(10, 4), dim=1)
    assert torch.equal(NTXentLoss(0.3)(z), _NTXentFunction.apply(z, 0.3))


def test_cluster_columns_shape_is_accepted():
    # objectives.cluster_loss feeds (2K, n) membership columns: any even row count >= 4 passes
    z = F.normalize(torch.rand(2 * 3, 50), dim=1).requires_grad_()
    NTXentLoss(1.0)(z).backward()
    assert torch.isfinite(z.grad).all()
