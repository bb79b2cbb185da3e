"""--out never destroys a file that the command did not write."""

import pytest

from contrastive_sc.mlops.outputs import check_output


def test_new_path_and_earlier_outputs_are_writable(tmp_path, synthetic, trained):
    from contrastive_sc.serve.onnx_io import export_onnx

    assert check_output(tmp_path / "new.h5ad", "h5ad") == tmp_path / "new.h5ad"
    synthetic.uns["contrastive_reference"] = {"model_uri": "models:/m@champion"}
    synthetic.write_h5ad(tmp_path / "earlier.h5ad")
    check_output(tmp_path / "earlier.h5ad", "h5ad")
    (tmp_path / "b.csv").write_text("dataset,method,seed,ari\nx,pca50-kmeans,0,0.5\n")
    check_output(tmp_path / "b.csv", "csv")
    export_onnx(trained.encoder, tmp_path / "e.onnx")
    check_output(tmp_path / "e.onnx", "onnx")


@pytest.mark.parametrize("kind", ["h5ad", "csv", "onnx"])
def test_a_foreign_file_is_refused_unless_overwrite(tmp_path, synthetic, kind):
    path = tmp_path / f"users.{kind}"
    if kind == "h5ad":
        synthetic.write_h5ad(path)  # an AnnData, but not one that embed wrote
    else:
        path.write_text("name,value\nprecious,1\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite .* pass --overwrite"):
        check_output(path, kind)
    assert check_output(path, kind, overwrite=True) == path


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(FileExistsError, match="is a folder"):
        check_output(tmp_path, "csv", overwrite=True)
