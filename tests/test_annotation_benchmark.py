"""The annotation benchmark's split and scores, and its command on a small two-batch dataset."""

import numpy as np
import pytest
from click.testing import CliRunner

from contrastive_sc.benchmarks.annotation_benchmark import score_annotation, split_by_batch
from contrastive_sc.cli import main


def test_scores_count_known_types_and_unassigned_shares():
    truth = ["a", "a", "b", "b", "new", "new"]
    called = ["a", "unassigned", "b", "b", "unassigned", "a"]
    scores = score_annotation(truth, called, held_out="new", known_types={"a", "b"})
    assert scores["held_out_unassigned"] == 0.5 and scores["known_unassigned"] == 0.25
    # F1: a = 2*1*0.5/(1+0.5) = 2/3 (the 'new' cell called 'a' is not among the known cells), b = 1
    assert scores["macro_f1_known"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.fixture
def two_batches(synthetic):
    synthetic.obs["cell_type"] = synthetic.obs["label"].map({0: "alpha", 1: "beta", 2: "gamma"}).astype(str)
    synthetic.obs["donor"] = np.where(np.arange(synthetic.n_obs) % 2, "d1", "d2")
    return synthetic


def test_split_keeps_the_held_out_type_out_of_the_reference(two_batches):
    train, test = split_by_batch(two_batches, label_key="cell_type", batch_key="donor", train_batch="d1",
                                 test_batch="d2", held_out="gamma")
    assert "gamma" not in set(train.obs["cell_type"]) and "gamma" in set(test.obs["cell_type"])
    assert set(train.obs["donor"]) == {"d1"} and set(test.obs["donor"]) == {"d2"}
    with pytest.raises(ValueError, match="batch 'd3' not in"):
        split_by_batch(two_batches, label_key="cell_type", batch_key="donor", train_batch="d3", test_batch="d2",
                       held_out=None)


def test_command_writes_a_table(two_batches, tmp_path):
    two_batches.write_h5ad(tmp_path / "two.h5ad")
    result = CliRunner().invoke(main, [
        "annotation-benchmark", "--data", str(tmp_path / "two.h5ad"), "--label-key", "cell_type", "--batch-key",
        "donor", "--train-batch", "d1", "--test-batch", "d2", "--held-out", "gamma", "--methods", "pca-knn",
        "--seeds", "1", "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    assert "pca-knn" in result.output and (tmp_path / "a.csv").read_text().startswith("dataset,method,seed")
