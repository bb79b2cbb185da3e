"""Concurrent promotions from real processes on a real SQLite registry end with the best version.

Each worker process imports the CLI, then waits at a start line; all of them run
``contrastive-sc promote`` at the same instant, so that the read-compare-write of the alias
really overlaps. Without the registry lock the weaker version could end as champion while the
stronger one's process also said it was champion.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from contrastive_sc.mlops import registry

ROUNDS = 6
#: Promotions started at once in every round: two each of the middle and the best version.
CONTENDERS = ("2", "3", "2", "3")

WORKER = r'''
import contextlib, io, json, sys, time
from pathlib import Path

from mlflow import MlflowClient

from contrastive_sc.cli import main

folder, uri, name, version, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()  # open the store before the start line
for round_ in range(rounds):
    (folder / f"ready-{round_}-{sys.argv[6]}").touch()
    while not (folder / f"go-{round_}").exists():
        time.sleep(0.002)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["promote", "--name", name, "--version", version, "--tracking-uri", uri])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
        except Exception as error:  # reported to the test, not swallowed
            code, err = 99, io.StringIO(repr(error))
    report = folder / f"report-{round_}-{sys.argv[6]}"
    report.write_text(json.dumps({"version": version, "code": code, "out": out.getvalue(), "err": err.getvalue()}))
    report.rename(folder / f"done-{round_}-{sys.argv[6]}")  # appears whole
'''


def _make_versions(name: str) -> MlflowClient:
    """v1, v2, v3 scored 0.5, 0.6, 0.9 on one dataset, tagged as :func:`registry.register_run` tags them."""
    client = MlflowClient()
    client.create_registered_model(name)
    for value in (0.5, 0.6, 0.9):
        client.create_model_version(name, source="file:///nowhere/model", tags={
            "metric": "kmeans_ari", "metric_value": repr(value), "dataset": "sim", "dataset_digest": "abc123"})
    return client


def _wait_for(paths, processes, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        crashed = [p for p in processes if p.poll() not in (None, 0)]
        assert not crashed, crashed[0].stderr.read()
        assert time.monotonic() < deadline, f"workers did not reach {[p.name for p in paths if not p.exists()]}"
        time.sleep(0.01)


@pytest.mark.slow
def test_concurrent_promotions_crown_the_best_version(tracking_uri, tmp_path):
    client = _make_versions("race")
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), tracking_uri, "race", version, str(ROUNDS),
                                 str(i)], env=env, stderr=subprocess.PIPE, text=True)
               for i, version in enumerate(CONTENDERS)]
    try:
        for round_ in range(ROUNDS):
            client.set_registered_model_alias("race", "champion", "1")
            client.set_registered_model_tag("race", registry.HISTORY_TAG, "[]")
            _wait_for([tmp_path / f"ready-{round_}-{i}" for i in range(len(CONTENDERS))], workers)
            (tmp_path / f"go-{round_}").touch()
            done = [tmp_path / f"done-{round_}-{i}" for i in range(len(CONTENDERS))]
            _wait_for(done, workers)
            reports = [json.loads(p.read_text()) for p in done]

            assert all(r["code"] == 0 for r in reports), reports
            # stderr holds at most the notice of a promotion that waited, naming the store's one lock
            lock = registry.lock_path(tracking_uri)
            assert all(line == f"WARNING waiting for {lock}: another registry change is in progress"
                       for r in reports for line in r["err"].splitlines()), reports
            assert registry.champion_version("race") == "3", reports
            history = json.loads(client.get_registered_model("race").tags[registry.HISTORY_TAG])
            assert len(history) == len(set(history)) and history in (["1"], ["1", "2"]), (history, reports)
            # The messages tell one story: each "is now" replaced the champion the history records.
            crowned = [re.search(r"version (\d) .* is now @champion of race \(was version (\d)\)", r["out"])
                       for r in reports]
            chain = sorted((m.group(2), m.group(1)) for m in crowned if m)
            assert [was for was, _ in chain] == history and chain[-1][1] == "3", (chain, reports)
            for report, match in zip(reports, crowned):
                if match is None:
                    assert "refused" in report["out"] or "already @champion" in report["out"], report
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    finally:
        for worker in workers:
            worker.wait(timeout=60)
    assert [w.returncode for w in workers] == [0] * len(CONTENDERS)


# ----------------------------------------------------------------------------- mlflow run against the CLI
#: Trials of `mlflow run -e promote` against `contrastive-sc promote` (each ~20 s here: mlflow run starts slowly).
TRIALS = 3


def _started(command, cwd, log, env):
    handle = log.open("w")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_mlflow_run_and_the_cli_promote_under_one_lock(_template_store, tmp_path):
    """`mlflow run` passes the store percent-encoded (`runs%20and%20mod%C3%A8les`), the CLI uses the plain
    path and this test takes the lock from Python: all three must wait on one lock file.

    Per trial the test holds the registry lock, starts both promotions (the better version through one,
    the weaker through the other, swapped every trial), sees each of them wait for that same lock,
    releases it, and checks the outcome: the best version is champion, the history has no duplicate,
    no folder was created from the encoded path.
    """
    import shutil

    folder = tmp_path / "runs and modèles"
    folder.mkdir()
    db = folder / "mlflow.db"
    shutil.copyfile(_template_store, db)
    plain = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=plain, registry_uri=plain)
    client.create_registered_model("race")
    for value in (0.5, 0.6, 0.9):
        client.create_model_version("race", source="file:///nowhere/model", tags={
            "metric": "kmeans_ari", "metric_value": repr(value), "dataset": "sim", "dataset_digest": "abc123"})
    lock = registry.lock_path(plain)
    assert lock == folder / "mlflow.db.registry.lock"

    repo = Path(__file__).resolve().parents[1]
    bin_ = Path(sys.executable).parent
    # No MLFLOW_TRACKING_URI: mlflow run uses (and encodes) ./mlflow.db, as for a user in that folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    outcomes = []
    for trial in range(TRIALS):
        client.set_registered_model_alias("race", "champion", "1")
        client.set_registered_model_tag("race", registry.HISTORY_TAG, "[]")
        through_mlflow_run, through_cli = ("3", "2") if trial % 2 == 0 else ("2", "3")
        logs = {"mlflow run": tmp_path / f"mlflow-run-{trial}.log", "cli": tmp_path / f"cli-{trial}.log"}
        with registry.registry_lock(plain) as held:
            assert held == lock
            processes = {
                "mlflow run": _started([str(bin_ / "mlflow"), "run", str(repo), "-e", "promote", "--env-manager",
                                        "local", "-P", "name=race", "-P", f"version={through_mlflow_run}"],
                                       folder, logs["mlflow run"], env),
                "cli": _started([sys.executable, "-m", "contrastive_sc", "promote", "--name", "race", "--version",
                                 through_cli], folder, logs["cli"], env),
            }
            try:
                deadline = time.monotonic() + 240
                waiting = {}
                while len(waiting) < 2:
                    for who, log in logs.items():
                        found = re.search(r"waiting for (.+): another registry change", log.read_text())
                        if found:
                            waiting[who] = found.group(1)
                        assert processes[who].poll() is None or who in waiting, (
                            f"{who} finished while the lock was held:\n{log.read_text()[-3000:]}")
                    assert time.monotonic() < deadline, {who: log.read_text()[-2000:] for who, log in logs.items()}
                    time.sleep(0.2)
                assert waiting == {"mlflow run": str(lock), "cli": str(lock)}, waiting
                assert str(client.get_model_version_by_alias("race", "champion").version) == "1"
            except BaseException:
                for process in processes.values():
                    process.kill()
                raise
        codes = {who: process.wait(timeout=300) for who, process in processes.items()}
        assert codes == {"mlflow run": 0, "cli": 0}, {who: log.read_text()[-3000:] for who, log in logs.items()}
        champion = str(client.get_model_version_by_alias("race", "champion").version)
        history = json.loads(client.get_registered_model("race").tags[registry.HISTORY_TAG])
        outcomes.append((champion, history))
        assert champion == "3" and len(history) == len(set(history)) and history in (["1"], ["1", "2"]), outcomes
        strays = [str(p) for p in tmp_path.rglob("*%*")]
        assert strays == [], strays
    assert outcomes and all(champion == "3" for champion, _ in outcomes)
