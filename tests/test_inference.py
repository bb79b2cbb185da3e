"""The embed-then-cluster model in process: inputs, params and every bad request."""

import numpy as np
import pandas as pd
import pytest

from contrastive_sc.serve.inference import EmbedThenCluster, PredictParams, package_model


@pytest.fixture
def frame(synthetic):
    return synthetic.to_df()


def test_reference_matches_the_torch_model(packaged, trained, synthetic, frame):
    out = packaged.predict(frame)
    assert list(out.columns[:3]) == ["cell", "cluster", "gene_coverage"]
    assert out.shape == (synthetic.n_obs, 3 + 60)
    expected = trained.assign_clusters(trained.transform(synthetic))
    np.testing.assert_array_equal(out["cluster"].to_numpy(), expected)
    np.testing.assert_allclose(out.filter(like="emb_").to_numpy(), trained.transform(synthetic), atol=1e-5)


def test_any_gene_order_and_extra_genes(packaged, frame):
    shuffled = frame[frame.columns[::-1]].assign(extra_gene=1)
    a = packaged.predict(frame, {"return_embedding": False})
    b = packaged.predict(shuffled, {"return_embedding": False})
    pd.testing.assert_frame_equal(a, b)


def test_methods_and_params(packaged, frame):
    kmeans = packaged.predict(frame, {"method": "kmeans", "n_clusters": 3, "seed": 1})
    assert kmeans["cluster"].nunique() == 3
    leiden = packaged.predict(frame, {"method": "leiden", "resolution": 0.5, "return_embedding": False})
    assert leiden.shape[1] == 3 and leiden["cluster"].nunique() >= 2


def test_tensor_input_is_model_genes_in_order(packaged, frame):
    tensor = frame[list(packaged.state.genes)].to_numpy()
    a = packaged.predict(tensor, {"return_embedding": False})
    b = packaged.predict(frame[list(packaged.state.genes)], {"return_embedding": False})
    np.testing.assert_array_equal(a["cluster"], b["cluster"])


