"""The logged pyfunc as MLflow sees it: signature, input example, requirements, params."""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def logged(_store_with_runs, tmp_path_factory):
    """The good run's model downloaded to a local folder (MLmodel, artifacts, requirements)."""
    import mlflow

    db, runs = _store_with_runs
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        path = mlflow.artifacts.download_artifacts(runs[0]["model_uri"], dst_path=str(tmp_path_factory.mktemp("m")))
    finally:
        mlflow.set_tracking_uri(None)
    return path


def test_signature_has_params_and_outputs_and_no_input_schema(logged):
    from mlflow.models import Model

    from contrastive_sc.serve.inference import PredictParams

    signature = Model.load(logged).signature
    assert signature.inputs is None  # gene columns are checked by the model (see tracking._log_model)
    assert sorted(p.name for p in signature.params.params) == PredictParams.known()
    # Types and defaults are PredictParams's (Leiden's and min_confidence's come from the model).
    declared = {name: (kind, default) for name, kind, default in
                PredictParams.schema({"resolution": None, "n_neighbors": None, "min_confidence": None})}
    logged = {p.name: (p.dtype.name, p.default) for p in signature.params.params}
    assert {name: logged[name] for name in declared} == declared
    assert logged["resolution"][0] == "double" and logged["n_neighbors"][0] == "long"
    outputs = {c.name: (c.type.name, c.required) for c in signature.outputs.inputs}
    assert outputs["cell"] == ("string", True) and outputs["cluster"] == ("long", True)
    assert outputs["gene_coverage"] == ("double", True) and outputs["emb_59"] == ("float", False)


def test_requirements_are_pinned_and_torch_free(logged):

    lines = [line for line in (Path(logged) / "requirements.txt").read_text().split("\n") if line and "mlflow" not in line]
    pins = dict(line.split("==") for line in lines)
    for name in ("numpy", "pandas", "scipy", "scikit-learn", "onnxruntime", "igraph", "pynndescent"):
        assert pins[name] == version(name), lines
    assert not any(line.startswith(("torch", "leidenalg")) for line in lines)  # neither runs when serving


def test_input_example_predicts_with_mlflow_models_predict(logged, tmp_path):
    """`mlflow.models.predict` on the logged input example and on int, float and partial-gene frames."""
    import mlflow
    from mlflow.models import Model

    serving_example = json.loads((Path(logged) / "serving_input_example.json").read_text())
    assert serving_example["params"] == {"method": "trained", "return_embedding": False}
    genes = serving_example["dataframe_split"]["columns"]
    assert genes == list(Model.load(logged).load_input_example(logged).columns)

    # One frame covers what callers send: int64 and float64 columns, 10 model genes missing, one extra gene
    # (each mlflow.models.predict call starts a process: ~10 s here).
    counts = pd.DataFrame(np.random.default_rng(0).poisson(2, size=(6, len(genes))), columns=genes)
    frame = counts.astype({g: np.float64 for g in genes[::2]}).drop(columns=genes[:10]).assign(not_a_model_gene=3)
    out = tmp_path / "frame.json"
    mlflow.models.predict(logged, frame, env_manager="local", output_path=str(out))
    rows = pd.DataFrame(json.loads(out.read_text())["predictions"])
    assert list(rows.columns[:6]) == ["cell", "cluster", "gene_coverage", "cell_type", "confidence", "emb_0"]
    assert len(rows) == 6
    assert rows["gene_coverage"].iloc[0] == pytest.approx(0.9)
    in_process = mlflow.pyfunc.load_model(logged).predict(counts, params={"return_embedding": False})
    expected = mlflow.pyfunc.load_model(logged).predict(counts.drop(columns=genes[:10]),
                                                        params={"return_embedding": False})
    np.testing.assert_array_equal(rows["cluster"], expected["cluster"])
    assert len(in_process) == 6

    out = tmp_path / "example.json"  # the logged example, params included, as a served request
    mlflow.models.predict(logged, input_path=str(Path(logged) / "serving_input_example.json"), env_manager="local",
                          output_path=str(out))
    rows = pd.DataFrame(json.loads(out.read_text())["predictions"])
    assert list(rows.columns) == ["cell", "cluster", "gene_coverage", "cell_type", "confidence"] and len(rows) == 2


def test_in_process_pyfunc_refuses_unknown_params(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged)
    genes = model.input_example.columns
    frame = pd.DataFrame(np.random.default_rng(1).poisson(2, size=(8, len(genes))), columns=genes)
    with pytest.raises(MlflowException, match=r"unknown parameter\(s\) \['n_cluster'\]; the known parameters are"):
        model.predict(frame, params={"method": "kmeans", "n_cluster": 2})
    assert model.predict(frame, params={"method": "kmeans", "n_clusters": 2})["cluster"].nunique() == 2


def test_an_unexpected_failure_is_a_500_without_traceback_or_paths(logged, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged)
    model.unwrap_python_model().model.encoder = None  # breaks the server side, not the request
    genes = model.input_example.columns
    frame = pd.DataFrame(np.random.default_rng(1).poisson(2, size=(4, len(genes))), columns=genes)
    with pytest.raises(MlflowException) as error:
        model.predict(frame)
    assert error.value.get_http_status_code() == 500
    message = error.value.message
    assert message.startswith("internal error while clustering the request (ref ") and "/" not in message
    assert "Traceback" in caplog.text or "NoneType" in caplog.text  # the details went to the server log


def test_a_model_trained_without_labels_names_no_types_and_refuses_unknown_params(tracking_uri, synthetic, tiny_config):
    import mlflow
    from mlflow.exceptions import MlflowException

    from contrastive_sc.mlops import tracking

    tracking.setup(tracking_uri, "unlabelled")
    run = tracking.train_run(synthetic, tiny_config, methods=("kmeans",), map_plot=False)  # no label_key
    model = mlflow.pyfunc.load_model(run["model_uri"])
    frame = synthetic.to_df().iloc[:20]
    out = model.predict(frame, params={"return_embedding": False})
    assert list(out.columns) == ["cell", "cluster", "gene_coverage"]
    for params, name in (({"min_confidence": 0.1}, "min_confidence"), ({"n_cluster": 2}, "n_cluster")):
        with pytest.raises(MlflowException, match=rf"unknown parameter\(s\) \['{name}'\]"):
            model.predict(frame, params=params)
