"""Registration, metric-gated promotion, idempotence and rollback on a real SQLite registry."""

import mlflow
import pytest
from mlflow import MlflowClient

from contrastive_sc.mlops import registry


def _ordered(runs, metric="annotation_cv_macro_f1"):
    """[worse, better] by ``metric`` (models trained with labels are ranked on how well they name cells)."""
    ranked = sorted(runs, key=lambda r: r["metrics"][metric])
    assert ranked[0]["metrics"][metric] < ranked[1]["metrics"][metric]
    assert ranked == sorted(runs, key=lambda r: r["metrics"]["kmeans_ari"])  # the worse reference clusters worse too
    return ranked


def test_register_best_tags_and_challenger(store_with_runs):
    _, runs = store_with_runs
    worse, better = _ordered(runs)
    result = registry.register_best("tests", "clusterer")
    assert result["run_id"] == better["run_id"] and result["metric"] == "annotation_cv_macro_f1" and result["new"]
    version = MlflowClient().get_model_version_by_alias("clusterer", "challenger")
    assert str(version.version) == result["version"]
    tags = version.tags
    assert tags["run_id"] == better["run_id"] and tags["dataset"] and tags["metric"] == "annotation_cv_macro_f1"
    assert float(tags["metric.annotation_cv_macro_f1"]) == pytest.approx(better["metrics"]["annotation_cv_macro_f1"])
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


# ----------------------------------------------------------------------------- datasets
def _versions(name, *specs):
    """Versions created directly, tagged as register_run tags them: specs are (value, dataset, digest)."""
    client = MlflowClient()
    client.create_registered_model(name)
    for value, dataset, digest in specs:
        client.create_model_version(name, source="file:///nowhere/model", tags={
            "metric": "kmeans_ari", "metric_value": repr(value), "dataset": dataset, "dataset_digest": digest})
    return client


def test_register_records_the_dataset_digest(store_with_runs):
    _, runs = store_with_runs
    version = registry.register_run(runs[0]["run_id"], "digested")["version"]
    run = MlflowClient().get_run(runs[0]["run_id"])
    tags = MlflowClient().get_model_version("digested", version).tags
    assert tags["dataset_digest"] == run.data.params["data.digest"] and len(tags["dataset_digest"]) == 16


def test_promotion_across_datasets_is_refused_by_name(tracking_uri):
    _versions("mixed", (0.5, "pbmc", "aaaa1111"), (0.9, "lung", "bbbb2222"), (0.95, "pbmc", ""))
    assert registry.promote("mixed", "1").changed
    refused = registry.promote("mixed", "2")
    assert not refused.changed and registry.champion_version("mixed") == "1"
    for word in ("refused", "'lung' (digest bbbb2222)", "'pbmc' (digest aaaa1111)", "--eval-data"):
        assert word in refused.message
    unknown = registry.promote("mixed", "3")  # no digest and no run to ask: not comparable either
    assert not unknown.changed and "digest unknown" in unknown.message


