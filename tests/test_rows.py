"""Rows wherever they are held: block statistics, training from disk and embedding by blocks match memory."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from contrastive_sc import ContrastiveSC
from contrastive_sc.method.encoder import encode
from contrastive_sc.method.preprocess import PreprocessState, fit_preprocess, seurat_top_genes, transform, transform_rows
from contrastive_sc.method.rows import BackedRows, DiskMatrix, InMemoryRows, as_rows, collect
from contrastive_sc.method.train import fit_encoder


def scanpy_state(counts, names, *, n_genes, min_cells=2, clip=None) -> PreprocessState:
    """The paper's preprocessing on the whole matrix, the genes ranked by scanpy: what the block fit must equal."""
    import scanpy as sc

    from contrastive_sc.method.preprocess import _log_normalise

    counts = sp.csr_matrix(counts, dtype=np.float32)
    names = np.asarray(names, dtype=str)
    keep = np.asarray((counts > 0).sum(axis=0)).ravel() >= min_cells
    counts, names = counts[:, keep], names[keep]
    share = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    target = float(np.median(totals[totals > 0]))
    lognorm = _log_normalise(counts, totals, target)
    chosen = np.arange(len(names))
    if n_genes != "all" and n_genes < len(names):
        adata = ad.AnnData(lognorm)
        sc.pp.highly_variable_genes(adata, n_top_genes=n_genes, flavor="seurat")
        chosen = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    selected = lognorm[:, chosen].toarray().astype(np.float64)
    return PreprocessState.from_arrays(names[chosen], selected.mean(axis=0), selected.std(axis=0, ddof=1),
                                       target_sum=target, library_genes=names, library_share=share / share.sum(),
                                       clip=clip, n_cells_fit=counts.shape[0])


@pytest.fixture
def both_containers(synthetic, tmp_path):
    """The same cells in memory and as a backed ``.h5ad``."""
    path = tmp_path / "cells.h5ad"
    synthetic.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    yield {"memory": synthetic, "backed": backed}
    backed.file.close()


def test_every_kind_of_rows_gives_the_same_blocks_and_rows(both_containers, tmp_path):
    memory, backed = both_containers["memory"], both_containers["backed"]
    expected = memory.X.toarray()
    dense = as_rows(expected)
    with DiskMatrix.write(dense.blocks(64), expected.shape, path=tmp_path / "x.f32") as on_disk:
        kinds = {"sparse": as_rows(memory.X), "dense": dense, "backed": as_rows(backed.X), "disk": on_disk}
        assert [type(k).__name__ for k in kinds.values()] == ["InMemoryRows", "InMemoryRows", "BackedRows",
                                                                 "DiskMatrix"]
        picks = np.array([5, 299, 0, 17, 5])
        for name, rows in kinds.items():
            assert rows.shape == expected.shape, name
            blocks = [b.toarray() if sp.issparse(b) else b for _, _, b in rows.blocks(37)]
            np.testing.assert_array_equal(np.concatenate(blocks), expected, err_msg=name)
            taken = rows.take(picks)
            np.testing.assert_array_equal(taken.toarray() if sp.issparse(taken) else taken, expected[picks])
            np.testing.assert_array_equal(collect(lambda b: np.asarray(b.sum(axis=1)).reshape(-1, 1), rows, 1),
                                          expected.sum(axis=1, keepdims=True), err_msg=name)
            whole = rows.to_memory()
            np.testing.assert_array_equal(whole.toarray() if sp.issparse(whole) else whole, expected, err_msg=name)
        assert dense.to_memory() is expected  # rows held in memory are handed over, not copied
    assert isinstance(as_rows(backed.X), BackedRows) and isinstance(as_rows(memory.X), InMemoryRows)
    with pytest.raises(ValueError, match="positive number of cells"):
        next(dense.blocks(0))


def _assert_same_state(chunked, memory):
    assert chunked.genes == memory.genes
    assert chunked.library_genes == memory.library_genes
    assert chunked.target_sum == pytest.approx(memory.target_sum, rel=1e-7)
    assert chunked.n_cells_fit == memory.n_cells_fit
    np.testing.assert_allclose(chunked.library_share, memory.library_share, rtol=1e-9)
    np.testing.assert_allclose(chunked.mean, memory.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(chunked.std, memory.std, rtol=1e-6)


@pytest.mark.parametrize("n_genes", [50, 100, 250, "all"])
def test_block_statistics_give_scanpys_state(synthetic, n_genes):
    memory = scanpy_state(synthetic.X, synthetic.var_names, n_genes=n_genes)
    chunked = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=n_genes, block_size=37)
    _assert_same_state(chunked, memory)


def test_the_state_is_the_same_from_dense_and_from_a_backed_file(synthetic, tmp_path):
    memory = scanpy_state(synthetic.X, synthetic.var_names, n_genes=80, min_cells=3)
    dense = fit_preprocess(as_rows(synthetic.X.toarray()), synthetic.var_names, n_genes=80, min_cells=3, block_size=64)
    _assert_same_state(dense, memory)
    synthetic.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    from_file = fit_preprocess(as_rows(backed.X), backed.var_names, n_genes=80, min_cells=3, block_size=100)
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


