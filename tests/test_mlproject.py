"""The MLproject entry points, run for real with `mlflow run --env-manager local`."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _mlflow_run(entry, params, cwd, uri, experiment="mlproject"):
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    # Experiment and run selectors left in the environment by earlier in-process runs would clash
    # with --experiment-name.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                                                             "MLFLOW_RUN_ID")}
    env |= {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def tiny_h5(tmp_path, synthetic):
    path = tmp_path / "tiny.h5"
    with h5py.File(path, "w") as f:
        f["X"] = synthetic.X.toarray()
        f["Y"] = synthetic.obs["label"].to_numpy()
    return path


def test_train_entry_point_logs_everything(tracking_uri, tmp_path, tiny_h5):
    from contrastive_sc.mlops.tracking import ensure_experiment

    ensure_experiment("mlproject", tracking_uri)
    done = _mlflow_run("train", {"data": tiny_h5, "epochs": 3, "n_genes": 100, "batch_size": 64, "seed": 4,
                                 "lr": 0.1, "layers": "64,16,32"}, tmp_path, tracking_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("mlproject")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == "3" and params["preset"] == "fused"  # as passed to the entry point (the default)
    assert params["config.epochs"] == "3" and params["config.lr"] == "0.1" and params["config.layers"] == "64,16,32"
    assert params["config.temperature"] == "0.5" and params["config.pca_components"] == "50"  # left to the preset
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert {"kmeans_ari", "leiden_ari", "kmeans_silhouette", "leiden_n_clusters"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "embedding_map.png", "contingency_kmeans.csv", "torch_model"} <= artifacts
    assert run.data.tags["model_uri"].startswith("models:/")

    registered = _mlflow_run("register", {"name": "mlp", "experiment": "mlproject"}, tmp_path, tracking_uri)
    assert registered.returncode == 0, registered.stderr[-3000:]
    promoted = _mlflow_run("promote", {"name": "mlp"}, tmp_path, tracking_uri)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert MlflowClient().get_model_version_by_alias("mlp", "champion").run_id == run.info.run_id


def test_bad_parameter_fails_with_a_message(tracking_uri, tmp_path, tiny_h5):
    done = _mlflow_run("train", {"data": tiny_h5, "epochs": "three"}, tmp_path, tracking_uri)
    assert done.returncode != 0
    assert "epochs must be a whole number within [1, 1000000], got 'three'" in done.stderr
    assert "Traceback (most recent call last)" not in done.stderr.split("ERROR mlflow.cli")[0]


def test_conda_env_agrees_with_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    expected = set(project["dependencies"]) | set(project["optional-dependencies"]["cpu"])
    assert set(pip_section) - {"-e ."} == expected
    assert "-e ." in pip_section
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python.split("=")[1] >= project["requires-python"].lstrip(">=")


def test_conda_requirements_are_satisfied_by_this_environment():
    # conda is not installed here, so `mlflow run` with conda cannot be exercised; what can be
    # checked is that every pinned requirement resolves in the environment the tests run in.
    from importlib.metadata import version

    from packaging.requirements import Requirement

    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for line in pip_section:
        if line.startswith("-e"):
            continue
        requirement = Requirement(line)
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), line


def test_every_entry_point_calls_the_cli():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    assert {"train", "sweep", "register", "promote", "rollback", "export_onnx", "embed", "benchmark"} <= set(
        spec["entry_points"])
    for entry in spec["entry_points"].values():
        assert entry["command"].startswith("python -m contrastive_sc ")
