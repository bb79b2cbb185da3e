"""The views the encoder trains on: random gene masking and Gaussian noise, drawn batch by batch.

:func:`make_views` builds the masked views as a dense tensor (torch only, any device).
:class:`MaskedViews` holds the same views as their kept entries only, for the CPU training
loop: with the paper's ``mask_rate=0.9`` a view keeps 10 % of the genes, so the first Linear
layer is ten times less work on the kept entries than on the dense, mostly zero matrix.
:func:`training_batches` draws an epoch's shuffled batches of views from the preprocessed rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .rows import Rows


def make_views(x: torch.Tensor, *, n_views: int = 2, mask_rate: float = 0.9, noise_std: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Stack ``n_views`` independently augmented copies of a batch.

    Each view masks a random ``mask_rate`` fraction of genes per cell and rescales the rest by
    ``1 / (1 - mask_rate)``, which is exactly what the paper's input ``nn.Dropout`` does.

    Parameters
    ----------
    x
        ``(batch, genes)`` input.
    n_views
        Number of views.
    mask_rate
        Fraction of genes zeroed in each view.
    noise_std
        Standard deviation of Gaussian noise added before masking (0 disables it).
    generator
        Random generator, for reproducible views.

    Returns
    -------
    ``(n_views * batch, genes)`` tensor: view 0 for every cell, then view 1, ...
    """
    if noise_std > 0:
        noisy = x.unsqueeze(0) + noise_std * torch.randn((n_views, *x.shape), generator=generator,
                                                         device=x.device, dtype=x.dtype)
    else:
        noisy = x.unsqueeze(0)  # broadcast, no copy
    if mask_rate > 0:
        keep = torch.rand((n_views, *x.shape), generator=generator, device=x.device, dtype=x.dtype) >= mask_rate
        views = (noisy * (1.0 / (1.0 - mask_rate))) * keep
    else:
        views = noisy.expand(n_views, *x.shape)
    return views.reshape(n_views * x.shape[0], x.shape[1])


@dataclass(frozen=True, eq=False)
class MaskedViews:
    """Stacked masked views of a batch, stored as their kept entries (CPU tensors).

    The views are the rows of a ``shape = (n_views * batch, genes)`` matrix laid out as
    :func:`make_views` returns it. Its kept entries are stored twice: grouped by row, for the
    forward pass of the first Linear layer, and grouped by gene, for its weight gradient.
    Build them with :meth:`sample`; :meth:`linear` applies a Linear layer.

    Attributes
    ----------
    shape
        ``(rows, genes)`` of the dense matrix.
    genes, row_starts, values
        Gene and value of each kept entry in row-major order; row ``r`` owns the entries
        ``row_starts[r]:row_starts[r + 1]``.
    rows, gene_starts, values_by_gene
        The same entries in gene-major order.
    """

    shape: tuple[int, int]
    genes: torch.Tensor
    row_starts: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    gene_starts: torch.Tensor
    values_by_gene: torch.Tensor

    @classmethod
    def sample(cls, x: np.ndarray, rng: np.random.Generator, *, n_views: int = 2, mask_rate: float = 0.9,
               noise_std: float = 0.0) -> MaskedViews:
        """Draw the views of a batch: same distribution as :func:`make_views`.

        Parameters
        ----------
        x
            ``(batch, genes)`` float32 input, already multiplied by ``1 / (1 - mask_rate)``
            (scaling once for all epochs saves a pass over every batch).
        rng
            Source of the masks and noise.
        n_views, mask_rate, noise_std
            As in :func:`make_views` (``noise_std`` is in unscaled units).

        Returns
        -------
        The views, whose :meth:`to_dense` is distributed as ``make_views`` of the unscaled batch.
        """
        x = np.asarray(x, dtype=np.float32)
        batch, n_genes = x.shape
        n_entries = n_views * batch * n_genes
        kept = _bernoulli_positions(rng, n_entries, 1.0 - mask_rate)  # row-major positions in the stack
        rows, genes = np.divmod(kept, n_genes)
        # every view masks the same batch; mode="wrap" is kept % x.size, 6x faster than computing it
        values = np.take(x.reshape(-1), kept, mode="wrap")
        if noise_std > 0:  # noise on masked entries would be zeroed anyway: draw it for kept ones only
            values = values + np.float32(noise_std / (1.0 - mask_rate)) * rng.standard_normal(len(kept), np.float32)
        # Regroup by gene; a stable radix sort on 16-bit keys is what makes this cheap.
        by_gene = np.argsort(genes.astype(np.int16 if n_genes <= 2**15 else np.int32), kind="stable")
        sorted_genes = genes[by_gene]
        as_torch = torch.from_numpy
        return cls(shape=(n_views * batch, n_genes),
                   genes=as_torch(genes), row_starts=as_torch(np.searchsorted(kept, np.arange(n_views * batch) * n_genes)),
                   values=as_torch(values), rows=as_torch(rows[by_gene]),
                   gene_starts=as_torch(np.searchsorted(sorted_genes, np.arange(n_genes))),
                   values_by_gene=as_torch(values[by_gene]))

    def linear(self, layer: nn.Linear) -> torch.Tensor:
        """``layer(self.to_dense())`` with gradients for the layer, at the cost of the kept entries."""
        return _MaskedLinear.apply(self, layer.weight, layer.bias)

    def to_dense(self) -> torch.Tensor:
        """The ``shape`` matrix of the views, zeros where masked."""
        per_row = torch.diff(self.row_starts, append=torch.tensor([len(self.genes)]))
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[torch.repeat_interleave(torch.arange(self.shape[0]), per_row), self.genes] = self.values
        return dense


