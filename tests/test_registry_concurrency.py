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

            assert all(r["code"] == 0 and not r["err"] for r in reports), reports
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
