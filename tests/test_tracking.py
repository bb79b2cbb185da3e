"""A training run records its params, per-epoch loss, metrics, artifacts and model."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient


def test_run_contents(store_with_runs, tiny_config):
    uri, (good, _) = store_with_runs
    client = MlflowClient()
    run = client.get_run(good["run_id"])
    params = run.data.params
    for key, value in tiny_config.replace(epochs=6, seed=1, n_clusters=3).to_params().items():
        expected = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        assert params[f"config.{key}"] == expected, key
    assert params["data.n_cells"] == "300" and params["data.label_key"] == "label"
    assert len(params["data.digest"]) == 16
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(6))
    for method in ("kmeans", "leiden"):
        for score in ("ari", "nmi", "silhouette", "calinski_harabasz", "n_clusters", "seconds"):
            assert f"{method}_{score}" in run.data.metrics
    assert run.data.metrics["kmeans_ari"] > 0.8
    assert run.data.metrics["train_seconds"] > 0
    assert run.data.tags["preset"] == "paper" and run.data.tags["contrastive_sc_version"]
    assert "git_commit" in run.data.tags
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == params["data.digest"]

    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "embedding_map.png", "contingency_kmeans.csv", "contingency_leiden.csv",
            "markers_kmeans.csv", "torch_model"} <= files
    saved = {f.path for f in client.list_artifacts(run.info.run_id, "torch_model")}
    assert {"torch_model/config.json", "torch_model/preprocess_state.json", "torch_model/encoder.pt"} <= saved
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="torch_model/config.json"))
    assert json.loads(local.read_text())["epochs"] == 6
    png = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="loss_curve.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_logged_model_is_the_embed_then_cluster_pyfunc(store_with_runs, synthetic):
    _, (good, _) = store_with_runs
    model = mlflow.pyfunc.load_model(good["model_uri"])
    out = model.predict(synthetic.to_df().iloc[:50], params={"method": "kmeans", "n_clusters": 3})
    assert len(out) == 50 and {"cell", "cluster", "gene_coverage", "emb_0"} <= set(out.columns)
    assert model.metadata.get_params_schema() is not None
    requirements = (Path(mlflow.artifacts.download_artifacts(good["model_uri"])) / "requirements.txt").read_text()
    assert "torch" not in requirements and "onnxruntime" in requirements


def test_tracking_uri_default_and_override(monkeypatch, tmp_path):
    from contrastive_sc.mlops.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri() == "http://tracking.example:5000"
    assert resolve_tracking_uri("sqlite:////x.db") == "sqlite:////x.db"


def test_experiment_artifacts_live_beside_the_database(tracking_uri, tmp_path):
    from contrastive_sc.mlops.tracking import ensure_experiment

    experiment_id = ensure_experiment("placed", tracking_uri)
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert ensure_experiment("placed", tracking_uri) == experiment_id


def test_failed_training_leaves_a_failed_run_and_registers_nothing(tracking_uri, synthetic, tiny_config):
    from contrastive_sc.mlops import registry, tracking

    tracking.setup(tracking_uri, "failing")
    broken = synthetic.copy()
    broken.X = broken.X * 0  # no expressed gene: preprocessing refuses it
    with pytest.raises(ValueError, match="detected in >= 2 cells"):
        tracking.train_run(broken, tiny_config, label_key="label")
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("failing").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    with pytest.raises(ValueError, match="no finished run"):
        registry.register_best("failing", "never")
    assert np.all([m.name != "never" for m in MlflowClient().search_registered_models()])
