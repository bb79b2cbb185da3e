"""``input_projection``: the encoder reads each masked view through the PCA block's own PCA."""

import json

import numpy as np
import pytest
import torch

from contrastive_sc import ContrastiveSC
from contrastive_sc.method.augment import MaskedViews
from contrastive_sc.method.config import EncoderConfig, TrainConfig, get_preset
from contrastive_sc.method.encoder import ContrastiveEncoder
from contrastive_sc.method.train import fit_encoder


def _tiny(preset: str, **overrides):
    return get_preset(preset).replace(**{"n_genes": 100, "pca_genes": 50, "pca_components": 8, "epochs": 2,
                                         "batch_size": 64, "n_clusters": 3, **overrides})


@pytest.fixture(scope="module", params=["pca-frozen", "pca-init"])
def projected(request, _synthetic_session):
    preset = {"pca-frozen": "pcres-cc-pcfrozen", "pca-init": "pcres-cc-pcinit"}[request.param]
    return ContrastiveSC(_tiny(preset)).fit(_synthetic_session.copy())


def _pca_weight(fused) -> tuple[torch.Tensor, torch.Tensor]:
    # The PCA block's transform as one Linear layer over all input genes: (weight, bias).
    weight = torch.zeros(fused.pca_components.shape[0], fused.n_inputs)
    weight[:, fused.pca_index] = fused.pca_components
    return weight, -(fused.pca_components @ fused.pca_mean)


def test_the_presets_are_pcres_cc_with_the_projection():
    base = get_preset("pcres-cc").to_params()
    for name, projection in [("pcres-cc-pcfrozen", "pca-frozen"), ("pcres-cc-pcinit", "pca-init")]:
        params = get_preset(name).to_params()
        assert {k: (base[k], v) for k, v in params.items() if base[k] != v} == {
            "preset": ("pcres-cc", name), "input_projection": ("none", projection)}
    assert get_preset("paper").encoder.input_projection == get_preset("fused").encoder.input_projection == "none"


def test_a_bad_value_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"input_projection must be one of 'none', 'pca-frozen', 'pca-init', got 'pca'"):
        EncoderConfig(input_projection="pca")
    with pytest.raises(ValueError, match="needs pca_components >= 1"):
        EncoderConfig(input_projection="pca-init", pca_components=0)


def test_the_projection_is_the_pca_transform_at_initialisation(rng):
    from sklearn.decomposition import PCA

    x = rng.normal(size=(80, 30)).astype(np.float32)
    index = np.array([3, 0, 7, 12, 29, 5, 18])
    pca = PCA(n_components=4, random_state=0).fit(x[:, index])
    encoder = ContrastiveEncoder(30, (16, 8), projection=4)
    encoder.init_projection(index, pca.mean_, pca.components_, trainable=False)
    with torch.no_grad():
        projected = encoder.projection(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(projected, pca.transform(x[:, index]), atol=1e-5)
    assert not any(p.requires_grad for p in encoder.projection.parameters())
    assert [m.in_features for m in encoder.linears] == [4, 16] and encoder.n_inputs == 30
    with pytest.raises(ValueError, match="takes 4 components of 7 columns"):
        encoder.init_projection(index, pca.mean_, pca.components_[:3], trainable=True)


def test_masked_views_go_through_the_projection_as_dense_ones():
    torch.manual_seed(0)
    encoder = ContrastiveEncoder(40, (16, 8), projection=5).train()
    x = np.random.default_rng(2).normal(size=(12, 40)).astype(np.float32)
    views = MaskedViews.sample(x * 10, np.random.default_rng(0), mask_rate=0.9)
    sparse = encoder(views, n_views=2)
    sparse_grads = torch.autograd.grad(sparse.square().sum(), list(encoder.parameters()))
    dense = encoder(views.to_dense(), n_views=2)
    dense_grads = torch.autograd.grad(dense.square().sum(), list(encoder.parameters()))
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_frozen_stays_the_pca_block_and_init_starts_there_and_trains(projected):
    fused = projected.encoder
    weight, bias = _pca_weight(fused)
    projection = fused.encoder.projection
    if projected.config.encoder.input_projection == "pca-frozen":
        assert not projection.weight.requires_grad and not projection.bias.requires_grad
        torch.testing.assert_close(projection.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(projection.bias, bias, atol=1e-5, rtol=0)
    else:
        assert projection.weight.requires_grad
        assert not torch.allclose(projection.weight, weight, atol=1e-4)
        # trained from the PCA, at a small learning rate: still close to it
        assert torch.corrcoef(torch.stack([projection.weight.flatten(), weight.flatten()]))[0, 1] > 0.9


def test_fit_encoder_refuses_a_projection_that_does_not_match_the_setting(rng):
    x = rng.normal(size=(40, 10)).astype(np.float32)
    cfg = TrainConfig(epochs=1, batch_size=20)
    with pytest.raises(ValueError, match="needs the fitted PCA"):
        fit_encoder(x, EncoderConfig(layers=(8, 4), pca_components=3, input_projection="pca-frozen"), cfg)
    with pytest.raises(ValueError, match="takes no projection"):
        fit_encoder(x, EncoderConfig(layers=(8, 4)), cfg, projection=(np.arange(3), np.zeros(3), np.eye(3)))


def test_save_load_round_trip_and_onnx_parity(projected, synthetic, tmp_path):
    from contrastive_sc.serve.onnx_io import OnnxEncoder, export_onnx

    z = projected.transform(synthetic)
    assert z.shape == (synthetic.n_obs, 60 + 8)
    loaded = ContrastiveSC.load(projected.save(tmp_path / "m"))
    assert loaded.config == projected.config
    assert loaded.encoder.encoder.projection.weight.shape == (8, 100)
    np.testing.assert_allclose(loaded.transform(synthetic), z, atol=1e-6)
    path = export_onnx(loaded.encoder, tmp_path / "enc.onnx", check=loaded.preprocess(synthetic))
    np.testing.assert_allclose(OnnxEncoder(path)(loaded.preprocess(synthetic)), z, atol=1e-4)


def test_the_architecture_comes_from_the_checkpoint_alone(projected, synthetic, tmp_path):
    folder = projected.save(tmp_path / "m")
    params = json.loads((folder / "config.json").read_text())
    params["input_projection"] = "none"  # config.json records settings; the checkpoint builds the module
    (folder / "config.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="config.json does not match manifest.json"):
        ContrastiveSC.load(folder)  # an edited file is refused ...
    loaded = ContrastiveSC.load(folder, check_files=False)  # ... and, unchecked, does not change the module
    assert loaded.encoder.encoder.projection.weight.shape == (8, 100)
    np.testing.assert_allclose(loaded.transform(synthetic), projected.transform(synthetic), atol=1e-6)
