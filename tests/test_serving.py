"""A real `mlflow models serve` process on 127.0.0.1 answering real HTTP requests."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contrastive_sc.analysis.cluster import cluster_labels
from tests.conftest import shared_file

REPO = Path(__file__).resolve().parents[1]
MAX_CELLS = 250
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`serving/serve.sh MODEL_URI PORT` in a subprocess, stopped at teardown."""

    def __init__(self, model_uri: str, tracking_uri: str, log: Path, env: dict | None = None,
                 ready_s: float = 180) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri,
                            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})
        self.log = log
        self.process = subprocess.Popen(["bash", str(REPO / "serving" / "serve.sh"), model_uri, str(self.port)],
                                        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}: {log.read_text()[-3000:]}")
            if self.ping() == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {ready_s:.0f} s: {log.read_text()[-3000:]}")

    def ping(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                return response.status
        except (urllib.error.URLError, OSError):
            return None

    def post(self, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=data, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read() or b"{}"
            try:
                return error.code, json.loads(text)
            except json.JSONDecodeError:
                return error.code, {"message": text.decode(errors="replace")}

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(_store_with_runs, tmp_path_factory, _synthetic_session):
    import mlflow

    from contrastive_sc.mlops import registry

    folder = tmp_path_factory.mktemp("served")
    db, runs = _store_with_runs
    shutil.copyfile(db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    registry.register_run(runs[0]["run_id"], "served")
    registry.promote("served")
    mlflow.set_tracking_uri(None)
    # A limit below the 300 test cells, so that one test can send an oversized request.
    server = Server("models:/served@champion", uri, folder / "server.log", env={"CONTRASTIVE_SC_MAX_CELLS": str(MAX_CELLS)})
    yield server, _synthetic_session.to_df()
    server.stop()


def _split(frame, params=None):
    body = {"dataframe_split": {"index": list(map(str, frame.index)), "columns": list(map(str, frame.columns)),
                                "data": frame.to_numpy().tolist()}}
    return body | ({"params": params} if params is not None else {})


def test_valid_requests_in_two_json_formats_and_each_method(served):
    server, frame = served
    cells = frame.iloc[:40]
    status, body = server.post(_split(cells, {"method": "trained"}))
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    assert len(rows) == 40 and list(rows["cell"]) == list(cells.index) and "emb_59" in rows

    records = {"dataframe_records": cells.to_dict(orient="records"),
               "params": {"method": "kmeans", "n_clusters": 3, "return_embedding": False}}
    status, body = server.post(records)
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    # the model was trained with labels: it names each cell, with a confidence
    assert list(rows.columns) == ["cell", "cluster", "gene_coverage", "cell_type", "confidence"]
    assert rows["cluster"].nunique() == 3
    assert set(rows["cell_type"]) <= {"0", "1", "2", "unassigned"} and rows["confidence"].between(0, 1).all()
    status, body = server.post(_split(cells, {"min_confidence": 0.0, "return_embedding": False}))
    assert status == 200 and "unassigned" not in {r["cell_type"] for r in body["predictions"]}
    status, body = server.post(_split(cells, {"min_confidence": 1.5}))
    assert status == 400 and "min_confidence must be a finite number within [0, 1], got 1.5" in body["message"]

    status, body = server.post(_split(cells, {"method": "leiden", "resolution": 0.8, "seed": 3}))
    assert status == 200, body
    assert len(body["predictions"]) == 40

    status, body = server.post(_split(cells, {"method": "auto"}))
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    # KMeans at the k estimated on the model's graph (the paper preset's 15 neighbours)
    expected = cluster_labels(rows.filter(like="emb_").to_numpy(), "auto", n_neighbors=15, seed=0)
    np.testing.assert_array_equal(rows["cluster"].to_numpy(), expected)


def test_reference_labels_match_in_process_and_across_batches(served):
    server, frame = served
    frame = frame.iloc[:MAX_CELLS]
    whole = pd.DataFrame(server.post(_split(frame, {"return_embedding": False}))[1]["predictions"])
    halves = [pd.DataFrame(server.post(_split(part, {"return_embedding": False}))[1]["predictions"])
              for part in (frame.iloc[:150], frame.iloc[150:])]
    np.testing.assert_array_equal(whole["cluster"], pd.concat(halves)["cluster"])


def test_tensor_form(served):
    server, frame = served
    status, _ = server.post({"inputs": frame.iloc[:3].to_numpy().tolist()})
    assert status == 400  # 400 genes are not the model's 100 in order
    genes = _model_genes(server)
    status, body = server.post({"inputs": frame[genes].iloc[:5].to_numpy().tolist(), "params": {"method": "trained"}})
    assert status == 200, body
    assert len(body["predictions"]) == 5


def _model_genes(server):
    # The model's genes, in order, from the preprocessing state logged with its run.
    from contrastive_sc.method.preprocess import PreprocessState

    state = server.log.parent / "state.json"
    if not state.exists():
        import mlflow

        from contrastive_sc.mlops.registry import run_of

        mlflow.set_tracking_uri(f"sqlite:///{server.log.parent / 'mlflow.db'}")
        path = mlflow.artifacts.download_artifacts(run_id=run_of("models:/served@champion"),
                                                   artifact_path="torch_model/preprocess_state.json")
        mlflow.set_tracking_uri(None)
        shutil.copyfile(path, state)
    return list(PreprocessState.from_json(state).genes)


BAD_REQUESTS = {
    "too few genes": (lambda f: _split(f.iloc[:5, :30]), "of the model's 100 genes are in the input"),
    "duplicated genes": (lambda f: _split(pd.concat([f.iloc[:5], f.iloc[:5, :2]], axis=1)), "duplicated gene column"),
    "NaN": (lambda f: _split(f.iloc[:5].astype(float).mask(f.iloc[:5] > 3)), "missing (null/NaN) value"),
    "negative": (lambda f: _split(f.iloc[:5] * -1 - 1), "negative value"),
    "non-numeric": (lambda f: _split(f.iloc[:5].astype(str).replace("0", "zero")), "non-numeric value"),
    "empty": (lambda f: _split(f.iloc[:0]), "empty input"),
    "fewer cells than clusters": (lambda f: _split(f.iloc[:2], {"method": "kmeans", "n_clusters": 5}),
                                  "only 2 cell(s) were sent"),
    "unknown method": (lambda f: _split(f.iloc[:5], {"method": "dbscan"}), "unknown method 'dbscan'"),
    "kmeans without k": (lambda f: _split(f.iloc[:5], {"method": "kmeans"}), "needs n_clusters"),
    "not json": (lambda f: b"{not json", ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_message_and_server_keeps_serving(served, case):
    server, frame = served
    make, message = BAD_REQUESTS[case]
    status, body = server.post(make(frame))
    assert 400 <= status < 500, (status, body)
    assert message in body.get("message", ""), body
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
    assert server.ping() == 200
    status, _ = server.post(_split(frame.iloc[:3]))
    assert status == 200


def _ragged(frame):
    body = _split(frame.iloc[:5])
    body["dataframe_split"]["data"][2] = body["dataframe_split"]["data"][2][:-3]
    return body


def _huge_value(frame):
    body = _split(frame.iloc[:5])
    body["dataframe_split"]["data"][1][4] = 2**70
    return body


def _bool_counts(frame):
    body = _split(frame.iloc[:5])
    body["dataframe_split"]["data"] = [[v > 0 for v in row] for row in body["dataframe_split"]["data"]]
    return body


# Each case: request body, then a text the 400 answer must hold.
REFUSED = {
    "misspelled method": (lambda f: _split(f.iloc[:5], {"methd": "kmeans"}), "unknown parameter(s) ['methd']"),
    "misspelled n_clusters": (lambda f: _split(f.iloc[:5], {"method": "kmeans", "n_cluster": 2}),
                              "unknown parameter(s) ['n_cluster']; the known parameters are ['method', "
                              "'min_confidence', 'min_coverage', "
                              "'n_clusters', 'n_neighbors', 'resolution', 'return_embedding', 'seed']"),
    "misspelled resolution": (lambda f: _split(f.iloc[:5], {"method": "leiden", "resolutoin": 2.0}),
                              "unknown parameter(s) ['resolutoin']"),
    "NaN resolution": (lambda f: _split(f.iloc[:5], {"method": "leiden", "resolution": float("nan")}),
                       "resolution must be a finite number"),
    "inf resolution": (lambda f: _split(f.iloc[:5], {"method": "leiden", "resolution": float("inf")}),
                       "resolution must be a finite number"),
    "huge seed": (lambda f: _split(f.iloc[:20], {"method": "leiden", "seed": 2**63}),
                  "seed must be a whole number within [0, 4294967295]"),
    "boolean n_clusters": (lambda f: _split(f.iloc[:5], {"method": "kmeans", "n_clusters": True}),
                           "Can not safely convert `<class 'bool'>` to `DataType.long`"),
    "huge n_clusters": (lambda f: _split(f.iloc[:5], {"method": "kmeans", "n_clusters": 2**70}),
                        "n_clusters must be a whole number within [1, 100000] or none"),
    "2**70 count": (_huge_value, "holds the value 1180591620717411303424, above 9007199254740992: not a count"),
    "ragged rows": (_ragged, "has 397 value(s) for 400 columns: every row must have one value per column"),
    "boolean counts": (_bool_counts, "holds true/false values"),
    "too many cells": (lambda f: _split(f), f"holds 300 cells, over this server's limit of {MAX_CELLS} per request"),
}


def test_bad_params_and_values_get_400_naming_the_problem_without_traceback_or_paths(served):
    server, frame = served
    secrets = [str(REPO), sys.prefix, str(server.log.parent), "site-packages", "Traceback", ".py\"", 'File "']
    answers = {}
    for case, (make, message) in REFUSED.items():
        status, body = server.post(make(frame))
        answers[case] = (status, body.get("message", ""))
        assert status == 400, (case, status, body)
        assert message in body.get("message", ""), (case, body)
        text = json.dumps(body)
        assert not [s for s in secrets if s in text], (case, text[:2000])
        assert "stack_trace" not in body, case
    # MLflow parses CSV and parquet bodies itself, before the model: its errors must not carry tracebacks either.
    for content_type in ("text/csv", "application/vnd.apache.parquet"):
        status, body = server.post(b'a,b\n1,"2\n', content_type=content_type)
        assert status == 400 and "Failed to parse input" in body.get("message", ""), body
        assert "stack_trace" not in body and not [s for s in secrets if s in json.dumps(body)], body
    assert server.ping() == 200
    status, body = server.post(_split(frame.iloc[:MAX_CELLS], {"return_embedding": False}))
    assert status == 200 and len(body["predictions"]) == MAX_CELLS


def test_a_request_without_content_type_gets_415_naming_the_accepted_types(served):
    import http.client

    server, frame = served
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        # http.client adds no Content-Type of its own (urllib would send a form type)
        connection.request("POST", "/invocations", body=json.dumps(_split(frame.iloc[:2])).encode())
        answer = connection.getresponse()
        status, body = answer.status, json.loads(answer.read())
    finally:
        connection.close()
    assert status == 415, body
    assert body["message"] == ("the request has no Content-Type header; send one of application/json, text/csv, "
                               "application/vnd.apache.parquet (only JSON carries params)")
    status, body = server.post(b"a,b\n1,2\n", content_type="text/tab-separated-values")
    assert status == 415 and "unsupported Content-Type 'text/tab-separated-values'; send one of application/json" \
        in body["message"]


def test_error_answers_are_one_line_and_never_repeat_the_request(served):
    """MLflow quotes the whole body after a JSON or UTF-8 error and writes 'Failed to predict data
    <the table>' for a param its schema refuses; the model answers each in one line of its own."""
    server, frame = served
    cells = frame.iloc[:3].rename(index=lambda c: f"SECRETCELL{c}", columns=lambda g: f"SECRETGENE{g}"
                                  if g == frame.columns[0] else g)
    split = _split(cells)
    cases = {
        "not JSON": (json.dumps(split).encode()[:-40] + b" SECRET", "application/json", "the body is not valid JSON"),
        "not UTF-8 JSON": (json.dumps(split).encode().replace(b"SECRETCELL", b"SECRET\xffCELL"), "application/json",
                           "the body is not UTF-8 text (invalid start byte at byte"),
        "not UTF-8 CSV": (cells.to_csv().encode().replace(b"SECRETGENE", b"SECRET\xffGENE"), "text/csv",
                          "the body is not UTF-8 text"),
        "boolean param": (json.dumps(_split(cells, {"method": "kmeans", "n_clusters": True})).encode(),
                          "application/json", "Can not safely convert `<class 'bool'>` to `DataType.long`"),
        "text param": (json.dumps(_split(cells, {"method": "leiden", "resolution": "high"})).encode(),
                       "application/json", "Can not safely convert `<class 'str'>` to `DataType.double`"),
        "bad params object": (json.dumps(split | {"params": ["SECRET"]}).encode(), "application/json", ""),
        "too few genes": (json.dumps(_split(cells.iloc[:, :30])).encode(), "application/json",
                          "of the model's 100 genes are in the input"),
    }
    for case, (body, content_type, message) in cases.items():
        status, answer = server.post(body, content_type=content_type)
        assert 400 <= status < 500, (case, status, answer)
        text = answer.get("message", "")
        assert message in text, (case, answer)
        assert "\n" not in text and "SECRET" not in json.dumps(answer), (case, answer)
        assert "Failed to predict data" not in text and "stack_trace" not in answer, (case, answer)


def test_client_sends_only_the_model_genes(served, tmp_path):
    server, frame = served
    genes = _model_genes(server)
    (tmp_path / "genes.txt").write_text("\n".join(genes))
    adata = __import__("anndata").AnnData(frame.iloc[:40].astype(np.float32))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    sys.path.insert(0, str(REPO / "serving"))
    try:
        import client
    finally:
        sys.path.remove(str(REPO / "serving"))
    sent = client.select_genes(frame, client.model_genes(genes_file=str(tmp_path / "genes.txt")))
    assert sorted(sent.columns) == sorted(genes) and frame.shape[1] == 400
    out = subprocess.run([sys.executable, str(REPO / "serving" / "client.py"), "--url", server.url, "--data",
                          str(tmp_path / "cells.h5ad"), "--genes", str(tmp_path / "genes.txt"), "--out",
                          str(tmp_path / "clusters.csv")], capture_output=True, text=True, env=os.environ | {
                              "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "clusters.csv")
    assert len(rows) == 40 and rows["gene_coverage"].eq(1.0).all()


def test_a_model_whose_artifacts_disagree_never_becomes_healthy(served, tmp_path):
    """Centroids replaced after logging: the server stops without answering /ping and its log names the file.

    One worker: exits non-zero. Two workers: uvicorn's supervisor stops (exit code 0, its choice)
    instead of restarting the workers forever, because the model exits with uvicorn's startup-failure code.
    """
    import mlflow

    server, _ = served
    mlflow.set_tracking_uri(f"sqlite:///{server.log.parent / 'mlflow.db'}")
    try:
        folder = Path(mlflow.artifacts.download_artifacts("models:/served@champion", dst_path=str(tmp_path / "m")))
    finally:
        mlflow.set_tracking_uri(None)
    with open(folder / "artifacts" / "training_clusters.npz", "wb") as handle:  # tampered: centroids replaced
        np.savez(handle, centroids=np.zeros((3, 7), dtype=np.float32), model_id="someone else's")
    for workers in (1, 2):
        log = tmp_path / f"bad{workers}.log"
        with pytest.raises(RuntimeError, match="server exited with code") as error:
            Server(str(folder), f"sqlite:///{tmp_path / 'none.db'}", log, env={"CONTRASTIVE_SC_WORKERS": str(workers)},
                   ready_s=120)
        text = log.read_text()
        assert "refusing to serve this model: training_clusters.npz does not match manifest.json" in text, text[-3000:]
        if workers == 1:
            assert "server exited with code 0" not in str(error.value)
        else:
            assert "failed to start, stopping the parent process" in text


@pytest.mark.serving_env
def test_the_model_serves_from_its_own_environment(served, tmp_path):
    """`mlflow models serve --env-manager virtualenv` (or uv): a fresh venv from the pinned requirements.txt.

    Builds the environment once (~2.5 min and 1.2 GB here: mlflow, numpy, onnxruntime, numba, ...;
    MLFLOW_ENV_ROOT keeps it between runs) and serves from it, so the model's requirements are
    known to be complete and installable, not only the developer's environment.
    """
    if shutil.which("uv"):
        manager = "uv"
    elif shutil.which("pyenv"):
        manager = "virtualenv"
    else:
        pytest.skip("neither uv nor pyenv is on PATH: mlflow cannot build the model's own environment")
    server, frame = served
    env_root = os.environ.get("MLFLOW_ENV_ROOT") or str(tmp_path / "envs")
    own = Server("models:/served@champion", f"sqlite:///{server.log.parent / 'mlflow.db'}", tmp_path / "own.log",
                 env={"CONTRASTIVE_SC_ENV_MANAGER": manager, "MLFLOW_ENV_ROOT": env_root,
                      # serve.sh is quiet by default: the command it runs is an INFO line
                      "MLFLOW_LOGGING_LEVEL": "INFO"}, ready_s=900)
    try:
        status, body = own.post(_split(frame.iloc[:20], {"method": "kmeans", "n_clusters": 3, "return_embedding": False}))
        assert status == 200, body
        assert pd.DataFrame(body["predictions"])["cluster"].nunique() == 3
        status, body = own.post(_split(frame.iloc[:5], {"n_cluster": 3}))
        assert status == 400 and "unknown parameter(s) ['n_cluster']" in body["message"]
    finally:
        own.stop()
    log = (tmp_path / "own.log").read_text()
    assert f"source {env_root}" in log and "&& exec uvicorn" in log, log[-3000:]
    site = next(Path(env_root).glob("mlflow-*/lib/python*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"onnxruntime", "igraph", "pynndescent", "scikit_learn"} <= installed
    assert "torch" not in installed and "leidenalg" not in installed


@pytest.mark.realdata
def test_real_dataset_over_http_matches_in_process(tmp_path, _template_store):
    """Clustering PBMC over HTTP: `reference` labels identical, `kmeans` ARI within 0.01."""
    import mlflow
    from sklearn.metrics import adjusted_rand_score

    from contrastive_sc import get_preset, read
    from contrastive_sc.mlops import registry, tracking

    adata = read(shared_file("10X_PBMC_top2000.h5"))
    shutil.copyfile(_template_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.setup(uri, "pbmc")
    result = tracking.train_run(adata, get_preset("paper"), label_key="label", map_plot=False)
    registry.register_run(result["run_id"], "pbmc")
    registry.promote("pbmc")
    in_process = mlflow.pyfunc.load_model("models:/pbmc@champion")
    frame = adata.to_df().astype(np.int64)
    local_ref = in_process.predict(frame, params={"return_embedding": False})
    local_km = in_process.predict(frame, params={"method": "kmeans", "n_clusters": 8, "return_embedding": False})
    mlflow.set_tracking_uri(None)

    server = Server("models:/pbmc@champion", uri, tmp_path / "server.log")
    try:
        remote_ref = pd.concat([pd.DataFrame(server.post(_split(frame.iloc[i:i + 1000], {"return_embedding": False}))[1]
                                             ["predictions"]) for i in range(0, len(frame), 1000)], ignore_index=True)
        status, body = server.post(_split(frame, {"method": "kmeans", "n_clusters": 8, "return_embedding": False}))
        assert status == 200
        remote_km = pd.DataFrame(body["predictions"])
    finally:
        server.stop()
    np.testing.assert_array_equal(remote_ref["cluster"].to_numpy(), local_ref["cluster"].to_numpy())
    truth = adata.obs["label"].to_numpy()
    ari_local = adjusted_rand_score(truth, local_km["cluster"])
    ari_remote = adjusted_rand_score(truth, remote_km["cluster"])
    assert abs(ari_local - ari_remote) <= 0.01
    assert ari_remote > 0.5
