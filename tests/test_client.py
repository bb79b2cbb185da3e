"""serving/client.py in process: body format, chunking, gene selection and the server's errors.

A small HTTP server in a thread stands in for `mlflow models serve`: it parses the three body
formats as MLflow's scoring server does and answers with the packaged model's predictions, and
it records what each request carried. tests/test_serving.py runs the client against the real
server once (test_client_sends_only_the_model_genes).
"""

import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
try:
    import client
finally:
    sys.path.pop(0)


class _Scorer(BaseHTTPRequestHandler):
    model = None
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        content_type = self.headers["Content-Type"]
        params = None
        if content_type == "application/json":
            payload = json.loads(body)
            split = payload["dataframe_split"]
            frame = pd.DataFrame(split["data"], index=split["index"], columns=split["columns"])
            params = payload.get("params")
        elif content_type == "text/csv":
            frame = pd.read_csv(io.BytesIO(body))
        else:
            frame = pd.read_parquet(io.BytesIO(body))
        type(self).requests.append({"content_type": content_type, "rows": len(frame), "params": params,
                                    "columns": list(map(str, frame.columns))})
        try:
            answer, status = {"predictions": self.model.predict(frame, params).to_dict(orient="records")}, 200
        except ValueError as error:
            answer, status = {"error_code": "BAD_REQUEST", "message": str(error)}, 400
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(packaged):
    _Scorer.model = packaged
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def sent(server):
    _Scorer.requests = []
    return _Scorer.requests


@pytest.fixture
def counts(synthetic):
    frame = synthetic.to_df().astype(np.int64)
    return frame.set_axis([f"cell_{i}" for i in range(len(frame))])


@pytest.mark.parametrize("params,fmt,expected", [
    ({"method": "trained"}, "auto", "parquet-long"),
    ({}, "auto", "parquet-long"),
    ({"seed": 0, "min_coverage": 0.5}, "auto", "parquet-long"),  # PredictParams' defaults
    ({"seed": 1}, "auto", "json"),
    ({"method": "trained", "return_embedding": True, "n_clusters": 0}, "auto", "parquet-long"),
    ({"method": "kmeans", "n_clusters": 3}, "auto", "json"),
    ({"return_embedding": False}, "auto", "json"),
    ({"resolution": 0.5}, "auto", "json"),
    ({"method": "trained"}, "csv", "csv"),
    ({"method": "leiden"}, "json", "json"),
])
def test_request_format(params, fmt, expected):
    assert client.request_format(params, fmt) == expected


def test_a_body_without_params_is_refused_for_non_default_params():
    with pytest.raises(ValueError, match="parquet requests carry no params; use --format json"):
        client.request_format({"method": "kmeans", "n_clusters": 3}, "parquet")


def test_frame_payload_split_and_records():
    frame = pd.DataFrame({"g1": [1, 0], "g2": [3, 4]}, index=["a", "b"])
    split = client.frame_payload(frame, {"method": "trained"})
    assert split == {"dataframe_split": {"index": ["a", "b"], "columns": ["g1", "g2"], "data": [[1, 3], [0, 4]]},
                     "params": {"method": "trained"}}
    records = client.frame_payload(frame, {}, orient="records")
    assert records == {"dataframe_records": [{"g1": 1, "g2": 3}, {"g1": 0, "g2": 4}], "params": {}}


@pytest.mark.parametrize("fmt", ["auto", "json", "csv", "parquet", "csv-long"])
def test_reference_requests_go_in_chunks_and_answer_every_cell_in_order(server, sent, counts, packaged, fmt):
    params = {"method": "trained"} if fmt != "json" else {"method": "trained", "return_embedding": False}
    result = client.cluster_dataset(server, counts, params, chunk_size=120, fmt=fmt)
    assert len(sent) == 3  # 300 cells in chunks of 120
    assert result["cell"].tolist() == counts.index.tolist()
    expected = packaged.predict(counts, {"return_embedding": False})
    np.testing.assert_array_equal(result["cluster"].to_numpy(), expected["cluster"].to_numpy())
    content = {"auto": "application/vnd.apache.parquet", "json": "application/json", "csv": "text/csv",
               "parquet": "application/vnd.apache.parquet", "csv-long": "text/csv"}[fmt]
    assert {r["content_type"] for r in sent} == {content}
    if fmt in ("auto", "csv-long"):
        assert all(r["columns"] == ["cell", "gene", "count"] for r in sent)  # the long form


