"""The MLP encoder: Linear layers with BatchNorm + ReLU between them and an L2-normalised output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import MaskedViews


class ContrastiveEncoder(nn.Module):
    """MLP ``n_inputs -> layers[0] -> ... -> layers[-1]``, output on the unit sphere.

    Parameters
    ----------
    n_inputs
        Number of input genes.
    layers
        Hidden and output sizes; the paper uses ``(200, 40, 60)``.
    batch_norm
        Put ``BatchNorm1d`` before each hidden ReLU (the paper does).

    Notes
    -----
    ``forward(x, n_views)`` accepts several views stacked along the batch axis and normalises
    each view's batch on its own: the result equals ``n_views`` separate forward passes (as
    the original code ran them) while each Linear layer runs once on the stacked batch. In
    training, ``x`` may also be :class:`~contrastive_sc.augment.MaskedViews`, sparse views
    whose first Linear layer costs only their kept entries.
    """

    def __init__(self, n_inputs: int, layers: tuple[int, ...] = (200, 40, 60), batch_norm: bool = True) -> None:
        super().__init__()
        sizes = [int(n_inputs), *map(int, layers)]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        hidden = sizes[1:-1]
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) if batch_norm else nn.Identity() for w in hidden)
        self.n_inputs = int(n_inputs)
        self.n_outputs = sizes[-1]

    def forward(self, x: torch.Tensor | MaskedViews, n_views: int = 1) -> torch.Tensor:
        """Embed ``(n_views * batch, n_inputs)`` rows (a tensor, or sparse training views).

        Returns ``(n_views * batch, n_outputs)``, one unit-norm row per input row.
        """
        layers = iter(self.linears)
        first = next(layers)
        h = x.linear(first) if isinstance(x, MaskedViews) else first(x)
        for norm, linear in zip(self.norms, layers):
            if n_views > 1 and self.training and isinstance(norm, nn.BatchNorm1d):
                h = torch.cat([norm(chunk) for chunk in h.chunk(n_views)])
            else:
                h = norm(h)
            h = linear(F.relu(h))
        return F.normalize(h, dim=1)
