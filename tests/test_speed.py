"""The fast serving path gives what the straightforward float64 computation gives; the benchmark's helpers."""

import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from contrastive_sc.method.preprocess import transform
from contrastive_sc.method.validation import check_count_values

MODEL_FILE = Path(__file__).resolve().parents[1] / "models" / "contrastive_sc_model.py"


def float64_transform(counts, gene_names, state) -> np.ndarray:
    """The preprocessing written out plainly in float64, one model gene at a time."""
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    counts = counts.astype(np.float64)
    column = {str(g): j for j, g in enumerate(gene_names)}
    lib = [(column[g], s) for g, s in zip(state.library_genes, state.library_share) if g in column]
    totals = counts[:, [j for j, _ in lib]].sum(axis=1) / sum(s for _, s in lib)
    scale = np.where(totals > 0, state.target_sum / np.where(totals > 0, totals, 1), 0.0)
    out = np.zeros((counts.shape[0], state.n_genes))
    for i, gene in enumerate(state.genes):
        if gene in column:
            out[:, i] = (np.log1p(counts[:, column[gene]] * scale) - state.mean[i]) / state.std[i]
    return out


@pytest.fixture
def frame(synthetic):
    return synthetic.to_df().astype(np.int64)


def _layouts(frame: pd.DataFrame, state):
    """The same cells as the inputs the fast path treats differently."""
    genes = list(state.genes)
    shuffled = frame[frame.columns[::-1]]
    partial = frame[[g for g in frame.columns if g not in genes[:5]]]
    extra = frame.assign(not_a_model_gene=3)
    return {"int64": frame, "float32": frame.astype(np.float32), "model genes in order": frame[genes],
            "shuffled": shuffled, "partial": partial, "extra gene": extra}


@pytest.mark.parametrize("layout", ["int64", "float32", "model genes in order", "shuffled", "partial", "extra gene"])
@pytest.mark.parametrize("sparse", [False, True])
def test_transform_matches_float64(packaged, frame, layout, sparse):
    data = _layouts(frame, packaged.state)[layout]
    counts = sp.csr_matrix(data.to_numpy()) if sparse else data.to_numpy()
    got = transform(counts, data.columns, packaged.state)
    assert got.dtype == np.float32 and got.shape == (len(data), packaged.state.n_genes)
    np.testing.assert_allclose(got, float64_transform(counts, data.columns, packaged.state), atol=1e-4, rtol=1e-5)


def test_transform_clips_and_keeps_zero_cells(packaged, frame):
    from dataclasses import replace

    data = frame.copy()
    data.iloc[0] = 0  # a cell with no counts is scaled by 0, not divided by 0
    state = replace(packaged.state, clip=1.5)
    got = transform(data.to_numpy(), data.columns, state)
    expected = np.clip(float64_transform(data.to_numpy(), data.columns, state), -1.5, 1.5)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("layout", ["int64", "float32", "shuffled", "partial", "extra gene"])
def test_predict_matches_float64(packaged, frame, layout):
    data = _layouts(frame, packaged.state)[layout]
    out = packaged.predict(data, {"method": "trained"})
    embedding = packaged.encoder(float64_transform(data.to_numpy(), data.columns, packaged.state))
    distance = ((embedding[:, None, :] - packaged.centroids[None, :, :]) ** 2).sum(axis=2)
    emb = out[[c for c in out.columns if c.startswith("emb_")]].to_numpy()
    np.testing.assert_allclose(emb, embedding, atol=1e-4)
    # A label may only differ where two centroids are equally near within float error.
    second, first = np.sort(distance, axis=1)[:, 1], distance.min(axis=1)
    differs = out["cluster"].to_numpy() != distance.argmin(axis=1)
    assert not (differs & (second - first > 1e-4)).any()
    assert list(out["cell"]) == [str(i) for i in data.index]


