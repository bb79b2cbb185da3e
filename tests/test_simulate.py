"""Tests for the Splat count simulator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from contrastive_sc.method.simulate import (
    SimulatedCounts,
    SplatParams,
    balanced_grid,
    grid_name,
    imbalanced_grid,
    imbalanced_group_prob,
    simulate_splat,
)

SMALL = {"n_cells": 200, "n_genes": 300}


def test_same_seed_gives_identical_counts():
    a = simulate_splat(seed=3, **SMALL)
    b = simulate_splat(SplatParams(seed=3, **SMALL))
    assert a.counts.dtype == np.int64
    assert a.groups.dtype == np.int64
    assert a.counts.shape == (200, 300)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert a.dropout_rate == b.dropout_rate


def test_different_seed_gives_different_counts():
    a = simulate_splat(seed=0, **SMALL)
    b = simulate_splat(seed=1, **SMALL)
    assert not np.array_equal(a.counts, b.counts)


def test_chunk_size_does_not_change_result():
    a = simulate_splat(seed=5, chunk_size=7, **SMALL)
    b = simulate_splat(seed=5, **SMALL)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_dropout_rate_increases_with_dropout_mid():
    results = [simulate_splat(dropout_mid=mid, seed=2, **SMALL) for mid in (-1, 0, 1, 1.5)]
    rates = [r.dropout_rate for r in results]
    sparsity = [r.sparsity for r in results]
    assert all(lo < hi for lo, hi in zip(rates, rates[1:], strict=False)), rates
    assert all(lo < hi for lo, hi in zip(sparsity, sparsity[1:], strict=False)), sparsity
    # dropout only removes counts: the zeros are those of the true counts plus the dropped ones
    none = simulate_splat(dropout_type="none", seed=2, **SMALL)
    assert none.dropout_rate == 0.0
    for r in results:
        assert r.sparsity == pytest.approx(none.sparsity + r.dropout_rate)
        assert np.all(r.counts <= none.counts)


def test_group_structure_is_recoverable():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    sim = simulate_splat(n_cells=400, n_genes=1000, de_fac_scale=0.4, dropout_type="none", seed=0)
    counts = sim.counts.astype(np.float64)
    x = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    z = PCA(n_components=20, random_state=0).fit_transform(x)
    labels = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(sim.groups, labels) > 0.9


def test_groups_follow_group_prob():
    sim = simulate_splat(n_cells=4000, n_genes=50, group_prob=(0.7, 0.2, 0.1), seed=0)
    freq = np.bincount(sim.groups, minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("n_groups", [2, 4, 8, 16])
def test_imbalanced_group_prob_rule(n_groups):
    probs = np.array(imbalanced_group_prob(n_groups))
    assert len(probs) == n_groups
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    # geometric from 0.6 to 0.01, then renormalised: constant ratio, extremes 60x apart
    ratios = probs[1:] / probs[:-1]
    np.testing.assert_allclose(ratios, (0.01 / 0.6) ** (1 / (n_groups - 1)))
    assert probs[0] / probs[-1] == pytest.approx(60.0)


def test_grids():
    balanced, imbalanced = balanced_grid(), imbalanced_grid()
    assert len(balanced) == 12
    assert len(imbalanced) == 12
    for p in balanced:
        assert p.n_genes == 2500
        assert p.n_cells == 250 * p.n_groups
        assert p.de_fac_scale == 0.2
        assert p.dropout_type == "experiment"
        np.testing.assert_allclose(p.group_prob, 1.0 / p.n_groups)
    for p in imbalanced:
        assert (p.n_cells, p.n_genes, p.de_fac_scale) == (3000, 2500, 0.2)
        assert p.group_prob == imbalanced_group_prob(p.n_groups)
        assert sum(p.group_prob) == pytest.approx(1.0)
    for grid in (balanced, imbalanced):
        combos = {(p.n_groups, p.dropout_mid) for p in grid}
        assert combos == {(g, m) for g in (4, 8, 16) for m in (-1.0, 0.0, 1.0, 1.5)}

    names = [grid_name(p) for p in balanced + imbalanced]
    assert len(set(names)) == 24
    assert grid_name(balanced[3]) == "balanced-g4-dm1.5"
    assert grid_name(imbalanced[4]) == "imbalanced-g8-dm-1"
    assert all(n.replace("-", "").replace(".", "").isalnum() for n in names)
    nodrop = dataclasses.replace(balanced[0], dropout_type="none")
    assert grid_name(nodrop) == "balanced-g4-nodrop"


def test_to_anndata(tmp_path):
    import scipy.sparse as sp

    sim = simulate_splat(n_cells=60, n_genes=40, group_prob=(0.5, 0.3, 0.2), seed=4)
    assert isinstance(sim, SimulatedCounts)
    adata = sim.to_anndata()
    assert adata.shape == (60, 40)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), sim.counts)
    np.testing.assert_array_equal(adata.obs["label"].to_numpy(), sim.groups)
    assert list(adata.obs["group"].cat.categories) == ["Group1", "Group2", "Group3"]
    assert (adata.obs["group"].astype(str) == [f"Group{g + 1}" for g in sim.groups]).all()
    assert adata.obs_names[0] == "Cell1" and adata.var_names[-1] == "Gene40"
    info = adata.uns["simulation"]
    assert info["dropout_rate"] == sim.dropout_rate
    assert info["sparsity"] == sim.sparsity
    assert info["seed"] == 4 and info["n_genes"] == 40
    assert info["group_prob"] == [0.5, 0.3, 0.2]
    # uns must survive the h5ad round trip the rest of the package relies on
    adata.write_h5ad(tmp_path / "sim.h5ad")


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_genes": -5}, "n_genes"),
        ({"n_cells": 2.5}, "n_cells"),
        ({"group_prob": (0.5, 0.4)}, "group_prob"),
        ({"group_prob": (1.2, -0.2)}, "group_prob"),
        ({"group_prob": ()}, "group_prob"),
        ({"dropout_type": "batch"}, "dropout_type"),
        ({"mean_shape": 0.0}, "mean_shape"),
        ({"lib_scale": -1.0}, "lib_scale"),
        ({"de_prob": 1.5}, "de_prob"),
        ({"bcv_df": 0.0}, "bcv_df"),
        ({"dropout_mid": float("nan")}, "dropout_mid"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_params_raise(overrides, name):
    with pytest.raises(ValueError, match=name):
        SplatParams(**overrides)
    with pytest.raises(ValueError, match=name):
        simulate_splat(**overrides)


def test_group_prob_tolerance_and_unknown_override():
    p = SplatParams(group_prob=[1 / 3, 1 / 3, 1 / 3 + 5e-7])
    assert isinstance(p.group_prob, tuple)
    with pytest.raises(TypeError, match="n_cell"):
        simulate_splat(n_cell=10)