def test_other_flavors_are_ranked_by_scanpy_and_bad_names_refused(synthetic):
    import scanpy as sc

    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=60, hvg_flavor="cell_ranger", block_size=64)
    adata = synthetic.copy()
    adata.X = adata.X.astype(np.float32)
    sc.pp.filter_genes(adata, min_cells=2)
    sc.pp.normalize_total(adata, target_sum=state.target_sum)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=60, flavor="cell_ranger")
    assert state.genes == tuple(adata.var_names[adata.var["highly_variable"]])
    with pytest.raises(ValueError, match="gene names for a matrix"):
        fit_preprocess(as_rows(synthetic.X), synthetic.var_names[:5])


def test_stored_rows_stay_with_the_kind_of_their_cells(both_containers, tmp_path):
    # store() keeps new rows in memory for cells in memory, in a temporary file for cells on disk
    halves = [(0, 150, np.full((150, 3), 1, np.float32)), (150, 300, np.full((150, 3), 2, np.float32))]
    expected = np.concatenate([block for _, _, block in halves])
    with as_rows(both_containers["memory"].X).store(iter(halves), 3) as kept:
        assert isinstance(kept, InMemoryRows)
        np.testing.assert_array_equal(kept.to_memory(), expected)
    with as_rows(both_containers["backed"].X).store(iter(halves), 3, directory=tmp_path) as kept:
        assert isinstance(kept, DiskMatrix) and kept.path.parent == tmp_path
        np.testing.assert_array_equal(kept.to_memory(), expected)
        with kept.store(iter(halves), 3, directory=tmp_path) as again:
            assert isinstance(again, DiskMatrix) and again.path != kept.path
        path = kept.path
    assert not path.exists()


def test_rows_of_a_backed_file_are_transformed_to_a_temporary_file(both_containers, tmp_path):
    synthetic, backed = both_containers["memory"], both_containers["backed"]
    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=100)
    expected = transform(synthetic.X, synthetic.var_names, state)
    with transform_rows(as_rows(synthetic.X), synthetic.var_names, state) as in_memory:
        assert isinstance(in_memory, InMemoryRows)
        np.testing.assert_array_equal(in_memory.matrix, expected)
    with transform_rows(as_rows(backed.X), backed.var_names, state, directory=tmp_path) as x:
        assert isinstance(x, DiskMatrix) and x.shape == expected.shape and x.path.parent == tmp_path
        np.testing.assert_array_equal(np.concatenate([b for _, _, b in x.blocks(70)]), expected)
        picks = np.array([5, 299, 0, 17, 5])
        np.testing.assert_array_equal(x.take(picks), expected[picks])
        path = x.path
    assert not path.exists()  # the temporary file goes with the matrix
    (tmp_path / "short.f32").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="expected 16 for a float32 matrix"):
        DiskMatrix(tmp_path / "short.f32", (2, 2))


def test_training_from_disk_equals_training_in_memory(synthetic, tiny_config, tmp_path):
    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=100)
    x = transform(synthetic.X, synthetic.var_names, state)
    in_memory, history = fit_encoder(x, tiny_config.encoder, tiny_config.train)
    with DiskMatrix.write(as_rows(x).blocks(), x.shape, path=tmp_path / "x.f32") as on_disk:
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
    assert model.history.cells_per_second > 0 and model.training_clusters.centroids is not None
    reference = ContrastiveSC(tiny_config).fit(synthetic)
    _assert_same_state(model.state, reference.state)
    assert len(model.history.loss) == tiny_config.train.epochs

    # The same trained encoder embeds a backed file as it embeds the data in memory.
    expected = model.transform(synthetic)
    np.testing.assert_allclose(model.transform(backed), expected, atol=1e-6)
    model.embed(backed)
    np.testing.assert_allclose(backed.obsm["X_contrastive"], expected, atol=1e-6)
    state = model.state
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
    import contrastive_sc.method.fusion as fusion
    from contrastive_sc.method.config import get_preset

    monkeypatch.setattr(fusion, "PCA_SAMPLE_CELLS", 120)
    config = get_preset("fused").replace(n_genes=100, pca_genes=50, pca_components=8, epochs=2, batch_size=64,
                                         n_clusters=3)
    synthetic, backed = both_containers["memory"], both_containers["backed"]
    from_file = ContrastiveSC(config).fit(backed)
    in_memory = ContrastiveSC(config).fit(synthetic)
    np.testing.assert_allclose(from_file.encoder.pca_components.numpy(), in_memory.encoder.pca_components.numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(from_file.transform(backed), in_memory.transform(synthetic), atol=1e-4)
    everything = ContrastiveSC(config.replace(seed=0))
    monkeypatch.setattr(fusion, "PCA_SAMPLE_CELLS", 10_000)
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
        reference = scanpy_state(adata.X, adata.var_names, n_genes=n_genes, clip=clip)
        blocks_state = fit_preprocess(as_rows(adata.X), adata.var_names, n_genes=n_genes, clip=clip, block_size=1000)
        assert blocks_state.genes == reference.genes
        np.testing.assert_array_equal(transform(adata.X, adata.var_names, blocks_state),
                                      transform(adata.X, adata.var_names, reference))
