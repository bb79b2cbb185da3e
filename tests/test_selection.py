import h5py
import pandas as pd
import pytest
from click.testing import CliRunner

from contrastive_sc.benchmarks.selection import (
    CACHE_COLUMNS,
    code_id,
    lodo,
    read_cache,
    report,
    run_missing,
    within_tolerance,
)
from contrastive_sc.cli import main


def _table(scores: dict[str, dict[str, list[float]]], classes=5) -> pd.DataFrame:
    """Runs from {dataset: {method: [ari per seed]}}; every method finds `classes` clusters."""
    rows = [{"dataset": d, "method": m, "seed": s, "ari": a, "n_clusters": classes, "n_classes": classes}
            for d, per in scores.items() for m, aris in per.items() for s, a in enumerate(aris)]
    return pd.DataFrame(rows)


# A is best on average, but B wins on d1 and d2 by a lot: holding out d3 leaves d1, d2, d4,
# where B's mean (0.6) beats A's (0.5667); holding out any other file A's mean is higher.
HAND = _table({
    "d1": {"A": [0.5, 0.5], "B": [0.8, 0.8], "C": [0.1, 0.1]},
    "d2": {"A": [0.6, 0.6], "B": [0.9, 0.9], "C": [0.1, 0.1]},
    "d3": {"A": [0.9, 0.9], "B": [0.0, 0.2], "C": [0.95, 0.95]},
    "d4": {"A": [0.6, 0.6], "B": [0.1, 0.1], "C": [0.1, 0.1]},
})


def test_lodo_choice_is_made_without_the_held_out_file():
    # means over seeds: A .5 .6 .9 .6, B .8 .9 .1 .1, C .1 .1 .95 .1
    choice = lodo(HAND, ["A", "B", "C"]).set_index("dataset")
    # held out d1: A (.7) vs B (.367) -> A; d2: A (.667) vs B (.333) -> A;
    # d3: A (.567) vs B (.6) -> B; d4: A (.667) vs B (.6) -> A
    assert choice["chosen"].to_dict() == {"d1": "A", "d2": "A", "d3": "B", "d4": "A"}
    assert choice["heldout"].to_dict() == pytest.approx({"d1": 0.5, "d2": 0.6, "d3": 0.1, "d4": 0.6})
    assert (choice["insample_choice"] == "A").all()  # A .65, B .475, C .3125 over all four
    assert choice["insample"].mean() == pytest.approx(0.65)
    assert choice["heldout"].mean() == pytest.approx(0.45)  # choosing on the test file flatters by .2
    assert choice["oracle_choice"].to_dict() == {"d1": "B", "d2": "B", "d3": "C", "d4": "A"}


def test_lodo_ties_go_to_the_first_candidate():
    tied = _table({"d1": {"X": [0.5], "Y": [0.5]}, "d2": {"X": [0.7], "Y": [0.7]}})
    assert list(lodo(tied, ["Y", "X"])["chosen"]) == ["Y", "Y"]


def test_lodo_refuses_holes_and_a_single_dataset():
    holes = HAND[~((HAND["dataset"] == "d2") & (HAND["method"] == "B"))]
    with pytest.raises(ValueError, match="no ari for \\['d2/B'\\]"):
        lodo(holes, ["A", "B"])
    with pytest.raises(ValueError, match="at least 2 datasets"):
        lodo(HAND[HAND["dataset"] == "d1"], ["A", "B"])


def test_report_counts_wins_over_the_strongest_baseline():
    runs = pd.concat([HAND, _table({"d1": {"P-kmeans": [0.4]}, "d2": {"P-kmeans": [0.7]}, "d3": {"P-kmeans": [0.5]},
                                    "d4": {"P-kmeans": [0.5]}}),
                      _table({"d1": {"Q-kmeans": [0.1]}, "d2": {"Q-kmeans": [0.1]}, "d3": {"Q-kmeans": [0.1]},
                              "d4": {"Q-kmeans": [0.1]}})])
    table, lines = report(runs, ["A", "B", "C"], ["Q-kmeans", "P-kmeans"])
    assert list(table["LODO choice"][:4]) == ["A", "A", "B", "A"]
    assert table.iloc[-1]["LODO ari"] == "0.450"
    # held out .5 .6 .1 .6 against P .4 .7 .5 .5: wins on d1 and d4
    assert "beats the strongest baseline (P-kmeans, mean 0.525) on 2 of 4" in "\n".join(lines)
    assert "(5.0)" in table.iloc[0]["LODO ari"]  # a method that estimates k shows its count


