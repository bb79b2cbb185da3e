"""A packaged (served) or saved model is one unit: every file is bound by the manifest's digests and
carries the model's id, so a changed, swapped, removed or added file is refused by name."""

import json
import shutil

import numpy as np
import pytest

from contrastive_sc import ContrastiveSC
from contrastive_sc.serve.inference import ArtifactError, EmbedThenCluster, package_model


@pytest.fixture(scope="module")
def two_models(_synthetic_session, tiny_config):
    """Two models with labels trained on the same data with the same shapes (seeds 0 and 1), and one without labels."""
    first = ContrastiveSC(tiny_config.replace(seed=0)).fit(_synthetic_session.copy(), label_key="label")
    second = ContrastiveSC(tiny_config.replace(seed=1)).fit(_synthetic_session.copy(), label_key="label")
    plain = ContrastiveSC(tiny_config.replace(seed=2)).fit(_synthetic_session.copy())
    return first, second, plain


@pytest.fixture
def packaged_pair(two_models, tmp_path):
    first, second, plain = two_models
    folders = {}
    for name, model in (("first", first), ("second", second), ("plain", plain)):
        folders[name] = tmp_path / name
        package_model(model, folders[name])
    return folders


def _edit_state(folder, change):
    path = folder / "preprocess_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _swap_two_genes(state):
    state["genes"][0], state["genes"][1] = state["genes"][1], state["genes"][0]


TAMPERING = {
    "encoder of another model with the same shapes": (
        lambda f: shutil.copyfile(f["second"] / "encoder.onnx", f["first"] / "encoder.onnx"), "encoder.onnx"),
    "gene list reversed": (lambda f: _edit_state(f["first"], lambda s: s["genes"].reverse()), "preprocess_state.json"),
    "two genes swapped": (lambda f: _edit_state(f["first"], _swap_two_genes), "preprocess_state.json"),
    "means x3": (lambda f: _edit_state(f["first"], lambda s: s.update(mean=[3 * m for m in s["mean"]])),
                 "preprocess_state.json"),
    "target_sum x10": (lambda f: _edit_state(f["first"], lambda s: s.update(target_sum=10 * s["target_sum"])),
                       "preprocess_state.json"),
    "cell types of another model": (
        lambda f: shutil.copyfile(f["second"] / "cell_types.npz", f["first"] / "cell_types.npz"), "cell_types.npz"),
    "cell types deleted": (lambda f: (f["first"] / "cell_types.npz").unlink(), "cell_types.npz"),
    "cell types added to a model without labels": (
        lambda f: shutil.copyfile(f["first"] / "cell_types.npz", f["plain"] / "cell_types.npz"), "cell_types.npz"),
    "centroids of another model": (
        lambda f: shutil.copyfile(f["second"] / "training_clusters.npz", f["first"] / "training_clusters.npz"),
        "training_clusters.npz"),
    "model_info edited": (lambda f: (f["first"] / "model_info.json").write_text("{}"), "model_info.json"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_package_is_refused_naming_the_file(packaged_pair, case):
    tamper, name = TAMPERING[case]
    tamper(packaged_pair)
    target = packaged_pair["plain" if "without labels" in case else "first"]
    with pytest.raises(ArtifactError, match=rf"^{name}"):
        EmbedThenCluster.from_dir(target, provider="cpu")


def test_an_untouched_package_loads_and_names_cells(packaged_pair, two_models, _synthetic_session):
    served = EmbedThenCluster.from_dir(packaged_pair["first"], provider="cpu")
    first = two_models[0]
    assert served.model_id == first.model_id
    frame = _synthetic_session.to_df()
    out = served.predict(frame, {"return_embedding": False})
    expected = first.annotate(_synthetic_session.copy(), copy=True).obs["contrastive_cell_type"].astype(str)
    np.testing.assert_array_equal(out["cell_type"].to_numpy(), expected.to_numpy())


def test_a_manifest_rewritten_over_another_models_file_is_still_refused_by_its_model_id(packaged_pair):
    from contrastive_sc.method.manifest import write_manifest

    folder = packaged_pair["first"]
    shutil.copyfile(packaged_pair["second"] / "encoder.onnx", folder / "encoder.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, list(manifest["files"]), manifest["model_id"])
    with pytest.raises(ArtifactError, match="encoder.onnx belongs to model .*, not to model"):
        EmbedThenCluster.from_dir(folder, provider="cpu")


@pytest.mark.parametrize("case", ["weights", "state", "cell types", "clusters added"])
def test_a_tampered_saved_model_is_refused(two_models, tmp_path, case):
    first, second, plain = two_models
    a, b, c = first.save(tmp_path / "a"), second.save(tmp_path / "b"), plain.save(tmp_path / "c")
    if case == "weights":
        shutil.copyfile(b / "encoder.pt", a / "encoder.pt")
        name = "encoder.pt"
    elif case == "state":
        _edit_state(a, lambda s: s.update(target_sum=10 * s["target_sum"]))
        name = "preprocess_state.json"
    elif case == "cell types":
        (a / "cell_types.npz").unlink()
        name = "cell_types.npz"
    else:
        shutil.copyfile(a / "cell_types.npz", c / "cell_types.npz")
        a, name = c, "cell_types.npz"
    with pytest.raises(ValueError, match=name):
        ContrastiveSC.load(a)
