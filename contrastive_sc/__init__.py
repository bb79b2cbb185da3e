"""contrastive-sc: contrastive self-supervised clustering of scRNA-seq data.

A small public API; MLflow, onnxruntime and leidenalg are imported only where used.
"""

from .cluster import cluster, cluster_labels
from .config import ContrastiveConfig, get_preset
from .io import read
from .metrics import score_clustering
from .model import ContrastiveSC

__version__ = "0.1.0"

__all__ = ["ContrastiveConfig", "ContrastiveSC", "__version__", "cluster", "cluster_labels", "get_preset",
           "read", "score_clustering"]
