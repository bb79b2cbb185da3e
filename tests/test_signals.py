"""Stopping on a signal: the stop waits for the end of a store write, and a run left unmarked is marked KILLED later."""

import os
import subprocess
import sys
import textwrap

import pytest


def _clean_env() -> dict:
    # without the MLFLOW_* variables that other tests' runs leave in this process's environment
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def _run(code: str) -> str:
    # a process of its own: the test runner keeps its signal handlers
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env=_clean_env())
    assert done.returncode == 0, done.stderr[-5000:]
    return done.stdout.strip()


def test_a_signal_during_a_store_write_stops_the_command_after_the_write():
    out = _run("""
        import os, signal
        from contrastive_sc.mlops.signals import deferred, stop_on_signals
        stop_on_signals()
        steps = []
        try:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
                steps.append("write finished")
            steps.append("went on")
        except SystemExit as stop:
            steps.append(f"stopped {stop.code}")
        try:
            with deferred(raise_after=False):  # the write that records the stop
                steps.append("KILLED written")
            steps.append("then raised by the caller")
        except SystemExit:
            steps.append("raised again")
        print(steps)
    """)
    assert out == "['write finished', 'stopped 143', 'KILLED written', 'then raised by the caller']"


def test_without_deferral_the_signal_stops_at_once():
    out = _run("""
        import os, signal
        from contrastive_sc.mlops.signals import stop_on_signals
        stop_on_signals()
        steps = []
        try:
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("went on")
        except KeyboardInterrupt:
            steps.append("interrupted")
        print(steps)
    """)
    assert out == "['interrupted']"


def test_a_run_this_process_could_not_mark_is_marked_killed_once_it_has_ended(tmp_path):
    # the fallback when the KILLED write fails (a store left locked): a detached process writes it
    # after the process that held the run has ended
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _run(f"""
        import mlflow
        from contrastive_sc.mlops.signals import keep_killed
        mlflow.set_tracking_uri({uri!r})
        run = mlflow.start_run()
        assert keep_killed(run.info.run_id, {uri!r}, this_process=True)
        print(run.info.run_id, flush=True)
        import os
        os._exit(0)  # gone without ending the run: RUNNING as far as the store knows
    """).splitlines()[-1]
    client = MlflowClient(tracking_uri=uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.get_run(run_id).info.status != "KILLED":
        time.sleep(0.5)
    assert client.get_run(run_id).info.status == "KILLED"


_CUT_WRITE = """
    import os, signal, sys, tempfile
    import mlflow
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from contrastive_sc.mlops import tracking
    from contrastive_sc.mlops.signals import stop_on_signals

    kind, k = sys.argv[1], int(sys.argv[2])
    uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    stop_on_signals()
    armed, seen = [False], [0]

    def stop_here(*args):  # SIGTERM at the k-th statement or commit of the store, once armed
        if armed[0]:
            if seen[0] == k:
                armed[0] = False
                os.kill(os.getpid(), signal.SIGTERM)
            seen[0] += 1

    event.listen(Engine, kind, stop_here)
    try:
        with tracking._training_run(None, False) as run:
            tracking._log_epoch_loss(0, 1.0)
            armed[0] = True
            tracking._log_epoch_loss(1, 0.5)
            tracking._log_epoch_loss(2, 0.25)
    except SystemExit:
        pass
    fired, armed[0] = not armed[0], False  # no stop while the status is read
    print(mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status, fired)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["after_cursor_execute", "commit"])
def test_a_stop_in_the_middle_of_any_store_write_never_leaves_the_run_running(kind, tmp_path):
    # A SIGTERM between a statement and its commit, or inside a commit, used to leave SQLite
    # locked for the KILLED write (22 s of "database is locked", then RUNNING for ever): the
    # clean-clone CI's intermittent signal test. Every position in the epoch's writes and the
    # run's end is tried; the run must end KILLED (or FINISHED when the stop came with its end).
    script = tmp_path / "cut_write.py"
    script.write_text(textwrap.dedent(_CUT_WRITE))
    statuses = []
    for k in range(6):
        done = subprocess.run([sys.executable, str(script), kind, str(k)], capture_output=True, text=True,
                              timeout=120, env=_clean_env())
        assert done.returncode == 0, done.stderr[-2000:]
        status, fired = done.stdout.split()
        if fired == "True":
            statuses.append(status)
    assert statuses and "RUNNING" not in statuses and statuses[0] == "KILLED", statuses
