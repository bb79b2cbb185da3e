"""Out-of-core path: chunked preprocessing, training from disk and chunked embedding match memory."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from contrastive_sc import ContrastiveSC
from contrastive_sc.method.outofcore import (
    DiskMatrix,
    embed_chunked,
    fit_preprocess_chunked,
    preprocess_to_disk,
    seurat_top_genes,
    write_embedding,
)
from contrastive_sc.method.preprocess import fit_preprocess, transform
from contrastive_sc.method.train import encode, fit_encoder


def _assert_same_state(chunked, memory):
    assert chunked.genes == memory.genes
    assert chunked.library_genes == memory.library_genes
    assert chunked.target_sum == pytest.approx(memory.target_sum, rel=1e-7)
    assert chunked.n_cells_fit == memory.n_cells_fit
    np.testing.assert_allclose(chunked.library_share, memory.library_share, rtol=1e-9)
    np.testing.assert_allclose(chunked.mean, memory.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(chunked.std, memory.std, rtol=1e-6)


@pytest.mark.parametrize("n_genes", [50, 100, 250, "all"])
def test_chunked_state_equals_in_memory(synthetic, n_genes):
    memory = fit_preprocess(synthetic.X, synthetic.var_names, n_genes=n_genes)
    chunked = fit_preprocess_chunked(synthetic.X, synthetic.var_names, n_genes=n_genes, chunk_size=37)
    _assert_same_state(chunked, memory)


def test_chunked_state_from_dense_and_from_a_backed_file(synthetic, tmp_path):
    memory = fit_preprocess(synthetic.X, synthetic.var_names, n_genes=80, min_cells=3)
    dense = fit_preprocess_chunked(synthetic.X.toarray(), synthetic.var_names, n_genes=80, min_cells=3, chunk_size=64)
    _assert_same_state(dense, memory)
    synthetic.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    from_file = fit_preprocess_chunked(backed.X, backed.var_names, n_genes=80, min_cells=3, chunk_size=100)
    _assert_same_state(from_file, memory)
    backed.file.close()


def test_seurat_ranking_matches_scanpy(rng):
    import scanpy as sc

    counts = sp.csr_matrix(rng.negative_binomial(2, rng.uniform(0.05, 0.9, 300), size=(500, 300)).astype(np.float32))
    adata = ad.AnnData(counts)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=60, flavor="seurat")
    norm = np.expm1(adata.X.toarray().astype(np.float64))
    mean, var = norm.mean(axis=0), norm.var(axis=0, ddof=1)
    np.testing.assert_array_equal(seurat_top_genes(mean, var, 60), np.flatnonzero(adata.var["highly_variable"]))


def test_chunked_preprocessing_rejects_other_flavors(synthetic):
    with pytest.raises(ValueError, match="only the 'seurat'"):
        fit_preprocess_chunked(synthetic.X, synthetic.var_names, hvg_flavor="cell_ranger")
    with pytest.raises(ValueError, match="gene names for a matrix"):
        fit_preprocess_chunked(synthetic.X, synthetic.var_names[:5])


def test_disk_matrix_reads_what_transform_writes(synthetic, tmp_path):
    state = fit_preprocess(synthetic.X, synthetic.var_names, n_genes=100)
    expected = transform(synthetic.X, synthetic.var_names, state)
    with preprocess_to_disk(synthetic.X, synthetic.var_names, state, directory=tmp_path, chunk_size=70) as x:
        assert x.shape == expected.shape
        np.testing.assert_array_equal(x[10:40], expected[10:40])
        picks = np.array([5, 299, 0, 17, 5])
        np.testing.assert_array_equal(x.take_rows(picks), expected[picks])
        path = x.path
    assert not path.exists()  # the temporary file goes with the matrix
    (tmp_path / "short.f32").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="expected 16 for a float32 matrix"):
        DiskMatrix(tmp_path / "short.f32", (2, 2))


def test_training_from_disk_equals_training_in_memory(synthetic, tiny_config, tmp_path):
    state = fit_preprocess(synthetic.X, synthetic.var_names, n_genes=100)
    x = transform(synthetic.X, synthetic.var_names, state)
    in_memory, history = fit_encoder(x, tiny_config.encoder, tiny_config.train)
    with preprocess_to_disk(synthetic.X, synthetic.var_names, state, directory=tmp_path) as on_disk:
        from_disk, disk_history = fit_encoder(on_disk, tiny_config.encoder, tiny_config.train)
    # Same permutation, same masks, same float32 inputs: the same weights.
    for a, b in zip(in_memory.state_dict().values(), from_disk.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert disk_history.loss == history.loss
    assert disk_history.cells_per_second > 0


def test_backed_fit_and_embedding_match_memory(synthetic, tiny_config, tmp_path):
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = ContrastiveSC(tiny_config).fit(backed)
    assert model.history.cells_per_second > 0 and model.reference_centroids is not None
    reference = ContrastiveSC(tiny_config).fit(synthetic)
    _assert_same_state(model.state, reference.state)
    assert len(model.history.loss) == tiny_config.train.epochs

    # The same trained encoder embeds a backed file as it embeds the data in memory.
    expected = model.transform(synthetic)
    np.testing.assert_allclose(model.transform(backed), expected, atol=1e-6)
    model.embed(backed)
    np.testing.assert_allclose(backed.obsm["X_contrastive"], expected, atol=1e-6)
    state = model.state
    np.testing.assert_allclose(embed_chunked(model.encoder, backed.X, backed.var_names, state, chunk_size=33),
                               expected, atol=1e-6)
    out = write_embedding(model.encoder, backed.X, backed.var_names, state, tmp_path / "emb.npy", chunk_size=64)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    np.testing.assert_allclose(encode(model.encoder, transform(synthetic.X, synthetic.var_names, state)), expected,
                               atol=1e-6)
    backed.file.close()


def test_backed_fit_of_the_fused_preset_equals_memory(synthetic, tmp_path):
    from contrastive_sc.method.config import get_preset

    config = get_preset("fused").replace(n_genes=100, pca_genes=50, pca_components=8, epochs=2, batch_size=64,
                                         n_clusters=3)
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    from_file = ContrastiveSC(config).fit(backed)
    in_memory = ContrastiveSC(config).fit(synthetic)
    # 300 cells are fewer than the PCA sample, so both fit the PCA block on the same rows
    assert from_file.encoder.pca_index.tolist() == in_memory.encoder.pca_index.tolist()
    np.testing.assert_allclose(from_file.transform(backed), in_memory.transform(synthetic), atol=1e-4)
    backed.file.close()


@pytest.fixture
def both_containers(synthetic, tmp_path):
    """The same cells in memory and as a backed ``.h5ad``."""
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    yield {"memory": synthetic, "backed": backed}
    backed.file.close()


@pytest.mark.parametrize("container", ["memory", "backed"])
def test_the_model_api_works_alike_on_either_container(both_containers, tiny_config, container):
    # fit, preprocess, transform and embed accept backed and in-memory AnnData, with the same results.
    adata, memory = both_containers[container], both_containers["memory"]
    model = ContrastiveSC(tiny_config).fit(adata)
    reference = ContrastiveSC(tiny_config).fit(memory)
    x = model.preprocess(adata)
    assert x.dtype == np.float32 and x.shape == (memory.n_obs, model.state.n_genes)
    np.testing.assert_allclose(x, reference.preprocess(memory), atol=1e-6)
    np.testing.assert_allclose(model.transform(adata), reference.transform(memory), atol=1e-5)
    model.embed(adata)
    np.testing.assert_allclose(adata.obsm["X_contrastive"], reference.transform(memory), atol=1e-5)


def test_the_pca_sample_depends_on_the_number_of_cells_not_the_container(both_containers, monkeypatch):
    # Above PCA_SAMPLE_CELLS cells the PCA block is fitted on a sample, in memory as on disk.
    import contrastive_sc.method.model as model_module
    from contrastive_sc.method.config import get_preset

    monkeypatch.setattr(model_module, "PCA_SAMPLE_CELLS", 120)
    config = get_preset("fused").replace(n_genes=100, pca_genes=50, pca_components=8, epochs=2, batch_size=64,
                                         n_clusters=3)
    synthetic, backed = both_containers["memory"], both_containers["backed"]
    from_file = ContrastiveSC(config).fit(backed)
    in_memory = ContrastiveSC(config).fit(synthetic)
    np.testing.assert_allclose(from_file.encoder.pca_components.numpy(), in_memory.encoder.pca_components.numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(from_file.transform(backed), in_memory.transform(synthetic), atol=1e-4)
    everything = ContrastiveSC(config.replace(seed=0))
    monkeypatch.setattr(model_module, "PCA_SAMPLE_CELLS", 10_000)
    everything.fit(synthetic)
    # a sample of 120 of the 300 cells gives another PCA than all of them
    assert not np.allclose(everything.encoder.pca_mean.numpy(), in_memory.encoder.pca_mean.numpy(), atol=1e-4)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["worm_neuron_cell.h5", "baron_mouse_pancreas.h5ad", "pbmc3k_seurat_clustifyrdata.h5ad"])
def test_block_statistics_pick_scanpys_genes_and_input_on_real_data(name):
    # The model fits preprocessing from block statistics for any container; on real counts it
    # keeps scanpy's genes and gives the encoder the same float32 input to the last bit.
    from contrastive_sc import read
    from tests.conftest import shared_file

    adata = read(shared_file(name))
    for n_genes, clip in ((500, None), (2000, 10.0)):
        scanpy_state = fit_preprocess(adata.X, adata.var_names, n_genes=n_genes, clip=clip)
        blocks_state = fit_preprocess_chunked(adata.X, adata.var_names, n_genes=n_genes, clip=clip, chunk_size=1000)
        assert blocks_state.genes == scanpy_state.genes
        np.testing.assert_array_equal(transform(adata.X, adata.var_names, blocks_state),
                                      transform(adata.X, adata.var_names, scanpy_state))
