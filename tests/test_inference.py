"""The embed-then-cluster model in process: inputs, params and every bad request."""

import numpy as np
import pandas as pd
import pytest

from contrastive_sc.inference import EmbedThenCluster, PredictParams, package_model


@pytest.fixture(scope="module")
def packaged(_trained_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packaged")
    package_model(_trained_session, folder)
    return EmbedThenCluster.from_dir(folder, provider="cpu")


@pytest.fixture
def frame(synthetic):
    return synthetic.to_df()


def test_reference_matches_the_torch_model(packaged, trained, synthetic, frame):
    out = packaged.predict(frame)
    assert list(out.columns[:3]) == ["cell", "cluster", "gene_coverage"]
    assert out.shape == (synthetic.n_obs, 3 + 60)
    expected = trained.reference_labels(trained.transform(synthetic))
    np.testing.assert_array_equal(out["cluster"].to_numpy(), expected)
    np.testing.assert_allclose(out.filter(like="emb_").to_numpy(), trained.transform(synthetic), atol=1e-5)


def test_any_gene_order_and_extra_genes(packaged, frame):
    shuffled = frame[frame.columns[::-1]].assign(extra_gene=1)
    a = packaged.predict(frame, {"return_embedding": False})
    b = packaged.predict(shuffled, {"return_embedding": False})
    pd.testing.assert_frame_equal(a, b)


def test_methods_and_params(packaged, frame):
    kmeans = packaged.predict(frame, {"method": "kmeans", "n_clusters": 3, "seed": 1})
    assert kmeans["cluster"].nunique() == 3
    leiden = packaged.predict(frame, {"method": "leiden", "resolution": 0.5, "return_embedding": False})
    assert leiden.shape[1] == 3 and leiden["cluster"].nunique() >= 2


def test_tensor_input_is_model_genes_in_order(packaged, frame):
    tensor = frame[list(packaged.state.genes)].to_numpy()
    a = packaged.predict(tensor, {"return_embedding": False})
    b = packaged.predict(frame[list(packaged.state.genes)], {"return_embedding": False})
    np.testing.assert_array_equal(a["cluster"], b["cluster"])


def test_missing_genes_reported_and_threshold(packaged, frame):
    genes = list(packaged.state.genes)
    partial = frame.drop(columns=genes[:30])
    out = packaged.predict(partial, {"return_embedding": False})
    assert out["gene_coverage"].iloc[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"only 20 of the model's 100 genes are in the input"):
        packaged.predict(frame.drop(columns=genes[:80]))
    assert len(packaged.predict(frame.drop(columns=genes[:80]), {"min_coverage": 0.1})) == len(frame)


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.iloc[:0], "empty input"),
    (lambda f: f.assign(**{f.columns[0]: -1.0}), "negative value"),
    (lambda f: f.assign(**{f.columns[0]: np.nan}), "NaN/inf"),
    (lambda f: f.assign(**{f.columns[0]: np.inf}), "NaN/inf"),
    (lambda f: f.assign(**{f.columns[0]: 0.5}), "non-integer"),
    (lambda f: f.assign(**{f.columns[0]: "high"}), "non-numeric column"),
    (lambda f: pd.concat([f, f.iloc[:, :1]], axis=1), "duplicated gene column"),
])
def test_bad_inputs(packaged, frame, mutate, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(mutate(frame))


@pytest.mark.parametrize("params,message", [
    ({"method": "dbscan"}, "unknown method 'dbscan'"),
    ({"method": "kmeans"}, "needs n_clusters"),
    ({"method": "kmeans", "n_clusters": 10_000}, "only 300 cell"),
    ({"flavour": 1}, "unknown parameter"),
    ({"resolution": 0}, "resolution must be > 0"),
])
def test_bad_params(packaged, frame, params, message):
    with pytest.raises(ValueError, match=message):
        packaged.predict(frame, params)


def test_tensor_of_wrong_width(packaged):
    with pytest.raises(ValueError, match=r"\(cells, 100\) raw counts of the model's genes"):
        packaged.predict(np.zeros((3, 7)))


def test_defaults():
    params = PredictParams.from_dict(None)
    assert params.method == "reference" and params.min_coverage == 0.5 and params.return_embedding


def test_serving_path_never_imports_torch(tmp_path, _trained_session):
    import subprocess
    import sys

    package_model(_trained_session, tmp_path)
    code = (
        "import sys, numpy as np\n"
        "from contrastive_sc.inference import EmbedThenCluster\n"
        f"m = EmbedThenCluster.from_dir({str(tmp_path)!r}, provider='cpu')\n"
        "m.predict(np.ones((4, m.state.n_genes)))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
