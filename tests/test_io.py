import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from contrastive_sc.method.io import load, open_dataset, read

COUNTS = np.array([[1, 0, 3, 2], [0, 2, 1, 0], [4, 1, 0, 1]], dtype=np.float32)
GENES = ["GeneA", "GeneB", "GeneC", "GeneD"]
CELLS = ["c1", "c2", "c3"]


def _check(adata):
    assert adata.shape == (3, 4)
    np.testing.assert_array_equal(adata.X.toarray() if sp.issparse(adata.X) else adata.X, COUNTS)


def test_h5ad(tmp_path):
    path = tmp_path / "x.h5ad"
    a = ad.AnnData(X=sp.csr_matrix(COUNTS))
    a.var_names, a.obs_names = GENES, CELLS
    a.obs["cell_type"] = ["t", "b", "t"]
    a.write_h5ad(path)
    adata = read(path, label_key="cell_type")
    _check(adata)
    assert list(adata.obs["cell_type"]) == ["t", "b", "t"]
    assert adata.uns["dataset"]["name"] == "x"


def test_benchmark_h5(tmp_path):
    path = tmp_path / "bench.h5"
    with h5py.File(path, "w") as f:
        f["X"] = COUNTS
        f["Y"] = np.array([1.0, 2.0, 1.0])
    adata = read(path)
    _check(adata)
    assert list(adata.obs["label"]) == [1, 2, 1]


def _write_10x_h5(path):
    m = sp.csc_matrix(COUNTS.T.astype(np.int32))  # 10x stores genes x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape)
        g["barcodes"] = np.array(CELLS, dtype="S")
        feat = g.create_group("features")
        feat["id"] = np.array([f"ENSG{i}" for i in range(4)], dtype="S")
        feat["name"] = np.array(GENES, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * 4, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * 4, dtype="S")


def test_10x_h5(tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_h5(path)
    adata = read(path)
    _check(adata)
    assert list(adata.var_names) == GENES


def test_10x_mtx_folder(tmp_path):
    folder = tmp_path / "mtx"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(COUNTS.T.astype(np.int64)))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.writelines(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(GENES))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.writelines(f"{c}\n" for c in CELLS)
    adata = read(folder)
    _check(adata)
    assert list(adata.var_names) == GENES


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_tables_with_label_column(tmp_path, suffix, sep):
    table = pd.DataFrame(COUNTS, index=CELLS, columns=GENES)
    table.insert(0, "celltype", ["t", "b", "t"])
    path = tmp_path / f"counts{suffix}"
    table.to_csv(path, sep=sep)
    adata = read(path, label_key="celltype")
    _check(adata)
    assert list(adata.var_names) == GENES
    assert list(adata.obs["celltype"]) == ["t", "b", "t"]


def _csv(tmp_path, counts, genes=GENES):
    path = tmp_path / "bad.csv"
    pd.DataFrame(counts, index=[f"c{i}" for i in range(len(counts))], columns=genes).to_csv(path)
    return path


@pytest.mark.parametrize("value,message", [
    (-1.0, "negative value"),
    (np.nan, r"missing \(null/NaN\) value"),
    (np.inf, "infinite value"),
    (0.5, "non-integer value"),
])
def test_bad_values(tmp_path, value, message):
    counts = COUNTS.copy()
    counts[1, 1] = value
    with pytest.raises(ValueError, match=message):
        read(_csv(tmp_path, counts))


def test_empty_matrix(tmp_path):
    path = tmp_path / "empty.csv"
    pd.DataFrame(columns=GENES).rename_axis("cell").to_csv(path)
    with pytest.raises(ValueError, match="empty count matrix"):
        read(path)


def test_duplicated_genes_in_table(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("cell,GeneA,GeneA,GeneB\nc1,1,2,3\nc2,0,1,1\n")
    with pytest.raises(ValueError, match="duplicated gene column"):
        read(path)


def test_duplicated_genes_in_h5ad(tmp_path):
    a = ad.AnnData(X=sp.csr_matrix(COUNTS))
    a.var_names = ["A", "A", "B", "C"]
    path = tmp_path / "dup.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match="duplicated gene name"):
        read(path)


def test_missing_label_key(tmp_path):
    with pytest.raises(KeyError, match="label key 'cell_type' not found"):
        read(_csv(tmp_path, COUNTS), label_key="cell_type")


def test_non_numeric_column(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("cell,GeneA,kind\nc1,1,x\nc2,0,y\n")
    with pytest.raises(ValueError, match="not numeric"):
        read(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read(tmp_path / "nope.h5ad")
    other = tmp_path / "data.xlsx"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported input"):
        read(other)


def test_open_dataset_hands_over_the_file_as_stored_for_the_model_to_check(tmp_path):
    # `train` opens the file and leaves the layer and the raw-count check to the model's data setup
    path = tmp_path / "x.h5ad"
    a = ad.AnnData(X=np.log1p(COUNTS))
    a.var_names, a.obs_names = GENES, CELLS
    a.layers["counts"] = sp.csr_matrix(COUNTS)
    a.write_h5ad(path)
    opened = open_dataset(path)
    np.testing.assert_allclose(opened.X, np.log1p(COUNTS))
    assert "counts" in opened.layers and opened.uns["dataset"]["name"] == "x"
    with pytest.raises(ValueError, match="raw counts"):
        load(path)
    _check(load(path, layer="counts"))
    with pytest.raises(KeyError, match="label key 'cell_type' not found"):
        open_dataset(path, label_key="cell_type")
