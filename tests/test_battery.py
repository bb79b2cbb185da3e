"""The attack battery: every finding of the service audit and the tests that show it fixed.

Each check runs against real components (a SQLite store and registry, `mlflow run` from a user's
folder, `mlflow models serve` on 127.0.0.1) and lives beside the code it tests. This table is the
battery's one list: ``conftest.py`` marks every test named here ``battery``, so that

    pytest -m battery

runs the whole battery again (about 15 minutes here), and the test below fails if a named test is
renamed or removed, so that a finding cannot silently lose its check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HERE = Path(__file__).parent

#: finding -> the tests (``file::function``) that show it fixed
BATTERY: dict[str, tuple[str, ...]] = {
    "a tampered model (another model's encoder with the same shapes, genes reversed or swapped, "
    "preprocessing scaled, target_sum changed, another model's cell types) is refused naming the file": (
        "test_tampering.py::test_a_tampered_package_is_refused_naming_the_file",
        "test_tampering.py::test_a_manifest_rewritten_over_another_models_file_is_still_refused_by_its_model_id",
        "test_tampering.py::test_a_tampered_saved_model_is_refused",
        "test_inference.py::test_loading_refuses_artifacts_that_disagree",
        "test_serving.py::test_a_model_whose_artifacts_disagree_never_becomes_healthy",
    ),
    "one registry lock per store, whatever the URI's spelling (space, non-ASCII, percent-encoded)": (
        "test_registry_concurrency.py::test_mlflow_run_and_the_cli_promote_under_one_lock",
        "test_registry_concurrency.py::test_concurrent_promotions_crown_the_best_version",
        "test_store.py::test_every_spelling_of_a_sqlite_store_is_one_file",
        "test_store.py::test_an_encoded_uri_opens_and_locks_the_real_store_and_leaves_no_folder",
        "test_store.py::test_the_empty_folder_mlflow_made_for_an_encoded_uri_is_removed",
    ),
    "slow requests cannot starve quick ones; work past its limit is stopped; over-budget requests refused": (
        "test_serving_load.py::test_quick_requests_answer_within_5_s_while_slow_ones_are_in_flight",
        "test_serving_load.py::test_a_request_past_its_limit_is_answered_by_the_model_and_its_process_is_gone",
        "test_serving_load.py::test_a_request_over_the_budget_is_refused_naming_it",
        "test_isolation.py::test_work_past_its_deadline_is_killed_and_reaped",
        "test_inference.py::test_served_requests_are_refused_over_budget_before_the_encoder",
    ),
    "SIGTERM / SIGINT to `mlflow run -e train` end the run KILLED and unregistrable": (
        "test_entry_points.py::test_a_signal_to_mlflow_run_stops_training_and_the_run_cannot_be_registered",
        "test_entry_points.py::test_a_killed_training_run_is_marked_killed_and_cannot_be_registered",
    ),
    "non-finite and out-of-range settings refused before a run exists": (
        "test_cli.py::test_train_rejects_bad_values",
        "test_entry_points.py::test_training_checks_the_data_before_a_run_exists",
        "test_inference.py::test_every_param_is_checked_for_type_and_range",
        "test_serving.py::test_bad_params_and_values_get_400_naming_the_problem_without_traceback_or_paths",
    ),
    "all-zero cells are unassigned with confidence 0": (
        "test_inference.py::test_cells_without_counts_are_unassigned_with_confidence_zero",
    ),
    "storage errors (read-only store, full disk) are one line and exit 2": (
        "test_store.py::test_a_storage_failure_is_one_sentence_without_sql",
        "test_store.py::test_disk_and_permission_errors_are_one_line_messages_through_the_cli",
        "test_store.py::test_a_read_only_store_file_or_folder_is_one_line",
        "test_store.py::test_a_store_that_cannot_grow_is_one_line",
        "test_store.py::test_a_full_disk_is_one_line",
    ),
    "a request without Content-Type is a 4xx; error bodies are one line and never echo the request": (
        "test_serving.py::test_a_request_without_content_type_gets_415_naming_the_accepted_types",
        "test_serving.py::test_error_answers_are_one_line_and_never_repeat_the_request",
        "test_serving.py::test_bad_requests_get_4xx_with_message_and_server_keeps_serving",
    ),
    "a deleted run is not registered": (
        "test_registry.py::test_a_deleted_run_or_experiment_is_not_registered",
    ),
    "a missing cell_types file is named": (
        "test_registry.py::test_a_logged_model_missing_its_cell_types_file_is_named",
    ),
    "export-onnx --out into a missing folder writes it": (
        "test_registry.py::test_export_into_a_missing_folder_writes_it",
    ),
    "a mistyped SQLite path is refused instead of creating an empty store": (
        "test_store.py::test_commands_that_read_a_store_refuse_a_missing_one",
        "test_store.py::test_the_lock_never_creates_the_folder_of_a_misspelt_store",
    ),
    "a model name holding both quotes registers, promotes and rolls back": (
        "test_registry.py::test_a_name_with_both_quotes_registers_promotes_and_rolls_back",
    ),
    "serving refuses n_neighbors >= the cells sent, as training does": (
        "test_inference.py::test_every_param_is_checked_for_type_and_range",
    ),
}


def battery_ids() -> set[str]:
    """Every ``file::function`` the battery names."""
    return {test for tests in BATTERY.values() for test in tests}


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("test_id", sorted(battery_ids()))
def test_every_check_of_the_battery_exists(test_id):
    file, function = test_id.split("::")
    assert (HERE / file).is_file(), f"{file} is gone: the battery lost the check {test_id}"
    assert function in _functions(HERE / file), f"{test_id} is gone: move its finding to the test that replaced it"
