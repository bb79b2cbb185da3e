"""The annotation benchmark: its scores, the sanity check, tiny synthetic splits through every path
(in-process methods, a missing file, a tool without an interpreter, one that crashes, one whose
calls fail the check), the command, and one real split."""

import ast
import importlib.util
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from contrastive_sc.benchmarks import annotation_benchmark as bench
from contrastive_sc.benchmarks.annotation_benchmark import (
    SPLITS,
    Split,
    check_calls,
    format_tables,
    run_annotation_benchmark,
    score,
)
from contrastive_sc.cli import main

from .conftest import shared_file

#: The model shrunk for tiny data (the benchmark's `options`): a few seconds per fit.
TINY_MODEL = {"contrastive": {"n_genes": 100, "epochs": 2, "batch_size": 64}}


def test_scores_are_the_studys():
    truth = ["a", "a", "b", "b", "new", "new", "other"]
    called = ["a", "unassigned", "b", "a", "unassigned", "a", "a"]
    confidence = [0.9, 0.2, 0.8, 0.6, 0.1, 0.7, 0.5]
    s = score(truth, called, confidence, held_out="new", known_types={"a", "b"})
    # known cells a, a, b, b: F1(a) = 1/2 (1 right of 2 calls, 1 of 2 cells), F1(b) = 2/3; "other" enters nothing
    assert s["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["held_out_unassigned"] == 0.5 and s["known_unassigned"] == 0.25
    # assigned known cells: right at 0.9 and 0.8, wrong at 0.6
    assert s["auroc"] == 1.0
    assert s["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    without = score(truth, called, None, held_out="new", known_types={"a", "b"})
    assert np.isnan(without["auroc"]) and np.isnan(without["ece"]) and without["macro_f1"] == s["macro_f1"]


def test_sanity_check_rejects_outputs_that_cannot_be_a_tools_answer():
    truth = np.array(["a"] * 30 + ["b"] * 30 + ["new"] * 5)
    known = {"a", "b"}
    assert check_calls(["unassigned"] * 65, None, truth, known)[0] == "all 65 cells unassigned"
    assert "one type (a)" in check_calls(["a"] * 60 + ["unassigned"] * 5, None, truth, known)[0]
    assert "outside the reference" in check_calls(["a"] * 30 + ["c"] * 35, None, truth, known)[0]
    assert "calls for 65" in check_calls(["a", "b"], None, truth, known)[0]
    assert "confidence" in check_calls(list(truth[:60]) + ["a"] * 5, np.full(65, 1.5), truth, known)[0]
    problem, _ = check_calls(["a"] * 30 + ["unassigned"] * 35, np.full(65, 0.5), truth, known)
    assert problem.startswith("one type (a) for every assigned cell of 2 known types")
    problem, warnings = check_calls(["a"] * 29 + ["b"] + ["unassigned"] * 30 + ["b"] * 5, None, truth, known)
    assert problem is None and warnings == []
    problem, warnings = check_calls(["a"] * 30 + ["c"] * 30 + ["a"] * 5, None, truth, {*known, "c"})
    assert problem is None and warnings == ["b (30 cells) never called"]


@pytest.fixture
def data_dir(synthetic, tmp_path):
    """``two.h5ad``: 300 cells, three types (alpha, beta, gamma) over two donors."""
    synthetic.obs["cell_type"] = synthetic.obs["label"].map({0: "alpha", 1: "beta", 2: "gamma"}).astype(str)
    synthetic.obs["donor"] = np.where(np.arange(synthetic.n_obs) % 2, "d1", "d2")
    synthetic.write_h5ad(tmp_path / "two.h5ad")
    return tmp_path


TINY = Split("tiny_d1-d2_gamma", "two.h5ad", "gamma", "donor", ("d1",), ("d2",), label_key="cell_type")


def test_split_keeps_the_held_out_type_out_of_the_reference(data_dir):
    ref, query = TINY.load(data_dir, seed=0)
    assert "gamma" not in set(ref.obs["cell_type"]) and "gamma" in set(query.obs["cell_type"])
    assert set(ref.obs["batch_key"]) == {"d1"} and set(query.obs["batch_key"]) == {"d2"}
    halves = Split("tiny_half_gamma", "two.h5ad", "gamma", label_key="cell_type")
    ref0, query0 = halves.load(data_dir, seed=0)
    ref1, _ = halves.load(data_dir, seed=1)
    assert query0.n_obs == 150 and "gamma" not in set(ref0.obs["cell_type"])
    assert set(ref0.obs_names) != set(ref1.obs_names)  # the split seed is the run's seed
    with pytest.raises(ValueError, match="batches"):
        Split("bad", "two.h5ad", "gamma", "donor", ("d3",), ("d2",), label_key="cell_type").load(data_dir, 0)


def test_every_split_method_and_seed_is_a_row_and_a_skip_says_why(data_dir, tmp_path):
    missing = Split("gone_a-b_x", "gone.h5ad", "x", "batch", ("a",), ("b",))
    out = tmp_path / "rows.csv"
    results = run_annotation_benchmark([TINY, missing], data_dir=data_dir, seeds=[0],
                                       methods=["contrastive", "lr-hvg", "pca-centroid", "celltypist"],
                                       options=TINY_MODEL, out=out)
    assert len(results) == 8 and pd.read_csv(out).shape[0] == 8
    ran = results[results["split"] == TINY.name].set_index("method")
    for method in ("contrastive", "lr-hvg", "pca-centroid"):
        assert ran.loc[method, "status"] == "ok", ran.loc[method, "note"]
        assert ran.loc[method, "macro_f1"] > 0.8 and ran.loc[method, "n_query"] == 150
        assert ran.loc[method, "calls"].count(":") >= 2
    assert ran.loc["celltypist", "status"] == "skipped"
    assert "pass --celltypist-python" in ran.loc["celltypist", "note"]
    assert (results[results["split"] == missing.name]["status"] == "skipped").all()
    text = format_tables(results)
    assert "- celltypist: skipped: no interpreter for CellTypist; pass --celltypist-python PYTHON" in text
    assert "- split gone_a-b_x: skipped: data file gone.h5ad not found" in text
    assert "| tiny_d1-d2_gamma | " in text and "| contrastive | 1/2 |" in text


@pytest.mark.skipif(importlib.util.find_spec("scvi") is not None, reason="scvi-tools is installed here")
def test_a_tool_its_interpreter_cannot_import_is_skipped_with_the_reason(data_dir):
    results = run_annotation_benchmark([TINY], data_dir=data_dir, seeds=[0, 1], methods=["scanvi"],
                                       interpreters={"scanvi": sys.executable})
    assert list(results["status"]) == ["skipped", "skipped"]
    assert results["note"].iloc[0] == f"--scanvi-python {sys.executable}: cannot import scvi: No module named 'scvi'"


FAKE_TOOL = textwrap.dedent("""
    import json, sys
    import numpy as np
    action, tool = sys.argv[1], sys.argv[2]
    if action == "check":
        print(json.dumps({"faketool": "0.1"}))
        sys.exit(0)
    args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    if args["--seed"] == "1":
        raise ValueError("boom on seed 1")
    import anndata as ad
    query = ad.read_h5ad(args["--query"])
    assert set(query.obs.columns) == {"celltype", "batch_key"}
    with open(args["--out"], "wb") as handle:
        np.savez(handle, called=np.full(query.n_obs, "alpha"), confidence=np.full(query.n_obs, 0.9), seconds=1.5)
""")


def test_a_tools_crash_is_a_failed_row_and_its_insane_calls_are_rejected(data_dir, tmp_path, monkeypatch):
    script = tmp_path / "fake_tool.py"
    script.write_text(FAKE_TOOL)
    monkeypatch.setattr(bench, "SCRIPT", script)
    results = run_annotation_benchmark([TINY], data_dir=data_dir, seeds=[0, 1], methods=["ingest"],
                                       interpreters={"ingest": sys.executable})
    rejected, failed = results.iloc[0], results.iloc[1]
    assert rejected["status"] == "rejected" and rejected["note"].startswith("one type (alpha) for every assigned cell")
    assert rejected["seconds"] == 1.5 and rejected["calls"] == "alpha:150"
    assert failed["status"] == "failed" and failed["note"] == "ValueError: boom on seed 1 (exit code 1)"
    text = format_tables(results)
    assert "| tiny_d1-d2_gamma | - |" in text and "0 of 1 runs passed" in text
    assert "- ingest: rejected (tiny_d1-d2_gamma s0): one type (alpha)" in text
    assert "- ingest: failed (tiny_d1-d2_gamma s1): ValueError: boom on seed 1 (exit code 1)" in text


def test_the_external_module_imports_only_the_standard_library_at_the_top():
    tree = ast.parse(open(bench.SCRIPT).read())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= {"__future__", "os", "sys", "argparse", "json", "time", "warnings"}, top
    every = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    every |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("contrastive_sc") for name in every), every
    assert not any(node.level for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))  # no relative import


