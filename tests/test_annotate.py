"""Annotated references: cell types with confidence, unseen types unassigned, counts from a layer."""

import numpy as np
import pytest

from contrastive_sc import ContrastiveSC
from contrastive_sc.analysis.annotate import UNASSIGNED, CellTypeAnnotator


@pytest.fixture(scope="module")
def held_back(_synthetic_session, tiny_config):
    """A model trained with labels on groups 0 and 1 of ``synthetic``; group 2 is never seen."""
    adata = _synthetic_session.copy()
    adata.obs["cell_type"] = np.where(adata.obs["label"] == 0, "alpha", np.where(adata.obs["label"] == 1, "beta", "new"))
    train = adata[adata.obs["cell_type"] != "new"].copy()
    model = ContrastiveSC(tiny_config.replace(epochs=10, n_clusters=2)).fit(train, label_key="cell_type")
    return model, adata


def test_unseen_type_is_unassigned_and_known_types_are_named(held_back):
    model, adata = held_back
    model.annotate(adata)
    called, truth = adata.obs["contrastive_cell_type"].astype(str), adata.obs["cell_type"]
    confidence = adata.obs["contrastive_cell_type_confidence"]
    assert confidence.between(0, 1).all()
    known = truth != "new"
    assert (called[known] == truth[known]).mean() >= 0.9
    assert (called[known] == UNASSIGNED).mean() <= 0.1
    assert (called[~known] == UNASSIGNED).mean() >= 0.6
    assert confidence[known].mean() > confidence[~known].mean()


def test_threshold_is_recorded_and_can_be_overridden(held_back):
    model, adata = held_back
    assert model.annotator.min_confidence == 0.0 and model.annotator.label_key == "cell_type"
    pre, embedding = model.preprocess(adata), model.transform(adata)
    _, confidence = model.annotator.annotate(pre, embedding)
    types, _ = model.annotator.annotate(pre, embedding, min_confidence=1.0)
    assert (types == UNASSIGNED).mean() >= (confidence < 1.0).mean()  # every call under 1 is unassigned
    with pytest.raises(ValueError, match=r"min_confidence must be a number within \[0, 1\], got nan"):
        model.annotator.annotate(pre, embedding, min_confidence=float("nan"))


def test_few_cells_per_query_skip_the_query_adaptive_steps(held_back):
    from contrastive_sc.analysis.annotate import MIN_QUERY_CELLS

    model, adata = held_back
    few = adata[adata.obs["cell_type"] == "new"][: MIN_QUERY_CELLS - 1]
    types, _ = model.annotator.annotate(model.preprocess(few), model.transform(few))
    assert UNASSIGNED not in set(types)  # an unseen type is recognised among other cells, not alone


def test_annotator_survives_save_and_load(held_back, tmp_path):
    model, adata = held_back
    loaded = ContrastiveSC.load(model.save(tmp_path / "m"))
    a = model.annotator.annotate(model.preprocess(adata), model.transform(adata))
    b = loaded.annotator.annotate(loaded.preprocess(adata), loaded.transform(adata))
    assert (a[0] == b[0]).all() and np.array_equal(a[1], b[1])


def test_the_fit_reports_out_of_fold_figures_and_unseen_type_detection(_synthetic_session, tiny_config):
    adata = _synthetic_session.copy()
    adata.obs["cell_type"] = adata.obs["label"].map({0: "alpha", 1: "beta", 2: "gamma"}).astype(str)
    report = ContrastiveSC(tiny_config.replace(epochs=2)).fit(adata, label_key="cell_type").annotation_report
    assert report["cv_macro_f1"] >= 0.9 and 0 <= report["cv_calibration_error"] <= 0.2
    assert "cv_confidence_auroc" not in report or report["cv_confidence_auroc"] >= 0.5  # none when no call is wrong
    # each type under half of the cells, left out of one half of the reference and sought in the other
    assert report["types_tested"] == 3 and report["held_out_type_unassigned"] >= 0.5
    assert report["known_unassigned"] <= 0.1


def test_the_confidence_is_calibrated_on_held_out_reference_cells():
    from contrastive_sc.analysis.annotate import expected_calibration_error

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=0.6, size=(3, 40))
    labels = np.repeat(["a", "b", "c"], 200)
    pre = centres[np.repeat(np.arange(3), 200)] + rng.normal(size=(600, 40))  # overlapping types: calls can be wrong
    annotator = CellTypeAnnotator(features=("scaled",), C=(1.0,), smooth_alpha=0.0, novelty_z=None)
    annotator.fit(pre, labels, gene_mean=np.zeros(40), gene_std=np.ones(40), target_sum=1e4)
    test = centres[np.repeat(np.arange(3), 300)] + rng.normal(size=(900, 40))
    types, confidence = annotator.annotate(test)
    correct = types == np.repeat(["a", "b", "c"], 300)
    assert 0.5 < correct.mean() < 0.98  # the task is neither trivial nor hopeless
    assert expected_calibration_error(correct, confidence) < 0.08  # confidence ~ the chance a call is right
    assert confidence[correct].mean() > confidence[~correct].mean()


