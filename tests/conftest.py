"""Shared fixtures: tiny synthetic data built once per session and copied per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests must not pick up a user's tracking server or write mlflow.db into the repository.
os.environ.pop("MLFLOW_TRACKING_URI", None)


def shared_file(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name} not found in {SHARED_DATA}")
    return path


@pytest.fixture(scope="session")
def _synthetic_session():
    from contrastive_sc.simulate import simulate_splat

    sim = simulate_splat(n_cells=300, n_genes=400, group_prob=(0.4, 0.3, 0.3), de_fac_scale=0.6,
                         dropout_type="none", seed=7)
    adata = sim.to_anndata()
    adata.obs["label"] = adata.obs["label"].astype(int)
    return adata


@pytest.fixture
def synthetic(_synthetic_session):
    """300 cells x 400 genes, 3 groups, raw counts in X, labels in obs['label']."""
    return _synthetic_session.copy()


@pytest.fixture(scope="session")
def tiny_config():
    """Paper preset shrunk for speed: 100 genes, 3 epochs, batches of 64."""
    from contrastive_sc.config import get_preset

    return get_preset("paper").replace(n_genes=100, epochs=3, batch_size=64, n_clusters=3)


@pytest.fixture(scope="session")
def _trained_session(_synthetic_session, tiny_config):
    from contrastive_sc import ContrastiveSC

    return ContrastiveSC(tiny_config).fit(_synthetic_session.copy())


@pytest.fixture
def trained(_trained_session):
    """A model trained on ``synthetic`` with ``tiny_config`` (shared, do not mutate)."""
    return _trained_session


@pytest.fixture
def rng():
    return np.random.default_rng(0)
