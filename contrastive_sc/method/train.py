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

from .augment import MaskedViews, make_views
from .config import EncoderConfig, TrainConfig
from .encoder import ContrastiveEncoder
from .loss import NTXentLoss
from .rows import Rows, as_rows, collect


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
    On the CPU torch runs single-threaded while training (the previous thread count is
    restored after), and when most genes are masked (``input_dropout >=``
    :data:`SPARSE_MASK_RATE`) the views are drawn by numpy as sparse :class:`MaskedViews`;
    otherwise, and on CUDA, they are dense :func:`make_views` tensors. Both are the paper's
    views, so the two paths train the same model up to the random draws. Dense views of an input
    of up to :data:`DEVICE_RESIDENT_BYTES` keep the whole input on the device; larger inputs are
    read a window at a time (the rule depends on the size, never on where the rows are held).
    """
    cfg = train_config
    x = as_rows(x)
    n_cells, n_genes = x.shape
    if n_cells < 2:
        msg = f"expected a (cells, genes) matrix with at least 2 cells, got shape {x.shape}"
        raise ValueError(msg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sparse = device.type == "cpu" and cfg.input_dropout >= SPARSE_MASK_RATE
    resident = not sparse and n_cells * n_genes * 4 <= DEVICE_RESIDENT_BYTES
    batches = (_dense_batches(np.ascontiguousarray(x.take(np.arange(n_cells)), dtype=np.float32), cfg, device)
               if resident else _row_batches(x, cfg, device, sparse))
    projecting = encoder_config.input_projection != "none"
    if projecting != (projection is not None):
        msg = (f"input_projection {encoder_config.input_projection!r} "
               + ("needs the fitted PCA: pass projection=(index, mean, components)" if projecting
                  else "takes no projection; set input_projection to 'pca-frozen' or 'pca-init' to use one"))
        raise ValueError(msg)
    if projecting:
        encoder = ContrastiveEncoder(n_genes, encoder_config.layers, encoder_config.batch_norm,
                                     projection=len(projection[2]))
        encoder.init_projection(*projection, trainable=encoder_config.input_projection == "pca-init")
        encoder = encoder.to(device)
    else:
        encoder = ContrastiveEncoder(n_genes, encoder_config.layers, encoder_config.batch_norm).to(device)
    history = TrainingHistory(device=str(device))
    criterion = NTXentLoss(cfg.temperature)
    head = None
    if cfg.cluster_head:  # trained beside the encoder for the cluster-level loss, then dropped
        from .objectives import ClusterHead, cluster_loss

        head = ClusterHead(encoder.n_outputs, cfg.cluster_head).to(device).train()

    started = time.perf_counter()
    epochs = _progress(range(cfg.epochs), progress)
    encoder.train()
    with _single_threaded(device.type == "cpu"), _transposed_weight(encoder.first_layer, sparse):
        # a frozen input projection is left out (its weights are not parameters the loss trains)
        parameters = [p for p in (*encoder.parameters(), *(head.parameters() if head is not None else ()))
                      if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=cfg.lr, fused=True)
        for epoch in epochs:
            lr = cosine_lr(cfg.lr, epoch, cfg.lr_cosine_epochs or cfg.epochs) if cfg.lr_schedule == "cosine" else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = []
            for views in batches():
                z = encoder(views, n_views=2)
                loss = criterion(z)
                if head is not None:
                    loss = loss + cluster_loss(head(z))
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


def _dense_batches(x: np.ndarray, cfg: TrainConfig, device: torch.device) -> Callable[[], Iterator[torch.Tensor]]:
    # Torch-native epochs of dense stacked views, on any device.
    data = torch.as_tensor(x, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    bounds = _batch_bounds(len(x), min(cfg.batch_size, len(x)))

    partners = _partner_drawer(x, cfg)

    def epoch() -> Iterator[torch.Tensor]:
        order = torch.randperm(len(x), generator=generator, device=device)
        for start, stop in bounds:
            rows = order[start:stop]
            if partners is None:
                yield make_views(data[rows], mask_rate=cfg.input_dropout, noise_std=cfg.noise_std, generator=generator)
            else:  # one view of each cell, then one of a neighbour of each: the same stacked layout
                pair = torch.as_tensor(partners(rows.cpu().numpy()), device=device)
                yield make_views(torch.cat([data[rows], data[pair]]), n_views=1, mask_rate=cfg.input_dropout,
                                 noise_std=cfg.noise_std, generator=generator)

    return epoch


def _partner_drawer(x: np.ndarray, cfg: TrainConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    # Neighbour positives (objectives.py): a function giving each batch row's partner, or None.
    if not cfg.positive_neighbours:
        return None
    from .objectives import draw_partners, neighbour_table

    table = neighbour_table(x, cfg.positive_neighbours, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)  # its own stream: the views' draws stay those of the paper
    return lambda rows: draw_partners(table, rows, rng)


#: Bytes of preprocessed rows an epoch reads at a time (a window of whole batches).
DISK_WINDOW_BYTES = 64 * 2**20


def _row_batches(x: Rows, cfg: TrainConfig, device: torch.device, sparse: bool) -> Callable[[], Iterator]:
    # Epochs over preprocessed rows read by ``take``. The epoch's permutation is gathered a window
    # of batches at a time (for rows on disk, one sorted read) and cut into batches, so memory is
    # one window whatever the number of cells; the draws (numpy's permutation and masks) do not
    # depend on where the rows are held, so rows on disk train the same encoder as the array they
    # hold. On the CPU the views are sparse MaskedViews; otherwise dense views of each batch.
    take = x.take
    n_cells, n_genes = x.shape
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, n_cells)
    bounds = _batch_bounds(n_cells, batch_size)
    per_window = max(1, DISK_WINDOW_BYTES // (batch_size * n_genes * 4))
    rescale = np.float32(1.0 / (1.0 - cfg.input_dropout))
    # neighbour positives need every row once, for the neighbour table
    partners = _partner_drawer(take(np.arange(n_cells)), cfg) if cfg.positive_neighbours else None

    def views(batch: np.ndarray, rows: np.ndarray):
        n_views = 2
        if partners is not None:  # one view of each cell, then one of a neighbour of each: the same stacked layout
            batch, n_views = np.concatenate([batch, take(partners(rows))]), 1
        if sparse:
            return MaskedViews.sample(batch * rescale, rng, n_views=n_views, mask_rate=cfg.input_dropout,
                                      noise_std=cfg.noise_std)
        return make_views(torch.as_tensor(batch, device=device), n_views=n_views, mask_rate=cfg.input_dropout,
                          noise_std=cfg.noise_std, generator=generator)

    def epoch() -> Iterator:
        order = rng.permutation(n_cells)
        for first in range(0, len(bounds), per_window):
            window = bounds[first:first + per_window]
            offset = window[0][0]
            rows = take(order[offset:window[-1][1]])
            for start, stop in window:
                yield views(rows[start - offset:stop - offset], order[start:stop])

    return epoch


class _Transpose(nn.Module):
    # A parametrisation: the layer's weight is the transpose of the stored parameter.
    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.t()

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t().contiguous()


@contextmanager
def _transposed_weight(layer: nn.Linear, enabled: bool) -> Iterator[None]:
    # The sparse first layer reads W.T row by row and its gradient comes out as dW.T: training
    # W.T as the stored parameter spares two transposing copies a step (~5 % of its time).
    # Afterwards the layer is a plain nn.Linear again, holding the trained weight.
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


@torch.no_grad()
def encode(encoder: nn.Module, x: Rows | np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Embed preprocessed rows with a trained encoder (eval mode, no augmentation), a batch at a time."""
    encoder.eval()
    return collect(lambda rows: encoder(torch.as_tensor(rows, dtype=torch.float32)).numpy(), as_rows(x),
                   encoder.n_outputs, size=batch_size)


def _batch_bounds(n_cells: int, batch_size: int) -> list[tuple[int, int]]:
    # A last batch of one cell cannot be batch-normalised; it waits for the next shuffle.
    bounds = [(start, min(start + batch_size, n_cells)) for start in range(0, n_cells, batch_size)]
    return [(a, b) for a, b in bounds if b - a > 1]


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="training", unit="epoch")
