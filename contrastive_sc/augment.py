"""View makers for contrastive training: random gene masking and Gaussian noise (torch only)."""

from __future__ import annotations

import torch


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
