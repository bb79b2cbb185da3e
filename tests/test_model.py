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
    np.testing.assert_array_equal(loaded.training_clusters.centroids, trained.training_clusters.centroids)


def test_embed_new_data_with_other_genes(trained, synthetic):
    # a new dataset: cells reordered, genes reordered, some model genes missing, extra genes
    new = synthetic[::-1, ::-1].copy()
    new = new[:, [g for g in new.var_names if g not in trained.state.genes[:5]]].copy()
    z = trained.embed(new, copy=True).obsm["X_contrastive"]
    assert z.shape == (new.n_obs, 60)
    assert trained.coverage(new).n_found == trained.state.n_genes - 5


def test_assigned_clusters_follow_the_training_clusters(trained, synthetic):
    z = trained.transform(synthetic)
    labels = trained.assign_clusters(z)
    assert set(np.unique(labels)) <= set(range(len(trained.training_clusters.centroids)))
    # labelling the same cells in two batches gives the same answer as all at once
    np.testing.assert_array_equal(
        np.concatenate([trained.assign_clusters(z[:100]), trained.assign_clusters(z[100:])]), labels
    )


def test_training_clusters_without_k_use_the_estimated_k(synthetic, tiny_config):
    import dataclasses

    from contrastive_sc.analysis.cluster import cluster_labels, estimate_n_clusters

    config = dataclasses.replace(tiny_config, cluster=dataclasses.replace(tiny_config.cluster, n_clusters=None))
    model = ContrastiveSC(config).fit(synthetic)
    z = model.transform(synthetic)
    cfg = model.config
    k = estimate_n_clusters(z, n_neighbors=cfg.cluster.n_neighbors, seed=cfg.train.seed)
    assert len(model.training_clusters.centroids) == k
    auto = cluster_labels(z, "auto", n_neighbors=cfg.cluster.n_neighbors, seed=cfg.train.seed)
    assert score_clustering(z, model.assign_clusters(z), auto)["ari"] == pytest.approx(1.0)


def test_auto_gene_count_picks_by_silhouette(synthetic, tiny_config, monkeypatch):
    from contrastive_sc.method import gene_search

    monkeypatch.setattr(gene_search, "AUTO_GENE_COUNTS", (20, 100, 300, 1000))
    model = ContrastiveSC(tiny_config.replace(n_genes="auto", epochs=2)).fit(synthetic)
    trials = model.gene_search
    assert [trial["n_genes"] for trial in trials] == [20, 100, 300]  # 1000 is more than the 400 genes there are
    best = max(trials, key=lambda trial: trial["silhouette"])
    assert len({trial["silhouette"] for trial in trials}) == 3  # three different fits, not one repeated
    assert model.state.n_genes == best["n_genes"]


def test_auto_gene_count_with_fewer_genes_than_every_candidate(synthetic, tiny_config):
    model = ContrastiveSC(tiny_config.replace(n_genes="auto", epochs=1)).fit(synthetic)
    assert [trial["n_genes"] for trial in model.gene_search] == [400]  # all smaller than the 500 minimum
    assert model.state.n_genes == 400


def _log_normalised_with_counts(synthetic):
    """X log-normalised (as many h5ad files are), the raw counts in layers["counts"]."""
    import scanpy as sc

    adata = synthetic.copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_the_layer_given_to_fit_is_read_by_every_later_call(synthetic, tiny_config, tmp_path):
    adata = _log_normalised_with_counts(synthetic)
    model = ContrastiveSC(tiny_config).fit(adata, layer="counts", label_key="label")
    assert model.setup.layer == "counts"
    on_counts = ContrastiveSC(tiny_config).fit(synthetic.copy(), label_key="label")
    # the same training cells, read from the layer: the same model
    np.testing.assert_array_equal(model.training_embedding, on_counts.training_embedding)
    np.testing.assert_array_equal(model.transform(adata), on_counts.transform(synthetic))
    np.testing.assert_array_equal(model.preprocess(adata), on_counts.preprocess(synthetic))
    model.embed(adata)
    np.testing.assert_array_equal(adata.obsm["X_contrastive"], on_counts.transform(synthetic))
    assert adata.uns["X_contrastive"]["params"]["layer"] == "counts"
    model.annotate(adata)
    expected = on_counts.annotate(synthetic.copy(), copy=True).obs["contrastive_cell_type"]
    np.testing.assert_array_equal(adata.obs["contrastive_cell_type"], expected)
    # and after a save and a load
    loaded = ContrastiveSC.load(model.save(tmp_path / "model"))
    assert loaded.setup == model.setup
    np.testing.assert_array_equal(loaded.transform(adata), model.transform(adata))


def test_normalised_values_are_refused_on_every_call(synthetic, tiny_config):
    adata = _log_normalised_with_counts(synthetic)
    with pytest.raises(ValueError, match="adata.X: .*non-integer.*pass layer="):
        ContrastiveSC(tiny_config).fit(adata)
    model = ContrastiveSC(tiny_config).fit(synthetic.copy())  # counts in X: later calls read X
    for call in (model.transform, model.embed, model.preprocess, model.coverage):
        with pytest.raises(ValueError, match="non-integer"):
            call(adata)
    assert model.transform(adata, layer="counts").shape == (adata.n_obs, 60)  # an explicit layer overrides


def test_a_missing_layer_is_named(synthetic, tiny_config):
    adata = _log_normalised_with_counts(synthetic)
    model = ContrastiveSC(tiny_config).fit(adata, layer="counts")
    del adata.layers["counts"]
    with pytest.raises(KeyError, match="layer 'counts' not found"):
        model.embed(adata)


def test_read_takes_the_counts_from_a_layer(synthetic, tmp_path):
    import contrastive_sc as cs

    adata = _log_normalised_with_counts(synthetic)
    adata.write_h5ad(tmp_path / "log.h5ad")
    with pytest.raises(ValueError, match="non-integer"):
        cs.read(tmp_path / "log.h5ad")
    counts = cs.read(tmp_path / "log.h5ad", layer="counts")
    assert (counts.X != synthetic.X).nnz == 0
    assert counts.uns["dataset"]["layer"] == "counts"


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


@pytest.mark.parametrize("n_genes", [100, "auto"])
def test_the_annotator_is_fitted_on_the_encoders_input_preprocessed_once(synthetic, tiny_config, monkeypatch, n_genes):
    """Training preprocesses the labelled cells once: what the annotator learns from is what the encoder read."""
    from contrastive_sc.method import gene_search
    from contrastive_sc.method import model as model_module

    monkeypatch.setattr(gene_search, "AUTO_GENE_COUNTS", (50, 100))
    seen = []
    fit = model_module.CellTypeAnnotator.fit
    monkeypatch.setattr(model_module.CellTypeAnnotator, "fit",
                        lambda self, pre, *a, **k: seen.append(pre) or fit(self, pre, *a, **k))
    calls = []
    again = model_module.transform_in_memory
    monkeypatch.setattr(model_module, "transform_in_memory", lambda *a, **k: calls.append(1) or again(*a, **k))
    model = ContrastiveSC(tiny_config.replace(n_genes=n_genes, epochs=1)).fit(synthetic, label_key="label")
    assert calls == []  # no second pass over the counts for the annotator
    assert np.array_equal(seen[0], model.preprocess(synthetic))  # training did not alter the input it kept
    assert model.annotator is not None
