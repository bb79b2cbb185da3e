"""Grids of settings: parsing `--grid`, and run_sweep's parent run, nested runs and summary."""

import pytest

from contrastive_sc.benchmarks.experiments import grid_points, parse_grid, run_sweep


def test_parse_grid_reads_numbers_words_and_layer_lists():
    grid = parse_grid(" lr=0.1,0.4 ; n-genes=500,all;layers=200/40/60,64/16; epochs=5;")
    assert grid == {"lr": [0.1, 0.4], "n_genes": [500, "all"], "layers": [(200, 40, 60), (64, 16)], "epochs": [5]}
    assert isinstance(grid["n_genes"][0], int) and isinstance(grid["lr"][0], float)
    assert parse_grid("") == {}


@pytest.mark.parametrize("text,message", [
    ("lr", "grid entry 'lr' is not NAME=V1,V2,..."),
    ("lr=", "grid entry 'lr=' is not NAME=V1,V2,..."),
    ("learning_rate=0.1", r"unknown grid parameter\(s\) \['learning_rate'\]; expected some of"),
])
def test_parse_grid_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(text)


def test_grid_points_is_the_product_in_order():
    assert grid_points({"lr": [0.1, 0.4], "epochs": [1, 2]}) == [
        {"lr": 0.1, "epochs": 1}, {"lr": 0.1, "epochs": 2}, {"lr": 0.4, "epochs": 1}, {"lr": 0.4, "epochs": 2}]
    assert grid_points({}) == [{}]


@pytest.mark.slow
def test_sweep_logs_a_parent_with_nested_runs_and_a_summary(tracking_uri, synthetic, tiny_config):
    from mlflow import MlflowClient

    from contrastive_sc.mlops.tracking import setup

    setup(tracking_uri, "sweep")
    base = tiny_config.replace(epochs=1)
    summary = run_sweep(synthetic, base, {"lr": [0.1, 0.4]}, [0, 1], label_key="label", methods=["kmeans"])
    assert summary["lr"].tolist() == ["0.1", "0.4"]
    assert {"kmeans_ari_mean", "kmeans_ari_sd", "train_seconds_mean"} <= set(summary.columns)
    assert summary["kmeans_ari_mean"].between(-1, 1).all() and (summary["kmeans_ari_sd"] >= 0).all()

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep"]
    assert parent.data.params["sweep.n_points"] == "2" and parent.data.params["sweep.seeds"] == "0,1"
    assert parent.data.tags["parent_run_id"] == parent.info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["lr=0.1 seed=0", "lr=0.1 seed=1", "lr=0.4 seed=0",
                                                         "lr=0.4 seed=1"]
    assert {r.data.params["config.lr"] for r in children} == {"0.1", "0.4"}
    # The summary is the children's mean.
    child_ari = [r.data.metrics["kmeans_ari"] for r in children if r.data.params["config.lr"] == "0.1"]
    assert summary.loc[0, "kmeans_ari_mean"] == pytest.approx(sum(child_ari) / 2)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.md", "sweep_runs.csv", "sweep_runs.md"} <= artifacts


def test_a_bad_grid_value_fails_before_any_run(tracking_uri, synthetic, tiny_config):
    from mlflow import MlflowClient

    from contrastive_sc.mlops.tracking import setup

    setup(tracking_uri, "bad-sweep")
    with pytest.raises(ValueError, match=r"lr must be a finite number within \(0, 10\]"):
        run_sweep(synthetic, tiny_config, {"lr": [0.1, -1.0]}, [0], label_key="label")
    experiment = MlflowClient().get_experiment_by_name("bad-sweep")
    assert MlflowClient().search_runs([experiment.experiment_id]) == []