class _MaskedLinear(torch.autograd.Function):
    # x @ W.T + b for the sparse views x. Both products are sums of weighted rows, which
    # embedding_bag computes directly: of W.T's rows per view row, and of the output
    # gradient's rows per gene for dW.T. The views need no gradient.

    @staticmethod
    def forward(ctx, views: MaskedViews, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.views = views
        ctx.has_bias = bias is not None
        # W.T's rows must be contiguous: no copy when W is stored transposed (as fit_encoder does).
        out = F.embedding_bag(views.genes, weight.t().contiguous(), views.row_starts, mode="sum",
                              per_sample_weights=views.values)
        return out.add_(bias) if bias is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        views = ctx.views
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = F.embedding_bag(views.rows, grad.contiguous(), views.gene_starts, mode="sum",
                                          per_sample_weights=views.values_by_gene).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return None, grad_weight, grad_bias


def _bernoulli_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    # Sorted positions of the successes among n independent Bernoulli(p) trials, drawn as the
    # gaps between successes, about n * p numbers instead of n. floor(E / -log(1 - p)) + 1 with
    # E ~ Exp(1) is exactly Geometric(p), and numpy's exponential is 3x faster than its geometric.
    if p >= 1:
        return np.arange(n)
    expected = n * p
    draw = math.ceil(expected + 6 * math.sqrt(expected) + 16)  # enough but for ~1e-9 of calls
    scale = -1.0 / math.log1p(-p)
    positions = np.cumsum((rng.standard_exponential(draw) * scale).astype(np.int64) + 1) - 1
    while positions[-1] < n:
        more = np.cumsum((rng.standard_exponential(draw) * scale).astype(np.int64) + 1)
        positions = np.concatenate([positions, positions[-1] + more])
    return positions[:np.searchsorted(positions, n)]


#: Bytes of preprocessed rows an epoch reads at a time (a window of whole batches).
DISK_WINDOW_BYTES = 64 * 2**20

#: Each batch row's partner (a neighbour's row index), or ``None`` when the positives are the cell's own views.
Partners = Callable[[np.ndarray], np.ndarray] | None


def training_batches(x: Rows, cfg: TrainConfig, device: torch.device, *, sparse: bool, resident: bool,
                     partners: Partners = None) -> Callable[[], Iterator]:
    """A function that yields one epoch of shuffled batches of stacked views (two per cell).

    Parameters
    ----------
    x
        The preprocessed input.
    cfg
        ``batch_size``, ``seed``, ``input_dropout`` (the mask rate) and ``noise_std``.
    device
        Where the views are built.
    sparse
        Draw :class:`MaskedViews` with numpy (CPU only), else dense :func:`make_views` tensors.
    resident
        Dense views from a copy of the whole input held on the device; otherwise the rows are
        read a window of batches at a time.
    partners
        Neighbour positives (:func:`~contrastive_sc.method.objectives.partner_drawer`): one view
        of each cell, then one of its partner, in the same stacked layout.

    Notes
    -----
    A last batch of one cell cannot be batch-normalised; it waits for the next shuffle.
    """
    batch_size = min(cfg.batch_size, x.shape[0])
    bounds = _batch_bounds(x.shape[0], batch_size)
    if resident:
        return _dense_batches(np.ascontiguousarray(x.to_memory(), dtype=np.float32), bounds, cfg, device, partners)
    # a window of whole batches of rows is read at a time
    per_window = max(1, DISK_WINDOW_BYTES // (batch_size * x.shape[1] * 4))
    return _row_batches(x, bounds, per_window, cfg, device, sparse, partners)


def _dense_batches(x: np.ndarray, bounds: list[tuple[int, int]], cfg: TrainConfig, device: torch.device,
                   partners: Partners) -> Callable[[], Iterator[torch.Tensor]]:
    # Torch-native epochs of dense stacked views, on any device.
    data = torch.as_tensor(x, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

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


def _row_batches(x: Rows, bounds: list[tuple[int, int]], per_window: int, cfg: TrainConfig, device: torch.device,
                 sparse: bool, partners: Partners) -> Callable[[], Iterator]:
    # Epochs over preprocessed rows read by ``take``. The epoch's permutation is gathered a window
    # of batches at a time (for rows on disk, one sorted read) and cut into batches, so memory is
    # one window whatever the number of cells; the draws (numpy's permutation and masks) do not
    # depend on where the rows are held, so rows on disk train the same encoder as the array they
    # hold. On the CPU the views are sparse MaskedViews; otherwise dense views of each batch.
    take = x.take
    n_cells = x.shape[0]
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rescale = np.float32(1.0 / (1.0 - cfg.input_dropout))

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


def _batch_bounds(n_cells: int, batch_size: int) -> list[tuple[int, int]]:
    # A last batch of one cell cannot be batch-normalised; it waits for the next shuffle.
    bounds = [(start, min(start + batch_size, n_cells)) for start in range(0, n_cells, batch_size)]
    return [(a, b) for a, b in bounds if b - a > 1]
