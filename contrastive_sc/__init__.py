"""contrastive-sc: contrastive self-supervised clustering of scRNA-seq data.

The public API is loaded lazily, so ``import contrastive_sc`` is cheap and imports neither
torch, MLflow, onnxruntime nor igraph; the served model imports only what inference needs.
"""

from __future__ import annotations

import importlib

# Light modules are bound eagerly: `cluster` is both a module and a function, and an eager
# import makes the function win (a lazily loaded submodule would shadow it).
from .analysis.cluster import cluster, cluster_labels
from .analysis.metrics import score_clustering
from .method.config import ContrastiveConfig, get_preset

__version__ = "0.1.0"

# Heavy entry points (torch, anndata) load on first use.
_EXPORTS = {"ContrastiveSC": "method.model", "read": "method.io"}

__all__ = ["ContrastiveConfig", "ContrastiveSC", "__version__", "cluster", "cluster_labels", "get_preset", "read",
           "score_clustering"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    msg = f"module 'contrastive_sc' has no attribute {name!r}"
    raise AttributeError(msg)
