"""The served model's budget: settings from the environment and the arithmetic that refuses a request."""

import pytest

from contrastive_sc.serve.limits import OverBudget, RequestTooLarge, ServingLimits

LIMITS = ServingLimits(max_cells=10_000, max_input_values=20_000_000, max_graph_edges=2_000_000,
                       max_kmeans_work=1_000_000, inline_work=100_000, heavy_slots=1, cluster_timeout=60)


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch):
    for name in ("CONTRASTIVE_SC_MAX_CELLS", "CONTRASTIVE_SC_MAX_INPUT_VALUES", "CONTRASTIVE_SC_MAX_GRAPH_EDGES",
                 "CONTRASTIVE_SC_MAX_KMEANS_WORK", "CONTRASTIVE_SC_INLINE_WORK", "CONTRASTIVE_SC_HEAVY_SLOTS",
                 "CONTRASTIVE_SC_CLUSTER_TIMEOUT", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_and_settings_from_the_environment(monkeypatch):
    assert ServingLimits.from_env() == ServingLimits() == LIMITS
    monkeypatch.setenv("CONTRASTIVE_SC_MAX_GRAPH_EDGES", "500000")
    monkeypatch.setenv("CONTRASTIVE_SC_HEAVY_SLOTS", "3")
    monkeypatch.setenv("CONTRASTIVE_SC_INLINE_WORK", "0")
    limits = ServingLimits.from_env()
    assert (limits.max_graph_edges, limits.heavy_slots, limits.inline_work) == (500_000, 3, 0)


def test_cluster_timeout_stays_under_the_servers(monkeypatch):
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "120")
    assert ServingLimits.from_env().cluster_timeout == 60
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "30")
    assert ServingLimits.from_env().cluster_timeout == 15  # half a short server limit
    monkeypatch.setenv("CONTRASTIVE_SC_CLUSTER_TIMEOUT", "25")
    assert ServingLimits.from_env().cluster_timeout == 25
    monkeypatch.setenv("CONTRASTIVE_SC_CLUSTER_TIMEOUT", "28")
    with pytest.raises(ValueError, match=r"CONTRASTIVE_SC_CLUSTER_TIMEOUT=28 s must be at least 5 s under the scoring "
                                         r"server's limit MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=30 s.*<= 25"):
        ServingLimits.from_env()


@pytest.mark.parametrize("name,value,message", [
    ("CONTRASTIVE_SC_MAX_CELLS", "lots", "CONTRASTIVE_SC_MAX_CELLS must be a positive integer, got 'lots'"),
    ("CONTRASTIVE_SC_HEAVY_SLOTS", "0", "CONTRASTIVE_SC_HEAVY_SLOTS must be a positive integer, got '0'"),
    ("CONTRASTIVE_SC_INLINE_WORK", "-1", "CONTRASTIVE_SC_INLINE_WORK must be a whole number >= 0, got '-1'"),
    ("CONTRASTIVE_SC_CLUSTER_TIMEOUT", "nan", "CONTRASTIVE_SC_CLUSTER_TIMEOUT must be a number of seconds >= 0.1"),
])
def test_bad_settings_are_named(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        ServingLimits.from_env()


def test_input_budget_is_cells_times_genes():
    LIMITS.check_input(10_000, 2_000)  # exactly the budget
    with pytest.raises(RequestTooLarge, match="holds 10001 cells, over this server's limit of 10000"):
        LIMITS.check_input(10_001, 10)
    with pytest.raises(OverBudget, match=r"holds 5000 cells x 5000 genes = 25,000,000 values, over this server's budget of "
                                         r"20,000,000 \(CONTRASTIVE_SC_MAX_INPUT_VALUES\).*at most 4,000 cells of 5000"):
        LIMITS.check_input(5_000, 5_000)


def test_graph_budget_is_cells_times_neighbours_and_says_what_fits():
    assert LIMITS.check_clustering("leiden", 10_000, n_neighbors=200) == 2_000_000
    assert LIMITS.check_clustering("auto", 100, n_neighbors=15) == 1_500
    with pytest.raises(OverBudget) as refused:
        LIMITS.check_clustering("leiden", 10_000, n_neighbors=1_000)
    message = str(refused.value)
    assert "10,000,000 cells x neighbours, over this server's budget of 2,000,000 (CONTRASTIVE_SC_MAX_GRAPH_EDGES)" \
        in message
    assert "send n_neighbors <= 200 for 10000 cells, or at most 2,000 cells with n_neighbors=1000" in message
    assert "\n" not in message
    with pytest.raises(OverBudget, match="method 'auto' on 10000 cells"):
        LIMITS.check_clustering("auto", 10_000, n_neighbors=201)


def test_kmeans_budget_is_cells_times_clusters():
    assert LIMITS.check_clustering("kmeans", 10_000, n_clusters=100) == 1_000_000
    with pytest.raises(OverBudget, match=r"2,000,000 cells x clusters, over this server's budget of 1,000,000 "
                                         r"\(CONTRASTIVE_SC_MAX_KMEANS_WORK\).*n_clusters <= 100 for 10000 cells, or at "
                                         r"most 5,000 cells with n_clusters=200"):
        LIMITS.check_clustering("kmeans", 10_000, n_clusters=200)


def test_trained_costs_nothing_and_small_work_runs_inline():
    assert LIMITS.check_clustering("trained", 10_000) == 0
    assert LIMITS.runs_inline(0) and LIMITS.runs_inline(100_000)
    assert not LIMITS.runs_inline(100_001)