def test_missing_genes_reported_and_threshold(packaged, frame):
    genes = list(packaged.state.genes)
    partial = frame.drop(columns=genes[:30])
    out = packaged.predict(partial, {"return_embedding": False})
    assert out["gene_coverage"].iloc[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"only 20 of the model's 100 genes are in the input"):
        packaged.predict(frame.drop(columns=genes[:80]))
    assert len(packaged.predict(frame.drop(columns=genes[:80]), {"min_coverage": 0.1})) == len(frame)


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.iloc[:0], "empty input"),
    (lambda f: f.assign(**{f.columns[0]: -1.0}), "negative value"),
    (lambda f: f.assign(**{f.columns[0]: np.nan}), r"missing \(null/NaN\) value"),
    (lambda f: f.assign(**{f.columns[0]: np.inf}), "infinite value"),
    (lambda f: f.assign(**{f.columns[0]: 0.5}), "non-integer"),
    (lambda f: f.assign(**{f.columns[0]: "high"}), "non-numeric value"),
    (lambda f: pd.concat([f, f.iloc[:, :1]], axis=1), "duplicated gene column"),
])
def test_bad_inputs(packaged, frame, mutate, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(mutate(frame))


@pytest.mark.parametrize("params,message", [
    ({"method": "dbscan"}, "unknown method 'dbscan'"),
    ({"method": "kmeans"}, "needs n_clusters"),
    ({"method": "kmeans", "n_clusters": 10_000}, "only 300 cell"),
    ({"flavour": 1}, "unknown parameter"),
    ({"resolution": 0}, r"resolution must be a finite number within \(0, 1000\], got 0"),
])
def test_bad_params(packaged, frame, params, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(frame, params)


def test_tensor_of_wrong_width(packaged):
    with pytest.raises(ValueError, match=r"\(cells, 100\) raw counts of the model's genes"):
        packaged.predict(np.zeros((3, 7)))


def test_defaults():
    params = PredictParams.from_dict(None)
    assert params.method == "trained" and params.min_coverage == 0.5 and params.return_embedding


def test_params_schema_is_predict_params_fields_with_the_trained_defaults():
    trained = {"resolution": 0.5, "n_neighbors": 30, "min_confidence": 0.25}
    assert PredictParams.schema(trained) == [
        ("method", "string", "trained"), ("n_clusters", "long", 0), ("resolution", "double", 0.5),
        ("n_neighbors", "long", 30), ("seed", "long", 0), ("return_embedding", "boolean", True),
        ("min_coverage", "double", 0.5), ("min_confidence", "double", 0.25)]
    assert [name for name, _, _ in PredictParams.schema(trained)] == [f for f in PredictParams.__dataclass_fields__]
    # A model trained without labels has no min_confidence to default to, and takes none.
    unlabelled = PredictParams.schema(trained | {"min_confidence": None})
    assert [name for name, _, _ in unlabelled] == [n for n in PredictParams.__dataclass_fields__ if n != "min_confidence"]
    # Every default in the schema is a value PredictParams accepts.
    PredictParams.from_dict({name: default for name, _, default in PredictParams.schema(trained)})


def test_serving_path_never_imports_torch(tmp_path, _trained_session):
    import subprocess
    import sys

    package_model(_trained_session, tmp_path)
    code = (
        "import sys, numpy as np\n"
        "from contrastive_sc.serve.inference import EmbedThenCluster\n"
        f"m = EmbedThenCluster.from_dir({str(tmp_path)!r}, provider='cpu')\n"
        "m.predict(np.ones((4, m.state.n_genes)))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("params,message", [
    ({"methd": "kmeans"},
     r"unknown parameter\(s\) \['methd'\]; the known parameters are \['method', 'min_confidence', 'min_coverage'"),
    ({"resolution": float("nan")}, "resolution must be a finite number"),
    ({"resolution": float("inf")}, "resolution must be a finite number"),
    ({"resolution": 1e6}, r"resolution must be a finite number within \(0, 1000\], got 1000000.0"),
    ({"resolution": "high"}, "resolution must be a finite number within .*, got 'high'"),
    ({"seed": 2**63}, r"seed must be a whole number within \[0, 4294967295\], got 9223372036854775808"),
    ({"seed": -1}, r"seed must be a whole number within \[0, 4294967295\], got -1"),
    ({"method": "kmeans", "n_clusters": True}, r"n_clusters must be a whole number within \[1, 100000\] or none, got True"),
    ({"method": "kmeans", "n_clusters": 3.0}, r"n_clusters must be a whole number .*, got 3.0"),
    ({"method": "kmeans", "n_clusters": 2**70}, r"n_clusters must be a whole number within \[1, 100000\]"),
    ({"n_neighbors": 1}, r"n_neighbors must be a whole number within \[2, 1000\], got 1"),
    ({"min_coverage": float("nan")}, "min_coverage must be a finite number"),
    ({"min_coverage": 1.5}, r"min_coverage must be a finite number within \[0, 1\], got 1.5"),
    ({"return_embedding": 1}, r"return_embedding must be true or false, got 1 \(int\)"),
    ({"method": 3}, "unknown method 3"),
    # in range, but training would refuse it: five cells cannot each have ten neighbours
    ({"method": "leiden", "n_neighbors": 10}, r"n_neighbors=10 needs more cells than neighbours, and 5 cell\(s\) were sent"),
])
def test_every_param_is_checked_for_type_and_range(packaged, frame, params, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(frame.iloc[:5], params)


def test_valid_param_types_from_json_and_numpy(packaged, frame):
    out = packaged.predict(frame, {"method": "kmeans", "n_clusters": np.int64(3), "seed": 2**32 - 1,
                                   "return_embedding": np.bool_(False), "min_coverage": 1, "resolution": None})
    assert out["cluster"].nunique() == 3 and out.shape[1] == 3


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.astype(object).assign(**{f.columns[1]: [2**70] + [1] * (len(f) - 1)}),
     r"gene column '.+' holds the value 1180591620717411303424, above 9007199254740992: not a count"),
    (lambda f: f.astype(float).assign(**{f.columns[1]: 2.0**60}), "value.* above 9007199254740992"),
    (lambda f: f.assign(**{f.columns[1]: True}), "holds true/false values"),
    (lambda f: f.astype(object).assign(**{f.columns[1]: [True] + [1] * (len(f) - 1)}), "holds a true/false value"),
    # a dataframe_split row shorter than its column list arrives padded with NaN at the end
    (lambda f: f.astype(float).assign(**{c: [np.nan] + [1.0] * (len(f) - 1) for c in f.columns[-3:]}),
     r"cell .+ has 397 value\(s\) for 400 columns: every row must have one value per column"),
])
def test_input_messages_name_the_real_problem(packaged, frame, mutate, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(mutate(frame))


def test_int_float_and_partial_gene_inputs_agree(packaged, frame):
    ints = packaged.predict(frame.astype(np.int64), {"return_embedding": False})
    floats = packaged.predict(frame.astype(np.float64), {"return_embedding": False})
    pd.testing.assert_frame_equal(ints, floats)


def test_cells_per_request_limit(_trained_session, tmp_path, frame, monkeypatch):
    from contrastive_sc.serve.inference import RequestTooLarge

    package_model(_trained_session, tmp_path)
    monkeypatch.setenv("CONTRASTIVE_SC_MAX_CELLS", "100")
    model = EmbedThenCluster.from_dir(tmp_path, provider="cpu")
    assert len(model.predict(frame.iloc[:100], {"return_embedding": False})) == 100
    with pytest.raises(RequestTooLarge, match=r"holds 101 cells, over this server's limit of 100 .*contrastive_sc embed"):
        model.predict(frame.iloc[:101])
    # the batch path has no such limit
    labels = model.embed_and_cluster(frame.to_numpy(), frame.columns, {"method": "trained"}).labels
    assert len(labels) == len(frame)
    monkeypatch.setenv("CONTRASTIVE_SC_MAX_CELLS", "lots")
    with pytest.raises(ValueError, match="CONTRASTIVE_SC_MAX_CELLS must be a positive integer, got 'lots'"):
        EmbedThenCluster.from_dir(tmp_path, provider="cpu")


def test_served_requests_are_refused_over_budget_before_the_encoder(_trained_session, tmp_path, frame, monkeypatch):
    from contrastive_sc.serve.limits import OverBudget

    package_model(_trained_session, tmp_path)
    monkeypatch.setenv("CONTRASTIVE_SC_MAX_GRAPH_EDGES", "3000")
    monkeypatch.setenv("CONTRASTIVE_SC_MAX_INPUT_VALUES", "100000")
    model = EmbedThenCluster.from_dir(tmp_path, provider="cpu")
    model.encoder = None  # a refusal must come before any embedding
    with pytest.raises(OverBudget, match=r"300 cells with n_neighbors=15 builds a graph of 4,500 cells x neighbours, over "
                                         r"this server's budget of 3,000 \(CONTRASTIVE_SC_MAX_GRAPH_EDGES\)"):
        model.predict(frame.iloc[:, :200], {"method": "leiden", "n_neighbors": 15})
    with pytest.raises(OverBudget, match=r"300 cells x 400 genes = 120,000 values"):
        model.predict(frame)
    # the model's own n_neighbors (15, paper preset) counts when the request sends none
    with pytest.raises(OverBudget, match="n_neighbors=15"):
        model.predict(frame.iloc[:, :250], {"method": "auto"})


def test_isolated_clustering_matches_in_thread_and_stops_at_its_deadline(_trained_session, tmp_path, frame,
                                                                         monkeypatch):
    import time

    from contrastive_sc.serve.isolation import ServerBusy, WorkTimedOut

    package_model(_trained_session, tmp_path)
    monkeypatch.setenv("CONTRASTIVE_SC_INLINE_WORK", "0")  # every clustering in a process
    monkeypatch.setenv("CONTRASTIVE_SC_HEAVY_SLOTS", "1")
    isolated = EmbedThenCluster.from_dir(tmp_path, provider="cpu", isolate=True)
    in_thread = EmbedThenCluster.from_dir(tmp_path, provider="cpu")
    params = {"method": "leiden", "resolution": 0.5, "seed": 2, "return_embedding": False}
    pd.testing.assert_frame_equal(isolated.predict(frame, params), in_thread.predict(frame, params))
    # a request that arrived longer ago than the limit is not started
    with pytest.raises(WorkTimedOut):
        isolated.predict(frame, {"method": "leiden"}, started=time.monotonic() - isolated.limits.cluster_timeout)
    # the quick path needs no slot; clustering beyond the slots is refused at once
    with isolated.heavy_slots.hold():
        assert len(isolated.predict(frame.iloc[:2])) == 2
        with pytest.raises(ServerBusy, match=r"busy: this server worker already clusters 1 large request\(s\), its "
                                             r"limit \(CONTRASTIVE_SC_HEAVY_SLOTS\); retry in a few seconds"):
            isolated.predict(frame, {"method": "leiden"})


def test_onnxruntime_threads_follow_workers(_trained_session, tmp_path, monkeypatch):
    import os

    package_model(_trained_session, tmp_path)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("CONTRASTIVE_SC_WORKERS", str(cores * 2))
    assert EmbedThenCluster.from_dir(tmp_path, provider="cpu").encoder.threads == 1
    monkeypatch.setenv("CONTRASTIVE_SC_WORKERS", "1")
    assert EmbedThenCluster.from_dir(tmp_path, provider="cpu").encoder.threads == cores
    monkeypatch.setenv("CONTRASTIVE_SC_ONNX_THREADS", "3")
    assert EmbedThenCluster.from_dir(tmp_path, provider="cpu").encoder.threads == 3


def _corrupt_state(folder, **changes):
    import json

    path = folder / "preprocess_state.json"
    state = json.loads(path.read_text())
    for key, change in changes.items():
        state[key] = change(state[key])
    path.write_text(json.dumps(state))


def _write_info(folder, **changes):
    import json

    path = folder / "model_info.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _write_centroids(folder, centroids):
    model_id = str(np.load(folder / "training_clusters.npz")["model_id"])
    with open(folder / "training_clusters.npz", "wb") as handle:
        np.savez(handle, centroids=centroids, model_id=model_id)


CORRUPTIONS = {
    "short mean": (lambda d: _corrupt_state(d, mean=lambda v: v[:-1]),
                   r"preprocess_state.json: 'mean' has 99 values for 100 genes"),
    "zero std": (lambda d: _corrupt_state(d, std=lambda v: [0.0] + v[1:]),
                 r"preprocess_state.json: 'std' holds 1 zero or negative value"),
    "NaN std": (lambda d: _corrupt_state(d, std=lambda v: [float("nan")] + v[1:]),
                r"preprocess_state.json: 'std' holds 1 NaN/inf value"),
    "fewer genes than the encoder": (lambda d: _corrupt_state(d, genes=lambda v: v[:-1], mean=lambda v: v[:-1],
                                                              std=lambda v: v[:-1]),
                                     r"encoder.onnx: the encoder takes 100 inputs but preprocess_state.json lists 99"),
    "centroid width": (lambda d: _write_centroids(d, np.zeros((3, 59))),
                       r"training_clusters.npz: centroids have 59 dimensions but encoder.onnx embeds into 60"),
    "NaN centroids": (lambda d: _write_centroids(d, np.full((3, 60), np.nan)),
                      "training_clusters.npz: holds NaN/inf"),
    "info dims": (lambda d: _write_info(d, embedding_dim=32), r"model_info.json: 'embedding_dim' is 32 but encoder.onnx"),
    "info genes": (lambda d: _write_info(d, n_genes=7), r"model_info.json: 'n_genes' is 7"),
    "unreadable encoder": (lambda d: (d / "encoder.onnx").write_bytes(b"not onnx"), r"cannot load encoder.onnx"),
    "unreadable state": (lambda d: (d / "preprocess_state.json").write_text("{"), r"cannot load preprocess_state.json"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_loading_refuses_artifacts_that_disagree(_trained_session, tmp_path, case):
    import json

    from contrastive_sc.method.manifest import write_manifest
    from contrastive_sc.serve.inference import ArtifactError

    package_model(_trained_session, tmp_path)
    corrupt, message = CORRUPTIONS[case]
    corrupt(tmp_path)
    with pytest.raises(ArtifactError, match="does not match manifest.json"):
        EmbedThenCluster.from_dir(tmp_path, provider="cpu")  # the digests catch any change first
    # a model packaged inconsistently, its manifest written over the bad files: the checks behind it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    write_manifest(tmp_path, list(manifest["files"]), manifest["model_id"])
    with pytest.raises(ArtifactError, match=message):
        EmbedThenCluster.from_dir(tmp_path, provider="cpu")


def test_cells_without_counts_are_unassigned_with_confidence_zero(_synthetic_session, tiny_config, tmp_path):
    from contrastive_sc import ContrastiveSC

    model = ContrastiveSC(tiny_config).fit(_synthetic_session.copy(), label_key="label")
    package_model(model, tmp_path)
    served = EmbedThenCluster.from_dir(tmp_path, provider="cpu")
    frame = _synthetic_session.to_df().iloc[:6].astype(np.int64)
    frame.iloc[[1, 4]] = 0
    out = served.predict(frame, {"return_embedding": False})
    assert list(out["cell_type"].iloc[[1, 4]]) == ["unassigned"] * 2 and (out["confidence"].iloc[[1, 4]] == 0).all()
    assert (out["cluster"].iloc[[1, 4]] == -1).all() and (out["cluster"].drop(index=[1, 4]) >= 0).all()
    assert (out["cell_type"].drop(index=[1, 4]) != "unassigned").any()
    with pytest.raises(ValueError, match="every one of the 3 cell\\(s\\) has zero counts over the model's genes"):
        served.predict(frame.iloc[:3] * 0)
    adata = _synthetic_session[:6].copy()
    adata.X[[1, 4]] = 0
    named = model.annotate(adata, copy=True).obs
    assert list(named["contrastive_cell_type"].iloc[[1, 4]]) == ["unassigned"] * 2
    assert (named["contrastive_cell_type_confidence"].iloc[[1, 4]] == 0).all()