@pytest.mark.parametrize("values", [
    np.array([[0, 1], [2, 3]], dtype=np.int64),
    np.array([[0, 1], [2, 3]], dtype=np.uint16),
    np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32),
    np.array([[0.0, 1.0 + 1e-9], [2.0, 3.0]]),  # within the 1e-6 tolerance of an integer
    np.array([[0.0, 2.0**53]]),
])
def test_count_check_accepts_counts(values):
    check_count_values(values, what="input")


@pytest.mark.parametrize(("values", "message"), [
    (np.array([[0.0, np.nan]]), "1 missing"),
    (np.array([[0.0, np.inf]]), "1 infinite"),
    (np.array([[0, -1]]), "1 negative value(s) (min -1)"),
    (np.array([[0.0, 2.0**54]]), "above"),
    (np.array([[0.5, 1.0]], dtype=np.float32), "1 non-integer value(s) (e.g. 0.5)"),
    (np.array([[1.0, 2.5]]), "first at"),
])
def test_count_check_messages_unchanged(values, message):
    with pytest.raises(ValueError) as error:
        check_count_values(values, what="input", rows=["c0"], columns=["g0", "g1"])
    if message == "first at":
        assert "non-integer" in str(error.value)
    else:
        assert message in str(error.value)


@pytest.fixture(scope="module")
def model_module():
    spec = importlib.util.spec_from_file_location("contrastive_sc_model_under_test", MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_json_answers_hold_mlflows_values(model_module, packaged, frame):
    from mlflow.pyfunc import scoring_server

    out = packaged.predict(frame, {"method": "trained"})
    out["cell"] = [f"cell/{i} \"é\"" for i in range(len(out))]  # characters JSON escapes
    original = scoring_server.predictions_to_json
    expected = io.StringIO()
    original(out, expected)
    try:
        assert model_module.fast_json_responses()
        assert model_module.fast_json_responses()  # installing twice wraps once
        got, other = io.StringIO(), io.StringIO()
        scoring_server.predictions_to_json(out, got)
        scoring_server.predictions_to_json(np.arange(3), other)  # not a table: json.dumps
    finally:
        scoring_server.predictions_to_json = original
    want, have = json.loads(expected.getvalue())["predictions"], json.loads(got.getvalue())["predictions"]
    assert json.loads(other.getvalue()) == {"predictions": [0, 1, 2]}
    assert pd.DataFrame(have).columns.tolist() == pd.DataFrame(want).columns.tolist() == out.columns.tolist()
    for key in ("cell", "cluster"):
        assert [row[key] for row in have] == [row[key] for row in want]
    np.testing.assert_allclose(pd.DataFrame(have).drop(columns="cell").to_numpy(dtype=float),
                               pd.DataFrame(want).drop(columns="cell").to_numpy(dtype=float), rtol=0, atol=1e-14)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_binary_request_bodies_read_back(frame, fmt):
    from mlflow.pyfunc import scoring_server

    from contrastive_sc.benchmarks.speed import request_body

    body = request_body(frame, fmt)
    parsed = (scoring_server.parse_csv_input(io.StringIO(body.decode())) if fmt == "csv"
              else scoring_server.parse_parquet_input(io.BytesIO(body)))
    np.testing.assert_array_equal(parsed.to_numpy(), frame.to_numpy())
    assert list(parsed.columns) == list(frame.columns)
    with pytest.raises(ValueError, match="cannot carry params"):
        request_body(frame, fmt, {"method": "kmeans"})


def test_ratios_name_targets():
    from contrastive_sc.benchmarks.speed import markdown, ratios

    table = pd.DataFrame({"path": ["onnxruntime encoder", "in-process predict", "in-process predict, 500-cell calls",
                                   "HTTP csv", "HTTP csv, 8 clients"],
                          "cells": [1000, 1000, 1000, 1000, 4000], "requests": [1, 1, 2, 2, 8],
                          "seconds": [0.01, 0.05, 0.1, 0.5, 2.0],
                          "p50_ms": [np.nan, np.nan, np.nan, 250, 500], "p95_ms": [np.nan, np.nan, np.nan, 260, 600]})
    table["cells_per_s"] = table["cells"] / table["seconds"]
    table.attrs["ratios"] = got = ratios(table, "csv", 8)
    values = dict(zip(got["ratio"], got["value"]))
    assert values["in-process predict / encoder"] == pytest.approx(0.2)
    assert values["HTTP csv / in-process 500"] == pytest.approx(0.2)
    assert values["8-client p95 / single-request p50 latency"] == pytest.approx(600 / 250)
    assert "| HTTP csv / in-process 500 | 0.200 | >= 0.25 | no |" in markdown(table)


def test_embedding_at_size_keeps_the_cells_and_stays_between_them():
    from contrastive_sc.benchmarks.speed import embedding_at_size

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    grown = embedding_at_size(x, 500, seed=1)
    assert grown.shape == (500, 4) and grown.dtype == np.float32
    np.testing.assert_array_equal(grown[:50], x)
    assert (grown.min(axis=0) >= x.min(axis=0) - 1e-6).all() and (grown.max(axis=0) <= x.max(axis=0) + 1e-6).all()
    np.testing.assert_array_equal(embedding_at_size(x, 20), x[:20])


def test_leiden_rows_time_igraph_against_leidenalg():
    from sklearn.datasets import make_blobs

    from contrastive_sc.benchmarks.speed import markdown, ratios, time_leiden

    x, _ = make_blobs(n_samples=[150, 150, 100, 100], n_features=10, cluster_std=0.5, random_state=3)
    seen = []
    table = pd.DataFrame(time_leiden(x.astype(np.float32), (2000,), resolution=0.3, on_row=seen.append))
    paths = ["Leiden igraph, 2,000 cells", "Leiden leidenalg, 2,000 cells"]
    assert list(table["path"]) == paths == [row["path"] for row in seen]
    assert (table["cells"] == 2000).all() and (table["seconds"] > 0).all() and (table["graph_seconds"] > 0).all()
    assert (table["clusters"] == 4).all() and (table["leiden_ari"] > 0.9).all()
    table["cells_per_s"] = table["cells"] / table["seconds"]
    table.attrs["ratios"] = got = ratios(table, "csv", 8)
    values = dict(zip(got["ratio"], got["value"]))
    seconds = dict(zip(table["path"], table["seconds"]))
    expected = seconds["Leiden igraph, 2,000 cells"] / seconds["Leiden leidenalg, 2,000 cells"]
    assert values["Leiden igraph / leidenalg seconds, 2,000 cells"] == pytest.approx(expected)
    assert values["Leiden ARI igraph vs leidenalg, 2,000 cells"] == table["leiden_ari"].iloc[0]
    text = markdown(table)
    assert "| Leiden igraph | 2,000 |" in text and "| Leiden leidenalg | 2,000 |" in text
    assert f"| Leiden igraph / leidenalg seconds, 2,000 cells | {expected:.3f} | <= 0.33 | " in text
    ari = table["leiden_ari"].iloc[0]
    assert f"| Leiden ARI igraph vs leidenalg, 2,000 cells | {ari:.3f} |  |  |" in text


def test_leiden_ratio_from_seconds():
    from contrastive_sc.benchmarks.speed import markdown, ratios

    table = pd.DataFrame({"path": ["Leiden igraph, 10,000 cells", "Leiden leidenalg, 10,000 cells"],
                          "cells": [10000, 10000], "requests": [1, 1], "seconds": [2.0, 8.0],
                          "graph_seconds": [1.0, 1.0], "clusters": [12, 11], "leiden_ari": [0.93, 0.93]})
    table["cells_per_s"] = table["cells"] / table["seconds"]
    table.attrs["ratios"] = got = ratios(table, "csv", 8)
    assert list(got["value"]) == [0.25, 0.93] and list(got["met"]) == [True, None]
    assert "| Leiden igraph / leidenalg seconds, 10,000 cells | 0.250 | <= 0.33 | yes |" in markdown(table)
    assert "| Leiden leidenalg | 10,000 | 8.00 | 1.00 | 1,250 | 11 |" in markdown(table)


def test_long_form_answers_as_the_wide_form(packaged, frame):
    from contrastive_sc.benchmarks.speed import long_form

    wide = frame.iloc[:30].copy()
    wide.index = [f"cell_{i}" for i in range(len(wide))]
    gene = packaged.state.genes[0]
    wide[gene] = 0  # a model gene with no count in any cell: named by one row of count 0
    long = long_form(wide)
    assert (long.loc[long["gene"] == gene, "count"] == 0).all()
    expected = packaged.predict(wide, {"method": "trained"})
    got = packaged.predict(long, {"method": "trained"})
    assert list(got["cell"]) == list(wide.index)
    np.testing.assert_array_equal(got["cluster"], expected["cluster"])
    np.testing.assert_allclose(got.filter(like="emb_").to_numpy(), expected.filter(like="emb_").to_numpy(), atol=1e-5)
    # A gene named in no row is missing, as a column left out of the wide form.
    partial = packaged.predict(long[long["gene"] != gene], {"method": "trained"})
    expected = packaged.predict(wide.drop(columns=gene), {"method": "trained"})
    assert partial["gene_coverage"].iloc[0] == expected["gene_coverage"].iloc[0] < 1
    np.testing.assert_allclose(partial.filter(like="emb_").to_numpy(), expected.filter(like="emb_").to_numpy(), atol=1e-5)


@pytest.mark.parametrize(("rows", "message"), [
    ({"cell": [], "gene": [], "count": []}, "empty input: got 0 (cell, gene, count) rows"),
    ({"cell": ["a", "a"], "gene": ["g", "g"], "count": [1, 2]}, "cell a has more than one count for gene g"),
    ({"cell": ["a", "b", "b"], "gene": ["g", "h", "h"], "count": [1, 0, 0]}, "cell b has more than one count for gene h"),
    ({"cell": pd.Categorical(["a", None]), "gene": pd.Categorical(["g", "h"]), "count": [1, 2]},
     "1 (cell, gene, count) row(s) lack a cell or gene"),
    ({"cell": ["a", None], "gene": ["g", "h"], "count": [1, 2]}, "1 (cell, gene, count) row(s) lack a cell or gene"),
    ({"cell": ["a", "b"], "gene": ["g", "h"], "count": ["x", "y"]}, "the 'count' column holds object values such as 'x'"),
    ({"cell": ["a", "b"], "gene": ["g", "h"], "count": [1, -2]}, "the 'count' column holds 1 negative value(s)"),
    ({"cell": ["a", "b"], "gene": ["g", "h"], "count": [1.0, 2.5]}, "the 'count' column holds 1 non-integer"),
])
def test_long_form_bad_rows(packaged, rows, message):
    with pytest.raises(ValueError, match=None) as error:
        packaged.predict(pd.DataFrame(rows), {"method": "trained"})
    assert message in str(error.value)


def test_long_form_checks_coverage_on_named_genes(packaged, frame):
    from contrastive_sc.benchmarks.speed import long_form

    few = long_form(frame.iloc[:5][list(packaged.state.genes[:3])] + 1)
    with pytest.raises(ValueError, match="only 3 of the model's"):
        packaged.predict(few, {"method": "trained"})


def test_long_form_keeps_cells_without_counts():
    from contrastive_sc.benchmarks.speed import long_form

    wide = pd.DataFrame([[0, 2, 0], [0, 0, 0], [1, 0, 0]], index=["a", "b", "c"], columns=["g1", "g2", "g3"])
    long = long_form(wide)
    assert long.to_dict("list") == {"cell": ["a", "a", "b", "c"], "gene": ["g2", "g3", "g1", "g1"],
                                    "count": [2, 0, 0, 1]}
    with pytest.raises(ValueError, match="unique cell names"):
        long_form(wide.set_axis(["a", "a", "c"]))
    with pytest.raises(ValueError, match="unique gene names"):
        long_form(wide.set_axis(["g1", "g1", "g3"], axis=1))


def test_long_form_names_read_alike_as_text_or_categories(packaged, frame):
    # long_form sends categorical names (parquet's dictionary encoding, cheap to read); a client
    # that sends plain text, as CSV and JSON bodies arrive, gets the same answer.
    from contrastive_sc.benchmarks.speed import long_form, request_body

    wide = frame.iloc[:20].set_axis([f"c{i}" for i in range(20)])
    long = long_form(wide)
    assert isinstance(long["gene"].dtype, pd.CategoricalDtype)
    as_read = pd.read_parquet(io.BytesIO(request_body(wide, "parquet-long")))
    assert isinstance(as_read["cell"].dtype, pd.CategoricalDtype)
    text = long.astype({"cell": str, "gene": str})
    expected = packaged.predict(text, {"method": "trained"})
    for variant in (long, as_read, long.iloc[::-1]):  # row order does not matter, cells come in first-row order
        got = packaged.predict(variant, {"method": "trained"})
        order = list(pd.unique(variant["cell"].astype(str)))
        assert list(got["cell"]) == order
        np.testing.assert_allclose(got.set_index("cell").loc[list(expected["cell"])].filter(like="emb_").to_numpy(),
                                   expected.filter(like="emb_").to_numpy(), atol=1e-6)
    # A gene left out of the rows but still among the categories is missing, as in plain text.
    gene = str(packaged.state.genes[0])
    fewer = long[long["gene"] != gene]
    assert gene in fewer["gene"].cat.categories
    got = packaged.predict(fewer, {"method": "trained"})
    expected = packaged.predict(fewer.astype({"cell": str, "gene": str}), {"method": "trained"})
    assert got["gene_coverage"].iloc[0] == expected["gene_coverage"].iloc[0] < 1
    np.testing.assert_array_equal(got.filter(like="emb_").to_numpy(), expected.filter(like="emb_").to_numpy())


@pytest.mark.slow
def test_speed_benchmark_command_serves_and_stops(store_with_runs, synthetic, tmp_path):
    """The whole command on a logged model: a real server is started, timed through every format, stopped."""
    import urllib.request

    from click.testing import CliRunner

    from contrastive_sc.cli import main

    _, runs = store_with_runs
    data = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(data)
    out = tmp_path / "speed.csv"
    args = ["speed-benchmark", "--data", str(data), "--model-uri", runs[0]["model_uri"], "--cells", "60",
            "--request-cells", "30", "--clients", "2", "--requests-per-client", "1", "--leiden-cells", "200",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns[:3]) == ["dataset", "method", "seed"]
    paths = set(table["method"])
    assert {"onnxruntime encoder", "in-process predict", "HTTP json", "HTTP csv", "HTTP parquet-long",
            "HTTP json, no embedding"} <= paths
    concurrent = table[table["method"].str.endswith("2 clients")]
    assert len(concurrent) == 1 and concurrent["requests"].iloc[0] == 2
    assert {"Leiden igraph, 200 cells", "Leiden leidenalg, 200 cells"} <= paths
    assert "in-process predict / encoder" in result.output and "single-request p50 latency" in result.output
    assert "Leiden igraph / leidenalg seconds, 200 cells" in result.output
    url = re.search(r"server (http://127\.0\.0\.1:\d+) stopped", result.output).group(1)
    with pytest.raises(OSError):  # nothing answers there any more
        urllib.request.urlopen(f"{url}/ping", timeout=2)
    # A rerun may replace the earlier output.
    assert CliRunner().invoke(main, args).exit_code == 0
