"""Steps from a logged model: ONNX re-export with its parity check, and embedding a dataset to .h5ad."""

import anndata as ad
import numpy as np
import pytest

from contrastive_sc.mlops.exporting import embed_with_registered, export_registered

pytestmark = pytest.mark.slow  # loads logged models from an MLflow store


@pytest.fixture
def cells(synthetic, tmp_path):
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    return path


def test_export_matches_torch_on_random_rows_and_the_datas_cells(store_with_runs, cells, tmp_path, synthetic):
    from contrastive_sc.method.model import ContrastiveSC
    from contrastive_sc.mlops.registry import download_run_artifacts
    from contrastive_sc.mlops.tracking import TORCH_MODEL_ARTIFACT
    from contrastive_sc.serve.onnx_io import OnnxEncoder

    _, runs = store_with_runs
    uri = f"runs:/{runs[0]['run_id']}/model"
    report = export_registered(uri, tmp_path / "out" / "encoder.onnx", data=str(cells), provider="cpu")
    assert report["path"] == str(tmp_path / "out" / "encoder.onnx")
    assert report["rows_checked"] == 256 + synthetic.n_obs and report["max_abs_diff"] < 1e-4
    assert report["providers"] == ["CPUExecutionProvider"]
    # The written encoder embeds the data's cells as the logged torch model does.
    model = ContrastiveSC.load(download_run_artifacts(uri, TORCH_MODEL_ARTIFACT))
    onnx = OnnxEncoder(report["path"], provider="cpu")(model.preprocess(synthetic))
    np.testing.assert_allclose(onnx, model.transform(synthetic), atol=1e-4)


def test_embed_writes_embedding_umap_clusters_markers_and_cell_types(store_with_runs, cells, tmp_path):
    from contrastive_sc.mlops.registry import load_served_model

    _, runs = store_with_runs
    uri = f"runs:/{runs[0]['run_id']}/model"
    params = {"method": "kmeans", "n_clusters": 3, "resolution": None}
    summary = embed_with_registered(uri, str(cells), tmp_path / "out" / "embedded.h5ad", params, label_key="label")
    written = ad.read_h5ad(tmp_path / "out" / "embedded.h5ad")
    assert written.obsm["X_contrastive"].shape == (300, 60) and written.obsm["X_umap"].shape == (300, 2)
    clusters = written.obs["contrastive_kmeans"]
    assert clusters.nunique() == 3
    # The same clusters as the served model's for the same request.
    served = load_served_model(uri).predict(written.to_df(), {"method": "kmeans", "n_clusters": 3})
    np.testing.assert_array_equal(clusters.astype(int).to_numpy(), served["cluster"].to_numpy())
    # The model was trained with labels: it names the cells.
    assert set(written.obs["contrastive_cell_type"].astype(str)) <= {"0", "1", "2", "unassigned"}
    assert {"cluster", "gene"} <= set(written.uns["contrastive_markers"].columns)
    recorded = written.uns["contrastive_kmeans"]
    assert dict(recorded["params"]) == {"method": "kmeans", "n_clusters": 3} and recorded["model_uri"] == uri
    # Three well separated groups: the summary's scores say so.
    assert summary["cells"] == 300 and summary["gene_coverage"] == 1.0 and summary["n_clusters"] == 3
    assert summary["ari"] > 0.8, summary


def test_embed_refuses_a_dataset_without_the_models_genes(store_with_runs, synthetic, tmp_path):
    _, runs = store_with_runs
    other = synthetic.copy()
    other.var_names = [f"other_{g}" for g in other.var_names]
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(ValueError, match="only 0 of the model's 100 genes are in the input"):
        embed_with_registered(f"runs:/{runs[0]['run_id']}/model", str(tmp_path / "other.h5ad"), tmp_path / "x.h5ad", {})
    assert not (tmp_path / "x.h5ad").exists()


def test_annotate_command_names_the_cells_of_a_sample(store_with_runs, synthetic, tmp_path):
    import anndata as ad
    import pandas as pd
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    uri, runs = store_with_runs
    synthetic.obs["label"] = synthetic.obs["label"].astype(str)
    synthetic.write_h5ad(tmp_path / "sample.h5ad")
    model = f"runs:/{runs[0]['run_id']}/model"
    for out in ("named.csv", "named.h5ad"):
        result = CliRunner().invoke(main, ["annotate", "--model-uri", model, "--data", str(tmp_path / "sample.h5ad"),
                                           "--out", str(tmp_path / out), "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        assert "300 cells; unassigned" in result.output and result.output.count("%") >= 3
    rows = pd.read_csv(tmp_path / "named.csv")
    assert list(rows.columns) == ["cell", "cell_type", "confidence"] and len(rows) == 300
    named = ad.read_h5ad(tmp_path / "named.h5ad")
    assert (named.obs["contrastive_cell_type"].astype(str).to_numpy() == rows["cell_type"].astype(str).to_numpy()).all()
    assert (rows["cell_type"].astype(str) == synthetic.obs["label"].to_numpy()).mean() > 0.9
    again = CliRunner().invoke(main, ["annotate", "--model-uri", model, "--data", str(tmp_path / "sample.h5ad"),
                                      "--out", str(tmp_path / "named.csv"), "--min-confidence", "1",
                                      "--tracking-uri", uri])  # an earlier output may be replaced
    assert again.exit_code == 0 and "unassigned 100.0%" in again.output, again.output
    (tmp_path / "notes.csv").write_text("precious")
    refused = CliRunner().invoke(main, ["annotate", "--model-uri", model, "--data", str(tmp_path / "sample.h5ad"),
                                        "--out", str(tmp_path / "notes.csv"), "--tracking-uri", uri])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.output