def test_command_runs_the_named_splits_and_prints_the_tables(synthetic, tmp_path):
    # a stand-in for the Kang file: "B cells" held out, ctrl -> stim
    synthetic.obs["celltype"] = synthetic.obs["label"].map({0: "T cells", 1: "Monocytes", 2: "B cells"}).astype(str)
    synthetic.obs["batch"] = np.where(np.arange(synthetic.n_obs) % 2, "ctrl", "stim")
    synthetic.write_h5ad(tmp_path / SPLITS["kang_ctrl-stim_B"].file)
    out = tmp_path / "annotation.csv"
    args = ["annotation-benchmark", "--splits", "kang_ctrl-stim_B,pbmc3k_half_NK", "--seeds", "1", "--methods",
            "lr-hvg,celltypist", "--data-dir", str(tmp_path), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| kang_ctrl-stim_B | " in result.output and "| pbmc3k_half_NK | - | - |" in result.output
    assert "celltypist: skipped: no interpreter for CellTypist" in result.output
    assert out.read_text().startswith("dataset,method,seed,split,status")
    again = CliRunner().invoke(main, args)  # an earlier output of the command is replaced
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(main, ["annotation-benchmark", "--splits", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "expected a comma-separated list" in bad.output


@pytest.mark.slow
@pytest.mark.realdata
def test_one_real_split_gives_sane_figures():
    data = shared_file(SPLITS["pbmc3k_half_NK"].file).parent
    results = run_annotation_benchmark([SPLITS["pbmc3k_half_NK"]], data_dir=data, seeds=[0],
                                       methods=["contrastive", "lr-hvg", "pca-centroid"]).set_index("method")
    assert (results["status"] == "ok").all(), results["note"]
    assert (results["macro_f1"] > 0.7).all(), results["macro_f1"]
    assert (results["known_unassigned"] < 0.05).all(), results["known_unassigned"]
    # the study's figures for this split and seed: 0.924 / 76.6 % of NK cells unassigned / 0.3 %
    assert results.loc["contrastive", "held_out_unassigned"] > 0.6
    assert results.loc["contrastive", "auroc"] > 0.8
