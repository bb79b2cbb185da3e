"""Registration, metric-gated promotion, idempotence and rollback on a real SQLite registry."""

import mlflow
import pytest
from mlflow import MlflowClient

from contrastive_sc import registry


def _ordered(runs):
    by_ari = sorted(runs, key=lambda r: r["metrics"]["kmeans_ari"])
    assert by_ari[0]["metrics"]["kmeans_ari"] < by_ari[1]["metrics"]["kmeans_ari"]
    return by_ari  # [worse, better]


def test_register_best_tags_and_challenger(store_with_runs):
    _, runs = store_with_runs
    worse, better = _ordered(runs)
    result = registry.register_best("tests", "clusterer")
    assert result["run_id"] == better["run_id"] and result["metric"] == "kmeans_ari" and result["new"]
    version = MlflowClient().get_model_version_by_alias("clusterer", "challenger")
    assert str(version.version) == result["version"]
    tags = version.tags
    assert tags["run_id"] == better["run_id"] and tags["dataset"] and tags["metric"] == "kmeans_ari"
    assert float(tags["metric.kmeans_ari"]) == pytest.approx(better["metrics"]["kmeans_ari"])
    again = registry.register_best("tests", "clusterer")
    assert again["version"] == result["version"] and not again["new"]


def test_promotion_gate_idempotence_and_rollback(store_with_runs, synthetic):
    _, runs = store_with_runs
    worse, better = _ordered(runs)
    v_worse = registry.register_run(worse["run_id"], "clusterer")["version"]
    first = registry.promote("clusterer")
    assert first.changed and first.champion == v_worse and first.previous is None
    assert not registry.promote("clusterer").changed  # twice: no-op

    v_better = registry.register_run(better["run_id"], "clusterer")["version"]
    second = registry.promote("clusterer")
    assert second.changed and second.champion == v_better and second.previous == v_worse
    assert "is now @champion" in second.message
    noop = registry.promote("clusterer", v_better)
    assert not noop.changed and "nothing changed" in noop.message

    refused = registry.promote("clusterer", v_worse)
    assert not refused.changed and refused.message.startswith("refused") and "loses to" in refused.message
    assert registry.champion_version("clusterer") == v_better

    model = mlflow.pyfunc.load_model("models:/clusterer@champion")
    assert len(model.predict(synthetic.to_df().iloc[:10])) == 10

    back = registry.rollback("clusterer")
    assert back.champion == v_worse and back.previous == v_better
    assert registry.champion_version("clusterer") == v_worse
    assert registry.run_of("models:/clusterer@champion") == worse["run_id"]
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback("clusterer")


def test_tie_is_refused(store_with_runs):
    _, runs = store_with_runs
    run = runs[0]["run_id"]
    v1 = registry.register_run(run, "tied")["version"]
    registry.promote("tied")
    # a second registered version of the same run carries the same score
    v2 = mlflow.register_model(runs[0]["model_uri"], "tied",
                               tags=dict(MlflowClient().get_model_version("tied", v1).tags)).version
    result = registry.promote("tied", str(v2))
    assert not result.changed and "ties" in result.message


def test_errors_name_the_fix(store_with_runs):
    with pytest.raises(ValueError, match="experiment 'nope' not found"):
        registry.register_best("nope", "x")
    with pytest.raises(ValueError, match="not found"):
        registry.promote("clusterer-missing", "3")
    with pytest.raises(ValueError, match="expected a registry URI"):
        registry.run_of("runs:/abc/model")
