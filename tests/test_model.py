import numpy as np
import pytest

from contrastive_sc import ContrastiveSC, cluster, score_clustering


def test_fit_embed_cluster_recovers_groups(trained, synthetic):
    assert trained.embed(synthetic) is None
    z = synthetic.obsm["X_contrastive"]
    assert z.shape == (synthetic.n_obs, 60)
    assert synthetic.uns["X_contrastive"]["coverage"]["fraction"] == 1.0
    cluster(synthetic, "kmeans", n_clusters=3)
    scores = score_clustering(z, synthetic.obs["contrastive_kmeans"], synthetic.obs["label"])
    assert scores["ari"] > 0.8


def test_save_load_round_trip(trained, synthetic, tmp_path):
    trained.save(tmp_path / "model")
    loaded = ContrastiveSC.load(tmp_path / "model")
    assert loaded.config == trained.config
    assert loaded.state == trained.state
    assert loaded.history.loss == trained.history.loss
    np.testing.assert_array_equal(loaded.transform(synthetic), trained.transform(synthetic))
    np.testing.assert_array_equal(loaded.reference_centroids, trained.reference_centroids)


def test_embed_new_data_with_other_genes(trained, synthetic):
    # a new dataset: cells reordered, genes reordered, some model genes missing, extra genes
    new = synthetic[::-1, ::-1].copy()
    new = new[:, [g for g in new.var_names if g not in trained.state.genes[:5]]].copy()
    z = trained.embed(new, copy=True).obsm["X_contrastive"]
    assert z.shape == (new.n_obs, 60)
    assert trained.coverage(new).n_found == trained.state.n_genes - 5


def test_reference_labels_follow_training_clusters(trained, synthetic):
    z = trained.transform(synthetic)
    labels = trained.reference_labels(z)
    assert set(np.unique(labels)) <= set(range(len(trained.reference_centroids)))
    # labelling the same cells in two batches gives the same answer as all at once
    np.testing.assert_array_equal(
        np.concatenate([trained.reference_labels(z[:100]), trained.reference_labels(z[100:])]), labels
    )


def test_reference_clusters_without_k_use_the_estimated_k(synthetic, tiny_config):
    import dataclasses

    from contrastive_sc.analysis.cluster import cluster_labels, estimate_n_clusters

    config = dataclasses.replace(tiny_config, cluster=dataclasses.replace(tiny_config.cluster, n_clusters=None))
    model = ContrastiveSC(config).fit(synthetic)
    z = model.transform(synthetic)
    cfg = model.config
    k = estimate_n_clusters(z, n_neighbors=cfg.cluster.n_neighbors, seed=cfg.train.seed)
    assert len(model.reference_centroids) == k
    auto = cluster_labels(z, "auto", n_neighbors=cfg.cluster.n_neighbors, seed=cfg.train.seed)
    assert score_clustering(z, model.reference_labels(z), auto)["ari"] == pytest.approx(1.0)


def test_auto_gene_count_picks_by_silhouette(synthetic, tiny_config):
    model = ContrastiveSC(tiny_config.replace(n_genes="auto", epochs=1)).fit(synthetic)
    assert [trial["n_genes"] for trial in model.gene_search] == [400]  # all smaller than the 500 minimum
    assert model.state.n_genes == 400


def test_unfitted_model_and_bad_folder(tmp_path, synthetic):
    with pytest.raises(RuntimeError, match="not trained yet"):
        ContrastiveSC().transform(synthetic)
    with pytest.raises(FileNotFoundError, match="not a saved ContrastiveSC model"):
        ContrastiveSC.load(tmp_path)


def test_config_overrides_and_round_trip():
    model = ContrastiveSC(preset="paper", epochs=5, layers=[64, 16])
    assert model.config.train.epochs == 5 and model.config.encoder.layers == (64, 16)
    params = model.config.to_params()
    assert params["lr"] == 0.4 and params["temperature"] == 0.07 and params["input_dropout"] == 0.9
    assert type(model.config).from_params(params) == model.config
    with pytest.raises(ValueError, match="unknown setting"):
        ContrastiveSC(learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        ContrastiveSC(preset="nope")
