"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (torch only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """NT-Xent over two stacked views.

    For each of the ``2n`` embeddings the positive is the other view of the same cell and the
    ``2n - 2`` embeddings of other cells are negatives. With two views and no labels this is
    the SupCon loss the original code used (temperature = base temperature).

    Parameters
    ----------
    temperature
        Softmax temperature, > 0 (the paper uses 0.07).
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if not temperature > 0:
            msg = f"temperature must be > 0, got {temperature}"
            raise ValueError(msg)
        self.temperature = float(temperature)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (2n, d), rows 0..n-1 view one, rows n..2n-1 view two; rows assumed L2-normalised
        if z.ndim != 2 or z.shape[0] % 2 or z.shape[0] < 4:
            msg = f"expected (2n, d) embeddings with n >= 2, got shape {tuple(z.shape)}"
            raise ValueError(msg)
        n = z.shape[0] // 2
        logits = z @ z.T / self.temperature  # (2n, 2n) cosine similarities / T
        logits.fill_diagonal_(float("-inf"))  # a cell is never its own negative
        positives = torch.arange(2 * n, device=z.device).roll(n)
        return F.cross_entropy(logits, positives)
