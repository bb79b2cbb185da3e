"""The contrastive training loop: seeded, device-aware, with per-epoch loss history."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .augment import make_views
from .config import EncoderConfig, TrainConfig
from .encoder import ContrastiveEncoder
from .loss import NTXentLoss


@dataclass
class TrainingHistory:
    """Per-epoch mean loss and learning rate, and the wall-clock training time."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def cells_per_second(self) -> float:
        return self._cells_seen / self.seconds if self.seconds else float("nan")

    _cells_seen: int = 0


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' requested but torch sees no CUDA device; use device='auto' or 'cpu'"
        raise RuntimeError(msg)
    return torch.device(device)


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The SupContrast cosine schedule the paper used: per epoch, down to ``base_lr / 1000``."""
    eta_min = base_lr * 1e-3
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def fit_encoder(x: np.ndarray, encoder_config: EncoderConfig, train_config: TrainConfig, *,
                progress: bool = False,
                on_epoch: Callable[[int, float], None] | None = None) -> tuple[ContrastiveEncoder, TrainingHistory]:
    """Train a contrastive encoder on a preprocessed ``(cells, genes)`` float32 matrix.

    Parameters
    ----------
    x
        Preprocessed input, one row per cell.
    encoder_config, train_config
        Architecture and training settings.
    progress
        Show a progress bar over epochs.
    on_epoch
        Called as ``on_epoch(epoch, mean_loss)`` after each epoch (used for live logging).

    Returns
    -------
    The trained encoder in eval mode, on the CPU, and its training history.
    """
    cfg = train_config
    if x.ndim != 2 or x.shape[0] < 2:
        msg = f"expected a (cells, genes) matrix with at least 2 cells, got shape {x.shape}"
        raise ValueError(msg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    data = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
    encoder = ContrastiveEncoder(data.shape[1], encoder_config.layers, encoder_config.batch_norm).to(device)
    criterion = NTXentLoss(cfg.temperature)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=cfg.lr, fused=True)
    history = TrainingHistory(device=str(device))
    n_cells = data.shape[0]
    batch_size = min(cfg.batch_size, n_cells)

    started = time.perf_counter()
    epochs = _progress(range(cfg.epochs), progress)
    encoder.train()
    for epoch in epochs:
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs) if cfg.lr_schedule == "cosine" else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n_cells, generator=generator, device=device)
        losses = torch.zeros((), device=device)
        for n_steps, (start, stop) in enumerate(_batch_bounds(n_cells, batch_size), start=1):
            batch = data[order[start:stop]]
            views = make_views(batch, mask_rate=cfg.input_dropout, noise_std=cfg.noise_std, generator=generator)
            loss = criterion(encoder(views, n_views=2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses += loss.detach()  # stays on device: no sync per step
            history._cells_seen += batch.shape[0]
        epoch_loss = float(losses) / n_steps
        history.loss.append(epoch_loss)
        history.lr.append(lr)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
        if progress:
            epochs.set_postfix(loss=f"{epoch_loss:.3f}")
    history.seconds = time.perf_counter() - started
    return encoder.cpu().eval(), history


@torch.no_grad()
def encode(encoder: ContrastiveEncoder, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Embed a preprocessed matrix with a trained encoder (eval mode, no augmentation)."""
    encoder.eval()
    out = [encoder(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).numpy()
           for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(out) if out else np.zeros((0, encoder.n_outputs), dtype=np.float32)


def _batch_bounds(n_cells: int, batch_size: int) -> list[tuple[int, int]]:
    # A last batch of one cell cannot be batch-normalised; it waits for the next shuffle.
    bounds = [(start, min(start + batch_size, n_cells)) for start in range(0, n_cells, batch_size)]
    return [(a, b) for a, b in bounds if b - a > 1]


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="training", unit="epoch")
