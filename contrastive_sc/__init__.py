"""contrastive-sc: contrastive self-supervised clustering of scRNA-seq data.

The public API is loaded lazily, so ``import contrastive_sc`` is cheap and imports neither
torch, MLflow, onnxruntime nor leidenalg; the served model imports only what inference needs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ContrastiveSC": "model",
    "ContrastiveConfig": "config",
    "get_preset": "config",
    "read": "io",
    "cluster": "cluster",
    "cluster_labels": "cluster",
    "score_clustering": "metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    msg = f"module 'contrastive_sc' has no attribute {name!r}"
    raise AttributeError(msg)
