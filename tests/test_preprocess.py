import numpy as np
import pytest
import scipy.sparse as sp

from contrastive_sc.method.preprocess import PreprocessState, fit_preprocess, gene_coverage, transform
from contrastive_sc.method.rows import as_rows


@pytest.fixture
def state(synthetic):
    return fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=100)


def test_state_contents(state, synthetic):
    assert state.n_genes == 100
    assert len(state.mean) == len(state.std) == 100
    totals = np.asarray(synthetic.X.sum(axis=1)).ravel()
    assert state.target_sum == pytest.approx(np.median(totals))
    assert sum(state.library_share) == pytest.approx(1.0)
    # genes keep their input order
    order = [list(synthetic.var_names).index(g) for g in state.genes]
    assert order == sorted(order)


def test_matches_scanpy_pipeline(synthetic):
    import scanpy as sc

    ref = synthetic.copy()
    sc.pp.filter_genes(ref, min_cells=2)
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=100, flavor="seurat", subset=True)
    sc.pp.scale(ref)
    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=100)
    assert list(state.genes) == list(ref.var_names)
    ours = transform(synthetic.X, synthetic.var_names, state)
    np.testing.assert_allclose(ours, ref.X, atol=1e-4)


def test_drops_genes_seen_in_one_cell(synthetic):
    counts = synthetic.X.toarray()
    counts[:, 0] = 0
    counts[0, 0] = 5  # gene 0 is seen in one cell only
    state = fit_preprocess(as_rows(counts), synthetic.var_names, n_genes="all")
    assert synthetic.var_names[0] not in state.library_genes
    assert synthetic.var_names[0] not in state.genes


def test_json_round_trip(state, tmp_path):
    path = tmp_path / "state.json"
    state.to_json(path)
    assert PreprocessState.from_json(path) == state
    assert PreprocessState.from_json(state.to_json()) == state


def test_identical_transform_on_reordered_genes(state, synthetic, rng):
    expected = transform(synthetic.X, synthetic.var_names, state)
    perm = rng.permutation(synthetic.n_vars)
    shuffled = transform(synthetic.X[:, perm], synthetic.var_names[perm], state)
    np.testing.assert_array_equal(expected, shuffled)
    dense = transform(synthetic.X.toarray(), synthetic.var_names, state)
    np.testing.assert_allclose(expected, dense, atol=1e-6)


def test_partial_genes_missing_are_zero_and_reported(state, synthetic):
    expected = transform(synthetic.X, synthetic.var_names, state)
    dropped = set(state.genes[:10])
    keep = np.array([g not in dropped for g in synthetic.var_names])
    partial = transform(synthetic.X[:, keep], synthetic.var_names[keep], state)
    missing_cols = [state.genes.index(g) for g in dropped]
    assert np.all(partial[:, missing_cols] == 0)
    present_cols = [j for j in range(state.n_genes) if j not in missing_cols]
    # library sizes are rescaled by the share of counts the remaining genes carried
    corr = np.corrcoef(partial[:, present_cols].ravel(), expected[:, present_cols].ravel())[0, 1]
    assert corr > 0.99
    coverage = gene_coverage(synthetic.var_names[keep], state)
    assert coverage.n_found == state.n_genes - 10
    assert set(coverage.missing) == dropped


def test_model_genes_only_input_uses_expected_library_size(state, synthetic):
    # A caller that sends only the model's genes gets library sizes estimated from their share.
    cols = [list(synthetic.var_names).index(g) for g in state.genes]
    only_model = transform(synthetic.X[:, cols], np.asarray(state.genes), state)
    full = transform(synthetic.X, synthetic.var_names, state)
    assert np.corrcoef(only_model.ravel(), full.ravel())[0, 1] > 0.95


def test_extra_unknown_genes_are_ignored(state, synthetic):
    extra = sp.hstack([synthetic.X, sp.csr_matrix(np.ones((synthetic.n_obs, 2)))]).tocsr()
    names = np.concatenate([synthetic.var_names, ["unknown_a", "unknown_b"]])
    np.testing.assert_array_equal(transform(extra, names, state), transform(synthetic.X, synthetic.var_names, state))


def test_no_shared_genes_is_an_error(state):
    with pytest.raises(ValueError, match="none of the 3 input genes"):
        transform(np.ones((2, 3)), ["x", "y", "z"], state)


def test_clip(synthetic):
    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=50, clip=1.5)
    out = transform(synthetic.X, synthetic.var_names, state)
    assert out.max() <= 1.5 and out.min() >= -1.5


def test_sparse_input_in_any_layout_equals_the_dense_input(state, synthetic):
    # The sparse path scatters the stored entries of the model's columns: columns in another
    # order, a subset of them, rows whose entries are unsorted and repeated entries (summed, as
    # scipy reads them) give exactly what the same counts give as a dense array.
    dense = synthetic.X.toarray()
    names = np.asarray(synthetic.var_names)
    rng = np.random.default_rng(0)
    perm = rng.permutation(dense.shape[1])
    subset = np.sort(rng.choice(dense.shape[1], dense.shape[1] - 40, replace=False))
    for counts, genes in ((dense, names), (dense[:, perm], names[perm]), (dense[:, subset], names[subset])):
        np.testing.assert_array_equal(transform(sp.csr_matrix(counts), genes, state), transform(counts, genes, state))
    unsorted = sp.csr_matrix(dense)
    first = slice(unsorted.indptr[0], unsorted.indptr[1])
    unsorted.indices[first], unsorted.data[first] = unsorted.indices[first][::-1].copy(), unsorted.data[first][::-1].copy()
    unsorted.has_sorted_indices = False
    coo = sp.coo_matrix(dense)
    j = int(coo.col[0])
    repeated = sp.coo_matrix((np.r_[coo.data, 1, 2], (np.r_[coo.row, 0, 0], np.r_[coo.col, j, j])), shape=dense.shape)
    plus = dense.copy()
    plus[0, j] += 3
    np.testing.assert_array_equal(transform(unsorted, names, state), transform(dense, names, state))
    np.testing.assert_array_equal(transform(repeated, names, state), transform(plus, names, state))