def test_kmeans_sends_every_cell_in_one_json_request(server, sent, counts):
    result = client.cluster_dataset(server, counts, {"method": "kmeans", "n_clusters": 3, "return_embedding": False},
                                    chunk_size=50)
    assert [(r["content_type"], r["rows"]) for r in sent] == [("application/json", 300)]
    assert sent[0]["params"] == {"method": "kmeans", "n_clusters": 3, "return_embedding": False}
    assert result["cluster"].nunique() == 3 and len(result) == 300


def test_the_servers_message_is_raised(server, sent, counts):
    with pytest.raises(RuntimeError, match=r"server answered 400: only 0 of the model's \d+ genes are in the input"):
        client.cluster_dataset(server, counts.set_axis([f"other_{g}" for g in counts.columns], axis=1),
                               {"method": "kmeans", "n_clusters": 3})


def test_model_genes_from_a_state_file_or_a_list(tmp_path, packaged):
    genes = list(packaged.state.genes)
    state = tmp_path / "preprocess_state.json"
    state.write_text(json.dumps({"genes": genes}))
    listed = tmp_path / "genes.txt"
    listed.write_text("\n".join(genes) + "\n\n")
    assert client.model_genes(genes_file=str(state)) == genes == client.model_genes(genes_file=str(listed))
    assert client.model_genes() is None


def test_select_genes_keeps_the_model_genes_or_says_none_match(counts):
    genes = list(counts.columns[:5]) + ["not_in_data"]
    assert list(client.select_genes(counts, genes).columns) == list(counts.columns[:5])
    assert client.select_genes(counts, None) is counts
    with pytest.raises(ValueError, match="none of the model's 2 genes"):
        client.select_genes(counts, ["x", "y"])


def test_main_writes_a_csv_of_clusters(server, sent, synthetic, packaged, tmp_path, capsys):
    synthetic.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "genes.txt").write_text("\n".join(packaged.state.genes))
    code = client.main(["--url", server, "--data", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "c.csv"),
                        "--genes", str(tmp_path / "genes.txt"), "--chunk-size", "200"])
    assert code == 0
    rows = pd.read_csv(tmp_path / "c.csv")
    assert list(rows.columns) == ["cell", "cluster", "gene_coverage"] and len(rows) == 300
    assert rows["gene_coverage"].eq(1.0).all()
    # Two chunks of long parquet: the default for plain reference requests.
    assert len(sent) == 2 and {r["content_type"] for r in sent} == {"application/vnd.apache.parquet"}
    assert "300 cells clustered (trained)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def annotated_server(_synthetic_session, tiny_config, tmp_path_factory):
    from contrastive_sc import ContrastiveSC
    from contrastive_sc.serve.inference import EmbedThenCluster, package_model

    model = ContrastiveSC(tiny_config).fit(_synthetic_session.copy(), label_key="label")
    folder = package_model(model, tmp_path_factory.mktemp("annotated"))
    previous, _Scorer.model = _Scorer.model, EmbedThenCluster.from_dir(Path(folder["state"]).parent, provider="cpu")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", model
    httpd.shutdown()
    _Scorer.model = previous


@pytest.mark.parametrize("suffix", [".csv", ".h5ad"])
def test_main_writes_cell_types_and_confidence_and_prints_them(annotated_server, synthetic, tmp_path, capsys, suffix):
    import anndata as ad
    import scanpy as sc

    url, model = annotated_server
    data = synthetic.copy()
    data.layers["counts"] = data.X.copy()
    sc.pp.normalize_total(data)
    sc.pp.log1p(data)  # X log-normalised: the counts are in a layer
    data.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / f"named{suffix}"
    code = client.main(["--url", url, "--data", str(tmp_path / "cells.h5ad"), "--layer", "counts", "--out", str(out)])
    assert code == 0
    if suffix == ".csv":
        rows = pd.read_csv(out)
        types, confidence = rows["cell_type"].astype(str), rows["confidence"]
    else:
        written = ad.read_h5ad(out)
        types, confidence = written.obs["cell_type"].astype(str), written.obs["confidence"]
    expected = model.annotate(synthetic.copy(), copy=True).obs["contrastive_cell_type"].astype(str).to_numpy()
    np.testing.assert_array_equal(types.to_numpy(), expected)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    printed = capsys.readouterr().out
    assert "cell types: " in printed and "unassigned: " in printed


def test_main_errors_are_one_line(server, tmp_path, capsys):
    code = client.main(["--url", server, "--data", str(tmp_path / "absent.h5ad"), "--out", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1 and "does not exist" in err
    refused = client.main(["--url", server, "--data", "simulated", "--out", str(tmp_path / "c.csv"),
                           "--method", "kmeans", "--max-cells", "50"])
    err = capsys.readouterr().err
    assert refused == 2 and err.startswith("Error: server answered 400: ") and "n_clusters" in err
