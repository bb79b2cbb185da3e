"""Every paper experiment runs end to end on a small setting and logs parent, children, table, figure."""

import pytest
from mlflow import MlflowClient

from contrastive_sc.benchmarks.experiments import EXPERIMENT_NAMES, SETTINGS, run_experiment

pytestmark = pytest.mark.slow

SMALL = {
    "genes": [50, "all"], "dropout": [0.5, 0.9], "noise": [0.0, 0.5], "architecture": [(8,), (16, 8)],
    "learning-rate": [0.01, 0.4], "epochs": [1, 2], "algorithms": None, "stability": None,
    "downsampling": [0.5, 1.0], "simulated": ["paper-kmeans", "pca50-kmeans"], "scalability": None,
}


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_experiment_logs_parent_children_table_and_figure(name, tracking_uri, synthetic):
    from contrastive_sc.mlops.tracking import setup

    setup(tracking_uri, "experiments")
    synthetic.uns["dataset"] = {"name": "synthetic"}
    seeds = [0, 1] if name == "stability" else [0]
    overrides = {"epochs": 1, "batch_size": 64} | ({} if name in ("genes", "scalability") else {"n_genes": 50})
    if name == "epochs":
        overrides.pop("epochs")
    summary = run_experiment(name, [synthetic], seeds=seeds, overrides=overrides, settings=SMALL[name], quick=True)
    assert len(summary) > 0 and {"dataset", "setting"} <= set(summary.columns)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("experiments")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("experiment") == name]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert children, "no nested runs"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {f"{name}_summary.csv", f"{name}_summary.md", f"{name}_runs.csv", f"{name}.png"} <= artifacts
    if name == "stability":
        assert "ari_cv" in summary.columns
    # every child was trained with its own setting and the overrides (the settings the model used)
    if name in SETTINGS:
        parameter = SETTINGS[name][0]
        expected = {",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in SMALL[name]}
        used = [child.data.params[f"config.{parameter}"] for child in children]
        assert sorted(used) == sorted(expected), (parameter, used)
        for child in children:
            assert child.data.params[f"config.{parameter}"] == child.data.params[parameter].replace("/", ",")
    for child in children:
        if "config.batch_size" in child.data.params:
            assert child.data.params["config.batch_size"] == "64"
            assert name == "epochs" or child.data.params["config.epochs"] == "1"
    if name not in ("simulated", "scalability"):
        assert all("config.seed" in child.data.params for child in children)


def test_unknown_experiment(tracking_uri):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment("nope")
