"""Every MLproject entry point, run as users run them: `mlflow run <checkout>` from their own folder.

Relative `data` and `out` values must resolve against the caller's folder, the default store is
the caller's ./mlflow.db, and nothing is written into the checkout.
"""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _mlflow_run(entry, params, cwd, experiment=None):
    command = [str(BIN / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local"]
    if experiment:
        command += ["--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    # No MLFLOW_TRACKING_URI: the caller's ./mlflow.db is the store, as for a user in their folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{entry} failed:\n{done.stderr[-4000:]}"
    return done


def _cli(args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([str(BIN / "contrastive-sc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def user_folder(tmp_path, synthetic):
    """A user's folder (not the checkout) holding a small labelled dataset, tiny.h5."""
    folder = tmp_path / "user"
    folder.mkdir()
    with h5py.File(folder / "tiny.h5", "w") as f:
        f["X"] = synthetic.X.toarray()
        f["Y"] = synthetic.obs["label"].to_numpy()
    return folder


def test_every_entry_point_runs_from_the_users_folder(user_folder):
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    ran = set()
    before = set(os.listdir(REPO))
    small = {"epochs": 2, "n_genes": 100, "batch_size": 64, "pca_components": 10, "pca_genes": 100}

    for seed in (0, 1):
        _mlflow_run("train", {"data": "tiny.h5", "seed": seed, **small}, user_folder, "ep")
    _mlflow_run("sweep", {"data": "tiny.h5", "grid": "lr=0.01,0.1", "seeds": 1, "epochs": 1}, user_folder, "ep-sweep")
    _mlflow_run("experiment", {"name": "stability", "data": "tiny.h5", "seeds": 1, "epochs": 1, "n_genes": 50},
                user_folder, "ep-experiment")
    ran |= {"train", "sweep", "experiment"}

    store = user_folder / "mlflow.db"
    assert store.exists(), "the default store is the caller's ./mlflow.db"
    # Both URIs explicit: an earlier test in this process may have left a global registry URI behind.
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    runs = {name: client.search_runs([client.get_experiment_by_name(name).experiment_id])
            for name in ("ep", "ep-sweep", "ep-experiment")}
    assert all(r.info.status == "FINISHED" for group in runs.values() for r in group)
    assert len(runs["ep-sweep"]) == 3  # the parent and one nested run per grid point
    first, second = sorted(runs["ep"], key=lambda r: r.info.start_time)
    assert first.data.params["data.n_cells"] == "300"

    _mlflow_run("register", {"name": "m", "experiment": "ep", "run_id": first.info.run_id}, user_folder)
    _mlflow_run("promote", {"name": "m"}, user_folder)
    _mlflow_run("register", {"name": "m", "experiment": "ep", "run_id": second.info.run_id}, user_folder)
    # Make the second version the better one whatever the tiny runs scored, so promotion moves.
    champion = client.get_model_version_by_alias("m", "champion")
    client.set_model_version_tag("m", champion.version, "metric_value", "-1.0")
    _mlflow_run("promote", {"name": "m"}, user_folder)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    _mlflow_run("rollback", {"name": "m"}, user_folder)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    ran |= {"register", "promote", "rollback"}

    _mlflow_run("export_onnx", {"model_uri": "models:/m@champion", "out": "exports/encoder.onnx"}, user_folder)
    _mlflow_run("embed", {"model_uri": "models:/m@champion", "data": "tiny.h5", "out": "exports/tiny.h5ad"},
                user_folder)
    _mlflow_run("benchmark", {"data": "tiny.h5", "methods": "pca50-kmeans", "seeds": 1, "out": "exports/b.csv"},
                user_folder)
    ran |= {"export_onnx", "embed", "benchmark"}
    for name in ("encoder.onnx", "tiny.h5ad", "b.csv"):
        assert (user_folder / "exports" / name).stat().st_size > 0, name

    assert ran == set(spec["entry_points"]), "a new entry point needs a line in this test"
    assert set(os.listdir(REPO)) - before <= {".pytest_cache"}, "an entry point wrote into the checkout"


def test_training_checks_the_data_before_a_run_exists(user_folder):
    done = _cli(["train", "--data", "tiny.h5", "--n-clusters", "5000", "--epochs", "1"], user_folder)
    assert done.returncode == 2
    assert done.stderr.strip() == "Error: n_clusters=5000 but the data has only 300 cells; ask for at most 300"
    assert not (user_folder / "mlflow.db").exists() or not MlflowClient(
        tracking_uri=f"sqlite:///{user_folder / 'mlflow.db'}").search_runs(["0"])


def test_train_and_register_output_is_free_of_mlflow_noise(user_folder):
    done = _cli(["train", "--data", "tiny.h5", "--epochs", "1", "--n-genes", "100", "--no-map"], user_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]  # no UserWarnings, INFO lines or download bars
    assert done.stdout.startswith("run ") and "contrastive-sc register --name NAME --run-id" in done.stdout
    assert "models:/m-" not in done.stdout  # a logged-model id is not what a newcomer should serve
    registered = _cli(["register", "--name", "quiet", "--experiment", "contrastive-sc"], user_folder)
    assert registered.returncode == 0 and registered.stderr == "", registered.stderr[-3000:]
    assert registered.stdout.count("\n") == 1 and "registered as quiet version 1" in registered.stdout


def test_a_killed_training_run_is_marked_killed_and_cannot_be_registered(user_folder):
    import signal
    import time

    client = MlflowClient(tracking_uri=f"sqlite:///{user_folder / 'mlflow.db'}")
    client.search_experiments()  # migrate the store first: two processes creating it at once would race
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen([str(BIN / "contrastive-sc"), "train", "--data", "tiny.h5", "--epochs", "100000",
                                "--n-genes", "50", "--experiment", "killed"], cwd=user_folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline and run is None and process.poll() is None:  # until a loss is logged
        time.sleep(0.5)
        experiment = client.get_experiment_by_name("killed")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        run = next((r for r in runs if "loss" in r.data.metrics), None)
    if run is None:
        process.kill()
        pytest.fail(f"training never started: {process.communicate()[1][-3000:]}")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert "Traceback" not in stderr

    refused = _cli(["register", "--name", "k", "--run-id", run.info.run_id], user_folder)
    assert refused.returncode == 2 and "KILLED" in refused.stderr


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_mlflow_run_stops_training_and_the_run_cannot_be_registered(user_folder, signum):
    # `mlflow run` does not pass the signal on: the entry point notices its `mlflow run` is gone
    import signal
    import time

    client = MlflowClient(tracking_uri=f"sqlite:///{user_folder / 'mlflow.db'}")
    client.search_experiments()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    command = [str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local", "--experiment-name",
               "stopped", "-P", "data=tiny.h5", "-P", "epochs=100000", "-P", "n_genes=50"]
    process = subprocess.Popen(command, cwd=user_folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 180
    run = None
    while time.monotonic() < deadline and run is None and process.poll() is None:  # until a loss is logged
        time.sleep(0.5)
        experiment = client.get_experiment_by_name("stopped")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        run = next((r for r in runs if "loss" in r.data.metrics), None)
    if run is None:
        process.kill()
        pytest.fail(f"training never started: {process.communicate()[1][-3000:]}")
    process.send_signal(getattr(signal, signum))
    process.communicate(timeout=60)
    # the entry point stops within a second or two of its parent (on SIGINT `mlflow run` first marks
    # the run FAILED itself; the training process then ends it KILLED); a loaded CI machine once took over 30 s
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and client.get_run(run.info.run_id).info.status != "KILLED":
        time.sleep(0.5)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    epochs = len(client.get_metric_history(run.info.run_id, "loss"))
    time.sleep(3)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == epochs  # training has stopped
    assert "model_uri" not in client.get_run(run.info.run_id).data.tags
    refused = _cli(["register", "--name", "k", "--run-id", run.info.run_id], user_folder)
    assert refused.returncode == 2 and "KILLED" in refused.stderr


@pytest.mark.parametrize("command", [["benchmark", "--data", "tiny.h5", "--methods", "pca50-kmeans", "--seeds", "1"]])
def test_out_never_replaces_a_users_file(user_folder, command):
    (user_folder / "notes.txt").write_text("precious")
    refused = _cli([*command, "--out", "notes.txt"], user_folder)
    assert refused.returncode == 2 and "refusing to overwrite 'notes.txt'" in refused.stderr
    assert (user_folder / "notes.txt").read_text() == "precious"
    first = _cli([*command, "--out", "b.csv"], user_folder)
    again = _cli([*command, "--out", "b.csv"], user_folder)  # an earlier output may be replaced
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-2000:]
    forced = _cli([*command, "--out", "notes.txt", "--overwrite"], user_folder)
    assert forced.returncode == 0 and (user_folder / "notes.txt").read_text().startswith("dataset,method,seed")


def test_the_demo_runs_as_the_readme_says_and_prints_the_model_to_use(tmp_path):
    # `make demo`: train -> register -> promote -> export -> serve -> query, with nothing but its own steps on screen
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "DEMO_DIR": str(tmp_path / "demo")}
    before = set(os.listdir(REPO))
    done = subprocess.run(["bash", "serving/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout + done.stderr
    assert "the model to use: models:/contrastive-sc@champion" in out and "models:/m-" not in out
    assert "300 cells clustered (trained)" in out and (tmp_path / "demo" / "clusters.csv").exists()
    noise = [line for line in out.splitlines()
             if ("INFO" in line or "Warning" in line or "Downloading" in line) and "succeeded" not in line]
    assert noise == [], noise
    assert set(os.listdir(REPO)) == before  # everything landed in DEMO_DIR
