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


def pytest_collection_modifyitems(config, items):
    """Mark the attack battery's checks (the list in ``test_battery.py``) ``battery``."""
    from tests.test_battery import battery_ids

    named = battery_ids()
    for item in items:
        if f"{Path(item.path).name}::{item.originalname}" in named:
            item.add_marker(pytest.mark.battery)


@pytest.fixture(autouse=True)
def _isolate_mlflow_environment():
    """Restore every MLFLOW_* variable after each test.

    ``mlflow.set_experiment`` and ``mlflow.set_tracking_uri`` write os.environ; left behind, they
    would steer later tests (and the `mlflow run` subprocesses they start).
    """
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="session")
def _synthetic_session():
    from contrastive_sc.method.simulate import simulate_splat

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
    from contrastive_sc.method.config import get_preset

    return get_preset("paper").replace(n_genes=100, epochs=3, batch_size=64, n_clusters=3)


@pytest.fixture(scope="session")
def _trained_session(_synthetic_session, tiny_config):
    from contrastive_sc import ContrastiveSC

    return ContrastiveSC(tiny_config).fit(_synthetic_session.copy())


@pytest.fixture
def trained(_trained_session):
    """A model trained on ``synthetic`` with ``tiny_config`` (shared, do not mutate)."""
    return _trained_session


@pytest.fixture(scope="module")
def packaged(_trained_session, tmp_path_factory):
    """``trained`` packaged as the served model (ONNX encoder on the CPU provider)."""
    from contrastive_sc.serve.inference import EmbedThenCluster, package_model

    folder = tmp_path_factory.mktemp("packaged")
    package_model(_trained_session, folder)
    return EmbedThenCluster.from_dir(folder, provider="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- MLflow stores
@pytest.fixture(scope="session")
def _template_store(tmp_path_factory):
    """A migrated, empty SQLite store (migrating takes seconds: done once, copied per test)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("template_store")
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def _use_store(db_path: Path, monkeypatch) -> str:
    import mlflow

    uri = f"sqlite:///{db_path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture
def tracking_uri(_template_store, tmp_path, monkeypatch):
    """A fresh SQLite tracking + registry store in tmp_path, active for this test."""
    import shutil

    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_template_store, db)
    uri = _use_store(db, monkeypatch)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def _store_with_runs(_template_store, _synthetic_session, tiny_config, tmp_path_factory):
    """A store with two finished training runs of different quality on ``synthetic``."""
    import shutil

    import mlflow

    from contrastive_sc.mlops import tracking

    folder = tmp_path_factory.mktemp("store_with_runs")
    shutil.copyfile(_template_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        tracking.setup(uri, "tests")
        runs = [
            tracking.train_run(_synthetic_session.copy(), tiny_config.replace(epochs=6, seed=1), label_key="label",
                               run_name="good"),
            tracking.train_run(_noisy_labels(_synthetic_session),
                               tiny_config.replace(epochs=1, n_genes=20, layers=(2,), seed=2),
                               label_key="label", run_name="poor", map_plot=False),
        ]
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(None)
    return folder / "mlflow.db", runs


def _noisy_labels(adata, share: float = 0.4, seed: int = 0):
    """A copy of ``adata`` whose labels are shuffled among ``share`` of the cells: a worse reference to name cells by."""
    noisy = adata.copy()
    rng = np.random.default_rng(seed)
    rows = rng.choice(noisy.n_obs, int(share * noisy.n_obs), replace=False)
    labels = noisy.obs["label"].to_numpy().copy()
    labels[rows] = rng.permutation(labels[rows])
    noisy.obs["label"] = labels
    return noisy


@pytest.fixture
def store_with_runs(_store_with_runs, tmp_path, monkeypatch):
    """A private copy of a store holding two runs; returns ``(uri, [good_run, poor_run])``."""
    import shutil

    import mlflow

    db, runs = _store_with_runs
    shutil.copyfile(db, tmp_path / "mlflow.db")
    uri = _use_store(tmp_path / "mlflow.db", monkeypatch)
    yield uri, runs
    while mlflow.active_run():
        mlflow.end_run()