def test_eval_data_decides_between_datasets(store_with_runs, synthetic, tmp_path):
    from click.testing import CliRunner

    from contrastive_sc.cli import main
    from contrastive_sc.mlops.run_data import dataset_digest

    uri, runs = store_with_runs
    worse, better = _ordered(runs)
    v_worse = registry.register_run(worse["run_id"], "judged")["version"]
    registry.promote("judged")
    v_better = registry.register_run(better["run_id"], "judged")["version"]
    client = MlflowClient()
    client.set_model_version_tag("judged", v_better, "dataset_digest", "0000elsewhere")
    assert "cannot be compared" in registry.promote("judged").message

    path = tmp_path / "eval.h5ad"
    synthetic.write_h5ad(path)
    result = CliRunner().invoke(main, ["promote", "--name", "judged", "--eval-data", str(path), "--label-key", "label",
                                       "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    digest = dataset_digest(synthetic)
    # models trained with labels are judged on how well they name the evaluation data's cells
    scores = {v: float(client.get_model_version("judged", v).tags[f"eval.{digest}.annotation_macro_f1"])
              for v in (v_worse, v_better)}
    assert scores[v_better] > scores[v_worse], scores
    assert registry.champion_version("judged") == v_better
    for v in (v_worse, v_better):
        assert f"annotation macro F1={scores[v]:.4f}" in result.output
    assert digest in result.output

    # The same data, the other way round: the weaker version loses on it.
    back = registry.promote("judged", v_worse, eval_data=str(path))
    assert not back.changed and "loses to" in back.message and registry.champion_version("judged") == v_better


def test_eval_data_needs_labels(store_with_runs, synthetic, tmp_path):
    _, runs = store_with_runs
    registry.register_run(runs[0]["run_id"], "unlabelled")
    path = tmp_path / "nolabels.h5ad"
    del synthetic.obs["label"]
    synthetic.write_h5ad(path)
    with pytest.raises(ValueError, match="has no 'label' column; pass --label-key"):
        registry.promote("unlabelled", eval_data=str(path))


# ----------------------------------------------------------------------------- rollback past deleted versions
def test_rollback_skips_deleted_versions(tracking_uri):
    client = _versions("pruned", (0.5, "d", "d1"), (0.6, "d", "d1"), (0.9, "d", "d1"))
    for version in ("1", "2", "3"):
        assert registry.promote("pruned", version).changed
    client.delete_model_version("pruned", "2")
    back = registry.rollback("pruned")
    assert back.champion == "1" and back.previous == "3" and "skipped deleted version(s) ['2']" in back.message
    assert registry.champion_version("pruned") == "1"
    assert client.get_registered_model("pruned").tags[registry.HISTORY_TAG] == "[]"


def test_rollback_to_only_deleted_versions_says_so_once(tracking_uri):
    client = _versions("gone", (0.5, "d", "d1"), (0.6, "d", "d1"))
    registry.promote("gone", "1")
    registry.promote("gone", "2")
    client.delete_model_version("gone", "1")
    with pytest.raises(ValueError, match=r"nothing valid to roll back to: .*\['1'\] were deleted"):
        registry.rollback("gone")
    assert registry.champion_version("gone") == "2"
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback("gone")


# ----------------------------------------------------------------------------- errors through the CLI
def _cli_error(args, *expected):
    """Run the CLI; assert exit code 2 and one ``Error:`` line (the last) naming ``expected``."""
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for word in expected:
        assert word in errors[0], result.output
    return errors[0]


def test_registry_errors_are_one_line_messages(store_with_runs, tmp_path):
    uri, runs = store_with_runs
    registry.register_run(runs[0]["run_id"], "known")
    registry.promote("known")
    _cli_error(["rollback", "--name", "nosuchmodel", "--tracking-uri", uri],
               "registered model 'nosuchmodel' not found", "registered models: ['known']")
    _cli_error(["rollback", "--name", "known", "--tracking-uri", uri], "no earlier champion")
    _cli_error(["register", "--name", "known", "--run-id", "deadbeef", "--tracking-uri", uri],
               "run 'deadbeef' not found", runs[0]["run_id"])
    _cli_error(["promote", "--name", "known", "--version", "7", "--tracking-uri", uri],
               "known/7 not found", "versions ['1']", "'champion': '1'")
    _cli_error(["promote", "--name", "known", "--label-key", "label", "--tracking-uri", uri], "--eval-data")
    out = str(tmp_path / "x.h5ad")
    _cli_error(["embed", "--model-uri", "models:/nosuch@champion", "--data", "simulated", "--out", out,
                "--tracking-uri", uri], "registered model 'nosuch' not found", "['known']")
    _cli_error(["embed", "--model-uri", "models:/known@nosuchalias", "--data", "simulated", "--out", out,
                "--tracking-uri", uri], "no alias @nosuchalias", "'challenger': '1'")
    _cli_error(["export-onnx", "--model-uri", "models:/known/9", "--out", str(tmp_path / "x.onnx"),
                "--tracking-uri", uri], "known/9 not found")
    _cli_error(["export-onnx", "--model-uri", "runs:/deadbeef", "--out", str(tmp_path / "x.onnx"),
                "--tracking-uri", uri], "run 'deadbeef' not found")


@pytest.mark.slow
def test_missing_model_is_one_line_from_a_real_process(tracking_uri):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "contrastive_sc", "rollback", "--name", "nosuchmodel",
                           "--tracking-uri", tracking_uri], capture_output=True, text=True, timeout=120,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 2 and "Traceback" not in done.stderr and not done.stdout, done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("Error: registered model 'nosuchmodel' not found")


# ----------------------------------------------------------------------------- what register refuses or accepts
def test_a_deleted_run_or_experiment_is_not_registered(store_with_runs):
    uri, runs = store_with_runs
    client = MlflowClient()
    run_id = runs[0]["run_id"]
    client.delete_run(run_id)
    line = _cli_error(["register", "--name", "trash", "--run-id", run_id, "--tracking-uri", uri],
                      f"the run {run_id} is deleted", "mlflow runs restore")
    assert "version" not in line
    client.restore_run(run_id)
    client.delete_experiment(client.get_run(run_id).info.experiment_id)
    _cli_error(["register", "--name", "trash", "--run-id", run_id, "--tracking-uri", uri],
               f"of run {run_id} is deleted", "mlflow experiments restore --experiment-id")
    assert client.search_registered_models() == []


def test_a_name_with_both_quotes_registers_promotes_and_rolls_back(store_with_runs):
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    uri, runs = store_with_runs
    worse, better = _ordered(runs)
    name = """it's "ours\""""
    decoy = """it_s "ours\""""  # what the LIKE pattern also matches: kept apart by the exact name
    registry.register_run(better["run_id"], decoy)
    first = CliRunner().invoke(main, ["register", "--name", name, "--run-id", worse["run_id"], "--tracking-uri", uri])
    assert first.exit_code == 0 and f"registered as {name} version 1" in first.output, first.output
    again = registry.register_run(worse["run_id"], name)
    assert again["version"] == "1" and not again["new"]
    assert registry.promote(name).changed
    assert registry.register_run(better["run_id"], name)["version"] == "2"
    assert registry.promote(name).champion == "2"
    assert registry.rollback(name).champion == "1"
    assert registry._version_numbers(MlflowClient(), name) == ["1", "2"]


def test_export_into_a_missing_folder_writes_it(store_with_runs, tmp_path):
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    uri, runs = store_with_runs
    registry.register_run(runs[0]["run_id"], "exported")
    out = tmp_path / "not" / "yet" / "encoder.onnx"
    result = CliRunner().invoke(main, ["export-onnx", "--model-uri", "models:/exported@challenger", "--out", str(out),
                                       "--tracking-uri", uri])
    assert result.exit_code == 0 and out.stat().st_size > 0, result.output  # was "Error: 2"


def test_a_logged_model_missing_its_cell_types_file_is_named(store_with_runs, tmp_path):
    uri, runs = store_with_runs
    local = mlflow.artifacts.download_artifacts(runs[0]["model_uri"], dst_path=str(tmp_path / "model"))
    deleted = list((tmp_path / "model").rglob("cell_types.npz"))
    assert len(deleted) == 1
    deleted[0].unlink()
    _cli_error(["embed", "--model-uri", local, "--data", "simulated", "--out", str(tmp_path / "e.h5ad"),
                "--tracking-uri", uri], "cell_types.npz, listed in manifest.json", "is missing")  # was "Error: cell_types"


def test_a_run_missing_its_saved_cell_types_still_exports(trained, tmp_path):
    """Export needs the encoder alone: torch_model/ without cell_types.npz loads without an annotator."""
    from contrastive_sc.method.model import ContrastiveSC
    from contrastive_sc.serve.onnx_io import export_onnx

    folder = trained.save(tmp_path / "torch_model")
    (folder / "cell_types.npz").unlink(missing_ok=True)
    model = ContrastiveSC.load(folder)
    assert model.annotator is None
    assert export_onnx(model.encoder, tmp_path / "e.onnx").stat().st_size > 0
