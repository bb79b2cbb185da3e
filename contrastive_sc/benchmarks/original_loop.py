"""A straightforward PyTorch loop of the paper's method, as the original code wrote it.

Kept only as the baseline of the training-speed comparison in the benchmark: a
``DataLoader`` over the numpy matrix, an ``nn.Dropout`` input layer, two forward passes per
batch and the SupCon loss written with explicit masks. :func:`contrastive_sc.method.train.fit_encoder`
computes the same thing (same views, same per-view BatchNorm, same loss) with less work.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..method.train import cosine_lr


class _OriginalNet(nn.Module):
    def __init__(self, dims: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(p=dropout)]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.encoder = nn.Sequential(*layers[:-2])  # no BatchNorm/ReLU after the last Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=1)


def _supcon_loss(features: torch.Tensor, temperature: float) -> torch.Tensor:
    # features: (batch, 2 views, dim); the unsupervised SupCon loss of the original code.
    batch = features.shape[0]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = torch.eye(batch).repeat(2, 2)
    self_mask = 1 - torch.eye(2 * batch)
    mask = mask * self_mask
    exp_logits = torch.exp(logits) * self_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def train_reference(x: np.ndarray, *, layers=(200, 40, 60), input_dropout: float = 0.9, temperature: float = 0.07,
                    lr: float = 0.4, epochs: int = 30, batch_size: int = 200,
                    seed: int = 0, lr_cosine_epochs: int | None = None) -> tuple[nn.Module, float]:
    """Train with the original loop; return the model (eval mode) and the training seconds."""
    torch.manual_seed(seed)
    model = _OriginalNet([x.shape[1], *layers], input_dropout)
    loader = torch.utils.data.DataLoader(x.astype(np.float32), batch_size=batch_size, shuffle=True, drop_last=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, epoch, lr_cosine_epochs or epochs)
        for batch in loader:
            if batch.shape[0] < 2:
                continue
            z1, z2 = model(batch), model(batch)
            loss = _supcon_loss(torch.stack([z1, z2], dim=1), temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), time.perf_counter() - started