def test_within_tolerance():
    assert within_tolerance(13, 10) and within_tolerance(7, 10) and not within_tolerance(13.1, 10)


@pytest.fixture
def two_files(tmp_path, synthetic):
    paths = []
    for name, cells in (("one", slice(0, 200)), ("two", slice(100, 300))):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f["X"] = synthetic.X[cells].toarray()
            f["Y"] = synthetic.obs["label"].to_numpy()[cells] + 1
        paths.append(path)
    return paths


def test_cache_runs_only_what_is_missing(two_files, tmp_path):
    cache = tmp_path / "runs.csv"
    seen = []
    first = run_missing(two_files, ["pca2-kmeans"], [0, 1], cache, on_row=seen.append)
    assert len(first) == len(seen) == 4
    assert list(read_cache(cache).columns) == CACHE_COLUMNS
    seen.clear()
    both = run_missing(two_files, ["pca2-kmeans", "pca50-kmeans"], [0, 1], cache, on_row=seen.append)
    assert {r["method"] for r in seen} == {"pca50-kmeans"} and len(seen) == 4  # only the new candidate ran
    assert len(both) == 8 and len(read_cache(cache)) == 8
    assert (both["n_classes"] == 3).all()
    pd.testing.assert_frame_equal(both[both["method"] == "pca2-kmeans"].reset_index(drop=True), first)
    # a row recorded under other settings (an edited preset) is ignored and rerun
    frame = read_cache(cache)
    frame.loc[0, "setting"] = "preset:stale"
    frame.to_csv(cache, index=False)
    seen.clear()
    run_missing(two_files, ["pca2-kmeans", "pca50-kmeans"], [0, 1], cache, on_row=seen.append)
    assert [(r["dataset"], r["method"], r["seed"]) for r in seen] == [tuple(frame.loc[0, ["dataset", "method", "seed"]])]


def test_rows_run_by_other_code_are_rerun_unless_any_code(two_files, tmp_path):
    cache = tmp_path / "runs.csv"
    run_missing(two_files, ["pca2-kmeans"], [0], cache)
    frame = read_cache(cache)
    assert (frame["code"] == code_id()).all()
    frame.drop(columns="code").to_csv(cache, index=False)  # a cache from before rows named their code
    seen = []
    reused = run_missing(two_files, ["pca2-kmeans"], [0], cache, on_row=seen.append, any_code=True)
    assert not seen and (reused["code"] == "code:unknown").all()
    _, lines = report(reused, ["pca2-kmeans"], [])
    assert not any("code versions" in line for line in lines)
    rerun = run_missing(two_files, ["pca2-kmeans"], [0], cache, on_row=seen.append)
    assert len(seen) == 2 and (rerun["code"] == code_id()).all()
    assert len(read_cache(cache)) == 4  # the old rows stay in the file
    _, lines = report(read_cache(cache).drop_duplicates(["dataset", "method", "seed"], keep="first")
                      .pipe(lambda f: pd.concat([f.iloc[:1], rerun.iloc[1:]])), ["pca2-kmeans"], [])
    assert any("rows from 2 code versions" in line for line in lines)


def test_read_cache_rejects_another_csv(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame({"a": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="is not a selection cache"):
        read_cache(path)


def test_cli_select_prints_the_lodo_table(two_files, tmp_path):
    out = tmp_path / "lodo.csv"
    args = ["select", "--data", *map(str, two_files), "--candidates", "pca2-kmeans,pca50-kmeans",
            "--baselines", "pca50-kmeans", "--seeds", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "LODO choice" in result.output and "beats the strongest baseline (pca50-kmeans" in result.output
    assert len(pd.read_csv(out)) == 4
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and len(pd.read_csv(out)) == 4  # nothing ran twice


def test_cli_select_needs_two_datasets(two_files, tmp_path):
    result = CliRunner().invoke(main, ["select", "--data", str(two_files[0]), "--candidates", "pca2-kmeans",
                                       "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "at least 2 datasets, got 1" in result.output
