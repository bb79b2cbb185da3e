import numpy as np
import torch

from contrastive_sc.method.augment import MaskedViews, make_views
from contrastive_sc.method.encoder import ContrastiveEncoder


def test_shapes_and_unit_norm():
    encoder = ContrastiveEncoder(50, (200, 40, 60))
    out = encoder(torch.randn(32, 50))
    assert out.shape == (32, 60)
    assert torch.allclose(out.norm(dim=1), torch.ones(32), atol=1e-5)
    assert [m.out_features for m in encoder.linears] == [200, 40, 60]
    assert len(encoder.norms) == 2


def test_stacked_views_equal_separate_passes():
    # One pass over stacked views must be the two forward passes of the original code.
    torch.manual_seed(0)
    encoder = ContrastiveEncoder(20, (16, 8)).train()
    a, b = torch.randn(10, 20), torch.randn(10, 20)
    stacked = encoder(torch.cat([a, b]), n_views=2)
    separate = torch.cat([encoder(a), encoder(b)])
    assert torch.allclose(stacked, separate, atol=1e-6)


def test_eval_mode_is_deterministic():
    encoder = ContrastiveEncoder(20).eval()
    x = torch.randn(5, 20)
    assert torch.equal(encoder(x), encoder(x))


def test_views_mask_and_rescale_like_dropout():
    x = torch.ones(1000, 100)
    views = make_views(x, mask_rate=0.9, generator=torch.Generator().manual_seed(0))
    assert views.shape == (2000, 100)
    kept = views != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert torch.allclose(views[kept], torch.full_like(views[kept], 10.0))
    assert not torch.equal(kept[:1000], kept[1000:])  # the two views mask different genes


def test_views_reproducible_with_generator():
    x = torch.randn(8, 30)
    first = make_views(x, noise_std=0.5, generator=torch.Generator().manual_seed(3))
    second = make_views(x, noise_std=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_no_mask_no_noise_is_identity():
    x = torch.randn(4, 6)
    assert torch.equal(make_views(x, mask_rate=0.0), torch.cat([x, x]))


def _masked(x, seed=0, **kwargs):
    # MaskedViews.sample takes the batch already rescaled by 1 / (1 - mask_rate)
    rate = kwargs.get("mask_rate", 0.9)
    return MaskedViews.sample(x / (1 - rate), np.random.default_rng(seed), **kwargs)


def test_masked_views_are_dropout_views():
    x = np.ones((1000, 100), dtype=np.float32)
    views = _masked(x).to_dense()
    assert views.shape == (2000, 100)
    kept = views != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert torch.allclose(views[kept], torch.full_like(views[kept], 10.0))
    assert not torch.equal(kept[:1000], kept[1000:])  # the two views mask different genes
    per_cell = kept.float().mean(1)
    assert abs(per_cell.std().item() - (0.1 * 0.9 / 100) ** 0.5) < 0.005  # independent genes: binomial


def test_masked_views_keep_values_of_their_cell_and_are_seeded():
    x = np.random.default_rng(1).normal(size=(30, 40)).astype(np.float32)
    views = _masked(x, mask_rate=0.5).to_dense()
    stacked = torch.from_numpy(np.concatenate([x, x]) * 2)
    kept = views != 0
    assert torch.equal(views[kept], stacked[kept])
    assert torch.equal(views, _masked(x, mask_rate=0.5).to_dense())
    assert not torch.equal(views, _masked(x, seed=1, mask_rate=0.5).to_dense())
    noisy = _masked(x, mask_rate=0.5, noise_std=0.3).to_dense()
    assert torch.equal(noisy != 0, kept) and not torch.equal(noisy, views)


def test_masked_first_layer_equals_dense():
    # The sparse first layer must give the dense forward pass and the same gradients.
    torch.manual_seed(0)
    encoder = ContrastiveEncoder(50, (16, 8)).train()
    views = _masked(np.random.default_rng(2).normal(size=(12, 50)).astype(np.float32))
    sparse = encoder(views, n_views=2)
    sparse_grads = torch.autograd.grad(sparse.square().sum(), list(encoder.parameters()))
    dense = encoder(views.to_dense(), n_views=2)
    dense_grads = torch.autograd.grad(dense.square().sum(), list(encoder.parameters()))
    assert torch.allclose(sparse, dense, atol=1e-6)
    for a, b in zip(sparse_grads, dense_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_readouts_are_the_output_before_normalisation_and_the_first_hidden_layer():
    import pytest
    import torch.nn.functional as F

    torch.manual_seed(0)
    encoder = ContrastiveEncoder(30, (16, 8, 5)).eval()
    x = torch.randn(12, 30)
    normalised = encoder(x)
    encoder.readout = "unnormalised"
    raw = encoder(x)
    assert encoder.n_outputs == 5
    torch.testing.assert_close(F.normalize(raw, dim=1), normalised)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(12))
    encoder.readout = "hidden"
    hidden = encoder(x)
    assert hidden.shape == (12, 16) and encoder.n_outputs == 16 and (hidden >= 0).all()
    expected = F.relu(encoder.norms[0](encoder.linears[0](x)))
    torch.testing.assert_close(hidden, expected)
    with pytest.raises(ValueError, match="readout must be one of"):
        encoder.readout = "last"
    with pytest.raises(ValueError, match="needs a hidden layer"):
        ContrastiveEncoder(30, (5,), readout="hidden")
