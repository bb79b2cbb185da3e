"""What a run and an embedded AnnData give a biologist to name clusters: UMAP, markers, plots, batches."""

import numpy as np
import pytest
from mlflow import MlflowClient

from contrastive_sc.analysis.describe import N_MARKERS, marker_genes, umap_coordinates
from contrastive_sc.analysis.metrics import batch_mixing


def test_batch_mixing_reads_zero_for_separated_and_near_one_for_mixed_batches(rng):
    cells = np.concatenate([rng.normal(0, 1, (200, 5)), rng.normal(20, 1, (200, 5))])
    separated = np.repeat(["a", "b"], 200)
    mixed = rng.permutation(separated)
    assert batch_mixing(cells, separated) == pytest.approx(0.0, abs=1e-9)
    assert batch_mixing(cells, mixed) > 0.8
    assert np.isnan(batch_mixing(cells, ["a"] * 400))


def test_marker_genes_rank_the_genes_that_differ(synthetic):
    labels = synthetic.obs["label"].to_numpy()
    x = synthetic.X.toarray()
    x[:, 7] = 0
    x[labels == 0, 7] = np.round(0.2 * x[labels == 0].sum(axis=1))  # gene 7 marks cluster 0, and only it
    synthetic.X = x
    table = marker_genes(synthetic, labels)
    assert set(table["cluster"]) == {"0", "1", "2"}
    assert (table.groupby("cluster").size() == N_MARKERS).all()
    top = table[(table["cluster"] == "0") & (table["rank"] == 1)]["gene"].item()
    assert top == synthetic.var_names[7]


def test_umap_keeps_separate_groups_apart_and_is_reproducible(rng):
    # three groups far apart in 8 dimensions: on the map each cell's nearest cells are of its own group
    groups = np.repeat([0, 1, 2], 40)
    cells = rng.normal(size=(120, 8)) + 10 * np.eye(8)[groups]
    coords = umap_coordinates(cells, seed=0)
    assert coords.shape == (120, 2) and np.isfinite(coords).all()
    distances = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :5]
    assert (groups[nearest] == groups[:, None]).mean() > 0.95
    assert np.array_equal(coords, umap_coordinates(cells, seed=0))  # the same map for the same seed
    # the measure is not trivially high: against a shuffled labelling it is near chance (random coordinates score so too)
    assert (groups[nearest] == rng.permutation(groups)[:, None]).mean() < 0.6


@pytest.mark.slow
def test_a_run_logs_map_markers_heatmap_and_batch_mixing(tracking_uri, synthetic, tiny_config, tmp_path):
    from contrastive_sc.mlops import tracking

    tracking.setup(tracking_uri, "naming")
    synthetic.obs["donor"] = np.where(np.arange(synthetic.n_obs) % 2, "d1", "d2")
    result = tracking.train_run(synthetic, tiny_config, label_key="label", batch_key="donor")
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.params["data.batch_key"] == "donor"
    assert 0.0 <= run.data.metrics["batch_mixing"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"embedding_map.png", "markers_kmeans.csv", "markers_leiden.csv", "contingency_kmeans.png"} <= artifacts
    path = client.download_artifacts(result["run_id"], "markers_kmeans.csv", str(tmp_path))
    header = open(path).readline().strip()
    assert header == "cluster,rank,gene,score,log2_fold_change,pval_adj"