def test_saving_over_a_folder_leaves_no_stale_files(held_back, trained, tmp_path):
    model, _ = held_back
    folder = model.save(tmp_path / "m")
    assert (folder / "cell_types.npz").exists() and (folder / "training_clusters.npy").exists()
    with pytest.raises(FileExistsError, match="holds another saved model .* overwrite=True"):
        trained.save(folder)
    model.save(folder)  # the same model again: allowed
    trained.training_clusters, kept = None, trained.training_clusters
    try:
        trained.save(folder, overwrite=True)
    finally:
        trained.training_clusters = kept
    assert not (folder / "cell_types.npz").exists() and not (folder / "training_clusters.npy").exists()
    loaded = ContrastiveSC.load(folder)
    assert loaded.annotator is None and loaded.training_clusters is None


def test_a_model_without_labels_cannot_annotate(trained, synthetic):
    with pytest.raises(RuntimeError, match="trained without labels"):
        trained.annotate(synthetic)


def test_the_annotator_checks_its_input(caplog):
    rng = np.random.default_rng(0)
    state = {"gene_mean": np.zeros(3), "gene_std": np.ones(3), "target_sum": 1e4}

    def fit(labels):
        return CellTypeAnnotator(features=("scaled",), C=(1.0,)).fit(rng.normal(size=(40, 3)), labels, **state)

    with pytest.raises(ValueError, match="at least 2 cell types"):
        fit(["a"] * 40)
    with pytest.raises(ValueError, match="reserved"):
        fit(["a", UNASSIGNED] * 20)
    with pytest.raises(ValueError, match="one label per cell, got 20 labels for 40 cells"):
        fit(["a", "b"] * 10)
    with caplog.at_level("WARNING"):
        fit(["a"] * 35 + ["b"] * 5)
    assert "fewer than 10 cells" in caplog.text and "'b': 5" in caplog.text


@pytest.mark.parametrize("layer", ["counts", "raw"])
def test_counts_from_a_layer(synthetic, tiny_config, layer):
    import anndata as ad
    import scanpy as sc

    adata = synthetic.copy()
    if layer == "raw":
        adata.raw = ad.AnnData(X=adata.X.copy(), var=adata.var.copy())
    else:
        adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)  # X now holds log-normalised values, as after a scanpy workflow
    with pytest.raises(ValueError, match="non-integer value.*Pass the raw counts"):
        ContrastiveSC(tiny_config).fit(adata)
    model = ContrastiveSC(tiny_config).fit(adata, layer=layer, label_key="label")
    direct = ContrastiveSC(tiny_config).fit(synthetic.copy(), label_key="label")
    assert np.allclose(model.transform(synthetic, layer=None), direct.transform(synthetic), atol=1e-5)
    with pytest.raises(KeyError, match="layer 'spliced' not found"):
        ContrastiveSC(tiny_config).fit(adata, layer="spliced")


def test_train_command_reads_counts_from_a_layer(synthetic, tmp_path):
    import scanpy as sc
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    adata = synthetic.copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    common = ["train", "--data", str(tmp_path / "normalised.h5ad"), "--epochs", "1", "--n-genes", "50", "--no-map",
              "--cluster", "kmeans", "--label-key", "label", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    refused = CliRunner().invoke(main, common)
    assert refused.exit_code == 2 and "non-integer value" in refused.output and "Traceback" not in refused.output
    done = CliRunner().invoke(main, [*common, "--layer", "counts"])
    assert done.exit_code == 0, done.output
    missing = CliRunner().invoke(main, [*common, "--layer", "spliced"])
    assert missing.exit_code == 2 and "layer 'spliced' not found; this AnnData has layers ['counts']" in missing.output


def test_checkpoint_carries_its_architecture_genes_and_model_id(trained, synthetic, tiny_config, tmp_path):
    import shutil

    import torch

    folder = trained.save(tmp_path / "m")
    checkpoint = torch.load(folder / "encoder.pt", weights_only=True)
    assert checkpoint["init_args"]["layers"] == list(trained.config.encoder.layers)
    assert checkpoint["init_args"]["n_inputs"] == 100 and checkpoint["genes"] == list(trained.state.genes)
    assert checkpoint["model_id"] == trained.model_id
    # the architecture comes from the checkpoint alone: a config.json edited by hand changes nothing
    other = ContrastiveSC(tiny_config.replace(n_genes=90)).fit(synthetic.copy())
    other_folder = other.save(tmp_path / "other")
    shutil.copyfile(other_folder / "preprocess_state.json", folder / "preprocess_state.json")
    with pytest.raises(ValueError, match="preprocess_state.json does not match manifest.json"):
        ContrastiveSC.load(folder)
    with pytest.raises(ValueError, match="reads other genes than preprocess_state.json lists; the folder mixes two"):
        ContrastiveSC.load(folder, check_files=False)  # without the manifest, the checkpoint's genes still tell


def test_well_matched_populations_are_not_read_as_new_types():
    # every query population matches its reference type almost equally well: nothing is new
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=3.0, size=(3, 30))
    labels = np.repeat(["a", "b", "c"], 100)
    reference = centres[np.repeat(np.arange(3), 100)] + 0.05 * rng.normal(size=(300, 30))
    query = centres[np.repeat(np.arange(3), [150, 100, 50])] + 0.05 * rng.normal(size=(300, 30))
    annotator = CellTypeAnnotator(features=("scaled",), C=(1.0,))
    annotator.fit(reference, labels, gene_mean=np.zeros(30), gene_std=np.ones(30), target_sum=1e4)
    types, _ = annotator.annotate(query)
    assert UNASSIGNED not in set(types)
    assert (types == np.repeat(["a", "b", "c"], [150, 100, 50])).all()
