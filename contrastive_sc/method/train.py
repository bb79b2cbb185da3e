"""The contrastive training loop: seeded, device-aware, with per-epoch loss history."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .augment import training_batches
from .config import EncoderConfig, TrainConfig
from .encoder import ContrastiveEncoder
from .objectives import TrainingObjective, partner_drawer
from .rows import Rows, as_rows


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


def fit_encoder(x: Rows | np.ndarray, encoder_config: EncoderConfig, train_config: TrainConfig, *,
                progress: bool = False, on_epoch: Callable[[int, float], None] | None = None,
                projection: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                ) -> tuple[ContrastiveEncoder, TrainingHistory]:
    """Train a contrastive encoder on a preprocessed ``(cells, genes)`` float32 matrix.

    Parameters
    ----------
    x
        Preprocessed input, one row per cell, as :class:`~contrastive_sc.method.rows.Rows` (or an
        array): each epoch's shuffled batches are read a window of batches at a time.
    encoder_config, train_config
        Architecture and training settings.
    progress
        Show a progress bar over epochs.
    on_epoch
        Called as ``on_epoch(epoch, mean_loss)`` after each epoch (used for live logging).
    projection
        ``(index, mean, components)`` of a fitted PCA of the input columns ``index``: required
        when ``encoder_config.input_projection`` is not ``"none"``, and the encoder's input
        projection starts as that PCA transform (see
        :meth:`~contrastive_sc.method.encoder.ContrastiveEncoder.init_projection`).

    Returns
    -------
    The trained encoder in eval mode, on the CPU, and its training history.

    Notes
    -----
    The parts, each in its own module: the encoder (``encoder.py``), the objective and its
    neighbour positives (``objectives.py``), the epochs of batches of views (``augment.py``);
    this function puts them together and runs the loop. On the CPU torch runs single-threaded
    (the previous thread count is restored after), and when most genes are masked (``input_dropout >=``
    :data:`SPARSE_MASK_RATE`) the views are drawn by numpy as sparse ``MaskedViews``;
    otherwise, and on CUDA, they are dense tensors. Both are the paper's views, so the two paths
    train the same model up to the random draws. Dense views of an input of up to
    :data:`DEVICE_RESIDENT_BYTES` keep the whole input on the device; larger inputs are read a
    window at a time (the rule depends on the size, never on where the rows are held).
    """
    cfg = train_config
    if len(x.shape) != 2 or x.shape[0] < 2:
        msg = f"expected a (cells, genes) matrix with at least 2 cells, got shape {tuple(x.shape)}"
        raise ValueError(msg)
    projecting = encoder_config.input_projection != "none"
    if projecting != (projection is not None):
        msg = (f"input_projection {encoder_config.input_projection!r} "
               + ("needs the fitted PCA: pass projection=(index, mean, components)" if projecting
                  else "takes no projection; set input_projection to 'pca-frozen' or 'pca-init' to use one"))
        raise ValueError(msg)
    device = resolve_device(cfg.device)
    history = TrainingHistory(device=str(device))
    learning_rates = [cosine_lr(cfg.lr, epoch, cfg.lr_cosine_epochs or cfg.epochs) if cfg.lr_schedule == "cosine"
                      else cfg.lr for epoch in range(cfg.epochs)]
    epochs = _progress(range(cfg.epochs), progress)  # after the checks: no bar is left behind by an error
    with _single_threaded(device.type == "cpu"):
        x = as_rows(x)
        n_cells, n_genes = x.shape
        sparse = device.type == "cpu" and cfg.input_dropout >= SPARSE_MASK_RATE
        resident = not sparse and n_cells * n_genes * 4 <= DEVICE_RESIDENT_BYTES
        torch.manual_seed(cfg.seed)
        encoder = ContrastiveEncoder(n_genes, encoder_config.layers, encoder_config.batch_norm,
                                     projection=len(projection[2]) if projecting else 0)
        if projecting:
            encoder.init_projection(*projection, trainable=encoder_config.input_projection == "pca-init")
        encoder = encoder.to(device)
        with _transposed_weight(encoder.first_layer, sparse):
            partners = partner_drawer(x, cfg)
            # initialised after the encoder (the seed's draws stay the paper's); a cluster head is dropped after training
            objective = TrainingObjective(encoder.n_outputs, cfg.temperature, cfg.cluster_head).to(device).train()
            batches = training_batches(x, cfg, device, sparse=sparse, resident=resident, partners=partners)
            # a frozen input projection is left out (its weights are not parameters the loss trains)
            parameters = [p for p in (*encoder.parameters(), *objective.parameters()) if p.requires_grad]
            optimizer = torch.optim.Adam(parameters, lr=cfg.lr, fused=True)
            started = time.perf_counter()
            encoder.train()
            for epoch, lr in zip(epochs, learning_rates):
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = []
                for views in batches():
                    loss = objective(encoder(views, n_views=2))
                    for parameter in parameters:  # optimizer.zero_grad(set_to_none=True) without its profiling hooks
                        parameter.grad = None
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.detach())  # stays on device: no sync per step
                    history._cells_seen += views.shape[0] // 2
                epoch_loss = float(torch.stack(losses).mean())
                history.loss.append(epoch_loss)
                history.lr.append(lr)
                if on_epoch is not None:
                    on_epoch(epoch, epoch_loss)
                if progress:
                    epochs.set_postfix(loss=f"{epoch_loss:.3f}")
            history.seconds = time.perf_counter() - started
    return encoder.cpu().eval(), history


#: From this input dropout on, CPU training uses sparse views: ten times fewer products at the
#: paper's 0.9, and about as fast as dense ones at 0.75 (measured on 500 genes).
SPARSE_MASK_RATE = 0.75
#: Dense views of a preprocessed input up to this size are drawn from a copy held on the device.
DEVICE_RESIDENT_BYTES = 4 * 2**30


class _Transpose(nn.Module):
    # A parametrisation: the layer's weight is the transpose of the stored parameter.
    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.t()

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t().contiguous()


@contextmanager
def _transposed_weight(layer: nn.Linear, enabled: bool) -> Iterator[None]:
    # The sparse first layer (augment.MaskedViews) reads W.T row by row and its gradient comes
    # out as dW.T: training W.T as the stored parameter spares two transposing copies a step
    # (~5 % of its time). Afterwards the layer is a plain nn.Linear again, holding the trained weight.
    if enabled:
        parametrize.register_parametrization(layer, "weight", _Transpose())
    try:
        yield
    finally:
        if enabled:
            parametrize.remove_parametrizations(layer, "weight")
            layer.weight.data = layer.weight.data.contiguous()


@contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    # A CPU step is a few milliseconds of ~100 small operations: a second OpenMP thread gains
    # little on them and adds a barrier to each, which stalls whenever another process holds a
    # core (the reference loop at 2 threads ran 10-50x slower than at 1 on a busy 2-core host).
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="training", unit="epoch")
