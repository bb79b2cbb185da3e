"""The ``fused`` preset: encoder output beside a PCA block, saved, exported and served as one."""

import numpy as np
import pytest
import torch

from contrastive_sc import ContrastiveSC
from contrastive_sc.analysis.cluster import cluster_labels, nearest_centroid
from contrastive_sc.analysis.metrics import score_clustering
from contrastive_sc.method.config import DEFAULT_PRESET, get_preset
from contrastive_sc.method.preprocess import fit_preprocess
from contrastive_sc.method.rows import as_rows
from contrastive_sc.serve.inference import EmbedThenCluster, package_model


@pytest.fixture(scope="module")
def fused(_synthetic_session):
    config = get_preset("fused").replace(n_genes=100, pca_genes=50, pca_components=10, epochs=3, batch_size=64,
                                         n_clusters=3)
    return ContrastiveSC(config).fit(_synthetic_session.copy())


def test_fused_is_the_default_and_the_paper_preset_is_untouched():
    assert DEFAULT_PRESET == "fused" and ContrastiveSC().config == get_preset("fused")
    fused, paper = get_preset("fused").to_params(), get_preset("paper").to_params()
    changed = {k: (paper[k], fused[k]) for k in paper if paper[k] != fused[k]}
    assert changed == {"preset": ("paper", "fused"), "n_genes": (500, 2000), "pca_components": (0, 50),
                       "lr": (0.4, 1e-3), "temperature": (0.07, 0.5), "resolution": (1.0, 0.5),
                       "n_neighbors": (15, 30)}
    assert paper["layers"] == [200, 40, 60] and paper["input_dropout"] == 0.9 and paper["epochs"] == 30


def test_blocks_are_centred_and_equally_weighted(fused, synthetic):
    z = fused.transform(synthetic)
    assert z.shape == (synthetic.n_obs, 60 + 10)
    for block in (z[:, :60], z[:, 60:]):
        np.testing.assert_allclose(block.mean(axis=0), 0.0, atol=1e-4)
        assert np.sqrt((block**2).sum(axis=1).mean()) == pytest.approx(1.0, rel=1e-4)
    assert score_clustering(z, cluster_labels(z, "kmeans", n_clusters=3), synthetic.obs["label"])["ari"] > 0.8


def test_pca_block_reads_the_most_dispersed_genes(fused, synthetic):
    top = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=50).genes
    read = [fused.state.genes[i] for i in fused.encoder.pca_index.tolist()]
    assert read == list(top)


def test_pca_block_is_the_principal_components_of_those_genes(fused, synthetic):
    from sklearn.decomposition import PCA

    x = fused.preprocess(synthetic)[:, fused.encoder.pca_index.numpy()]
    pcs = PCA(n_components=10, random_state=0).fit_transform(x)
    block = fused.transform(synthetic)[:, 60:]
    scale = np.sqrt((pcs**2).sum(axis=1).mean())
    np.testing.assert_allclose(np.abs(block), np.abs(pcs / scale), atol=1e-4)  # up to each component's sign


def test_save_load_round_trip(fused, synthetic, tmp_path):
    fused.save(tmp_path / "model")
    loaded = ContrastiveSC.load(tmp_path / "model")
    assert loaded.config == fused.config
    # float32 round-off only: the restored buffers are the same numbers in fresh storage
    np.testing.assert_allclose(loaded.transform(synthetic), fused.transform(synthetic), atol=1e-6)
    z = fused.transform(synthetic)
    np.testing.assert_array_equal(loaded.assign_clusters(z), fused.assign_clusters(z))


def test_reference_labels_are_the_kmeans_labels_of_the_training_cells(fused, synthetic):
    z = fused.transform(synthetic)
    kmeans = cluster_labels(z, "kmeans", n_clusters=3, seed=fused.config.train.seed)
    reference = fused.assign_clusters(z)
    assert score_clustering(z, reference, kmeans)["ari"] == pytest.approx(1.0)


def test_packaged_model_serves_the_fused_embedding(fused, synthetic, tmp_path):
    package_model(fused, tmp_path, check_rows=fused.preprocess(synthetic))
    served = EmbedThenCluster.from_dir(tmp_path, provider="cpu")
    out = served.predict(synthetic.to_df())
    z = fused.transform(synthetic)
    np.testing.assert_allclose(out.filter(like="emb_").to_numpy(), z, atol=1e-5)
    np.testing.assert_array_equal(out["cluster"].to_numpy(), fused.assign_clusters(z))
    # Leiden without parameters uses the graph the model was trained with (resolution 0.5, 30 neighbours)
    leiden = served.predict(synthetic.to_df(), {"method": "leiden", "return_embedding": False})["cluster"].to_numpy()
    expected = cluster_labels(out.filter(like="emb_").to_numpy(), "leiden", resolution=0.5, n_neighbors=30, seed=0)
    np.testing.assert_array_equal(leiden, expected)
    # auto: KMeans with the estimated k, on the same 30-neighbour graph
    auto = served.predict(synthetic.to_df(), {"method": "auto", "return_embedding": False})["cluster"].to_numpy()
    expected = cluster_labels(out.filter(like="emb_").to_numpy(), "auto", n_neighbors=30, seed=0)
    np.testing.assert_array_equal(auto, expected)


def test_nearest_centroid_is_the_euclidean_argmin(rng):
    x, centroids = rng.normal(size=(50, 4)), rng.normal(size=(6, 4))
    brute = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(nearest_centroid(x, centroids), brute)
    with pytest.raises(ValueError, match=r"\(cells, d\) rows and \(clusters, d\) centroids"):
        nearest_centroid(x, centroids[:, :3])


def test_empty_module_loads_a_saved_state(fused):
    from contrastive_sc.method.encoder import ContrastiveEncoder, FusedEmbedder

    encoder = ContrastiveEncoder(fused.encoder.n_inputs)
    empty = FusedEmbedder.empty(encoder, *reversed(fused.encoder.pca_components.shape))
    empty.load_state_dict(fused.encoder.state_dict())
    x = torch.randn(5, fused.encoder.n_inputs)
    torch.testing.assert_close(empty.eval()(x), fused.encoder.eval()(x))


@pytest.mark.parametrize("readout", ["unnormalised", "hidden"])
def test_a_fused_model_with_another_readout_saves_loads_and_exports(synthetic, tmp_path, readout):
    from contrastive_sc.serve.onnx_io import OnnxEncoder, export_onnx

    config = get_preset("fused").replace(n_genes=100, pca_genes=50, pca_components=8, epochs=2, batch_size=64,
                                         n_clusters=3, readout=readout)
    model = ContrastiveSC(config).fit(synthetic)
    z = model.transform(synthetic)
    width = 200 if readout == "hidden" else 60
    assert z.shape == (synthetic.n_obs, width + 8)
    assert model.training_clusters.centroids.shape[1] == width + 8
    loaded = ContrastiveSC.load(model.save(tmp_path / "m"))
    assert loaded.encoder.encoder.readout == readout
    np.testing.assert_allclose(loaded.transform(synthetic), z, atol=1e-6)
    path = export_onnx(loaded.encoder, tmp_path / "enc.onnx")
    np.testing.assert_allclose(OnnxEncoder(path)(loaded.preprocess(synthetic)), z, atol=1e-4)
