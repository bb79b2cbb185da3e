import numpy as np
import pytest
import torch

from contrastive_sc.method.augment import _batch_bounds, training_batches
from contrastive_sc.method.config import EncoderConfig, TrainConfig
from contrastive_sc.method.encoder import ContrastiveEncoder, encode
from contrastive_sc.method.loss import NTXentLoss
from contrastive_sc.method.rows import as_rows
from contrastive_sc.method.train import (
    SPARSE_MASK_RATE,
    _single_threaded,
    _transposed_weight,
    cosine_lr,
    fit_encoder,
)


@pytest.fixture
def x(rng):
    return rng.normal(size=(130, 40)).astype(np.float32)


def test_seeded_training_is_deterministic(x):
    cfg = TrainConfig(epochs=2, batch_size=32, seed=5, device="cpu")
    first, h1 = fit_encoder(x, EncoderConfig(layers=(16, 8)), cfg)
    second, h2 = fit_encoder(x, EncoderConfig(layers=(16, 8)), cfg)
    assert h1.loss == h2.loss
    np.testing.assert_array_equal(encode(first, x), encode(second, x))
    other, h3 = fit_encoder(x, EncoderConfig(layers=(16, 8)), TrainConfig(epochs=2, batch_size=32, seed=6))
    assert h3.loss != h1.loss


def test_history_and_loss_decreases(rng):
    # two well separated groups: the contrastive loss must fall
    centers = rng.normal(scale=3, size=(2, 40))
    x = (centers[rng.integers(0, 2, 400)] + rng.normal(size=(400, 40))).astype(np.float32)
    encoder, history = fit_encoder(x, EncoderConfig(layers=(32, 16)), TrainConfig(epochs=8, batch_size=100, lr=0.05))
    assert len(history.loss) == len(history.lr) == 8
    assert history.loss[-1] < history.loss[0]
    assert history.lr[0] == pytest.approx(0.05) and history.lr[-1] < history.lr[0]
    assert history.seconds > 0 and history.cells_per_second > 0
    assert not encoder.training


def test_epoch_callback(x):
    seen = []
    fit_encoder(x, EncoderConfig(layers=(8,)), TrainConfig(epochs=3, batch_size=64), on_epoch=lambda e, loss: seen.append(e))
    assert seen == [0, 1, 2]


def test_last_batch_of_one_cell_is_skipped():
    assert _batch_bounds(401, 200) == [(0, 200), (200, 400)]
    assert _batch_bounds(400, 200) == [(0, 200), (200, 400)]
    assert _batch_bounds(405, 200) == [(0, 200), (200, 400), (400, 405)]
    x = np.random.default_rng(0).normal(size=(65, 10)).astype(np.float32)
    fit_encoder(x, EncoderConfig(layers=(8,)), TrainConfig(epochs=1, batch_size=32))  # 32 + 32 + 1


def test_cosine_schedule_matches_supcontrast():
    assert cosine_lr(0.4, 0, 30) == pytest.approx(0.4)
    assert cosine_lr(0.4, 15, 30) == pytest.approx(0.4e-3 + (0.4 - 0.4e-3) / 2)


def test_cuda_request_without_gpu_is_clear(x):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        fit_encoder(x, EncoderConfig(), TrainConfig(device="cuda"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="input_dropout"):
        TrainConfig(input_dropout=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)


def test_training_uses_the_loss_module(x, monkeypatch):
    # the loss that trains is loss.NTXentLoss, with its checks: one call per step
    calls = []
    forward = NTXentLoss.forward

    def counted(self, z):
        calls.append((self.temperature, tuple(z.shape)))
        return forward(self, z)

    monkeypatch.setattr(NTXentLoss, "forward", counted)
    fit_encoder(x, EncoderConfig(layers=(16, 8)), TrainConfig(epochs=2, batch_size=64, temperature=0.3))
    steps = 2 * len(_batch_bounds(len(x), 64))
    assert len(calls) == steps and calls[0] == (0.3, (128, 8))


def test_torch_threads_are_restored(x):
    before = torch.get_num_threads()
    fit_encoder(x, EncoderConfig(layers=(8,)), TrainConfig(epochs=1, batch_size=64, device="cpu"))
    assert torch.get_num_threads() == before


def test_dense_views_path_is_deterministic(x):
    # below SPARSE_MASK_RATE the CPU trains on dense views (the path CUDA always takes)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=5, device="cpu", input_dropout=0.5, noise_std=0.1)
    first, h1 = fit_encoder(x, EncoderConfig(layers=(16, 8)), cfg)
    second, h2 = fit_encoder(x, EncoderConfig(layers=(16, 8)), cfg)
    assert cfg.input_dropout < SPARSE_MASK_RATE and h1.loss == h2.loss
    np.testing.assert_array_equal(encode(first, x), encode(second, x))


@pytest.mark.parametrize("input_dropout", [0.9, 0.5])  # sparse and dense views
def test_training_equals_a_plain_loop(x, input_dropout):
    # fit_encoder's loop, trimmed of per-step overhead, trains bit for bit the model of the
    # plain loop (lightly's simclr.py): same seed, same views, same weights
    cfg = TrainConfig(epochs=3, batch_size=32, seed=3, lr=0.05, device="cpu", input_dropout=input_dropout)
    trained, history = fit_encoder(x, EncoderConfig(layers=(16, 8)), cfg)

    torch.manual_seed(cfg.seed)
    sparse = input_dropout >= SPARSE_MASK_RATE
    encoder = ContrastiveEncoder(x.shape[1], (16, 8)).train()
    cpu = torch.device("cpu")
    batches = training_batches(as_rows(x), cfg, cpu, sparse=sparse, resident=not sparse)
    criterion, losses = NTXentLoss(cfg.temperature), []
    with _single_threaded(True), _transposed_weight(encoder.linears[0], sparse):
        optimizer = torch.optim.Adam(encoder.parameters(), lr=cfg.lr, fused=True)
        for epoch in range(cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
            for views in batches():
                loss = criterion(encoder(views, n_views=2))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    assert history.loss[-1] == pytest.approx(np.mean(losses[-len(losses) // 3:]), rel=1e-6)
    np.testing.assert_array_equal(encode(trained, x), encode(encoder.eval(), x))


@pytest.mark.parametrize("shape", [(1, 40), (40,)])
def test_too_few_cells_or_a_flat_array_is_refused_before_training(shape):
    with pytest.raises(ValueError, match=r"expected a \(cells, genes\) matrix with at least 2 cells, got shape"):
        fit_encoder(np.zeros(shape, np.float32), EncoderConfig(layers=(8,)), TrainConfig(epochs=1), progress=True)
