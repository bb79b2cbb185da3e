"""ONNX export parity and the onnxruntime provider really in use."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contrastive_sc.serve.onnx_io import PARITY_ATOL, OnnxEncoder, export_onnx, parity
from tests.conftest import shared_file


def test_parity_on_random_and_preprocessed_input(trained, synthetic, tmp_path):
    rows = trained.preprocess(synthetic)
    path = export_onnx(trained.encoder, tmp_path / "enc.onnx", check=rows)
    random_rows = np.random.default_rng(1).normal(size=(500, trained.state.n_genes)).astype(np.float32)
    assert parity(trained.encoder, path, random_rows) <= PARITY_ATOL
    assert parity(trained.encoder, path, rows) <= PARITY_ATOL


def test_single_file_dynamic_batch_and_no_dropout(trained, tmp_path):
    import onnx

    path = export_onnx(trained.encoder, tmp_path / "enc.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx"]  # no external data file
    graph = onnx.load(str(path)).graph
    assert all(node.op_type != "Dropout" for node in graph.node)
    session = OnnxEncoder(path, provider="cpu")
    for n in (1, 7, 1000):
        out = session(np.zeros((n, trained.state.n_genes), dtype=np.float32))
        assert out.shape == (n, 60)
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5) or n == 1


def test_reported_provider_is_the_one_in_use(trained, tmp_path):
    path = export_onnx(trained.encoder, tmp_path / "enc.onnx")
    session = OnnxEncoder(path, provider="auto")
    raw = ort.InferenceSession(str(path), providers=session.session.get_providers())
    assert session.providers == raw.get_providers() == session.session.get_providers()
    usable_cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert session.device == ("cuda" if usable_cuda else "cpu")
    if not usable_cuda:
        assert session.providers == ["CPUExecutionProvider"]
        with pytest.raises(RuntimeError, match="CUDA was requested but onnxruntime runs on"):
            OnnxEncoder(path, provider="cuda")


def test_bad_shapes_and_provider(trained, tmp_path):
    path = export_onnx(trained.encoder, tmp_path / "enc.onnx")
    with pytest.raises(ValueError, match=r"expected input of shape \(cells, 100\)"):
        OnnxEncoder(path, provider="cpu")(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="provider must be"):
        OnnxEncoder(path, provider="tpu")


@pytest.mark.realdata
def test_parity_on_real_data(tmp_path):
    from contrastive_sc import ContrastiveSC, read

    adata = read(shared_file("10X_PBMC_top2000.h5"))
    model = ContrastiveSC(epochs=2).fit(adata, clusters=False)
    rows = model.preprocess(adata)
    path = export_onnx(model.encoder, tmp_path / "pbmc.onnx", check=rows)
    assert parity(model.encoder, path, rows) <= PARITY_ATOL


def test_the_session_embeds_an_on_disk_matrix_a_batch_at_a_time(trained, synthetic, tmp_path):
    import anndata as ad

    from contrastive_sc.method.preprocess import transform_rows
    from contrastive_sc.method.rows import as_rows

    session = OnnxEncoder(export_onnx(trained.encoder, tmp_path / "enc.onnx"), provider="cpu")
    expected = session(trained.preprocess(synthetic))
    synthetic.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    with transform_rows(as_rows(backed.X), backed.var_names, trained.state, directory=tmp_path) as on_disk:
        assert type(on_disk).__name__ == "DiskMatrix"
        np.testing.assert_allclose(session(on_disk, batch_size=64), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected input of shape \(cells, 100\), got \(3, 7\)"):
        session(np.zeros((3, 7), dtype=np.float32))
