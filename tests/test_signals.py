"""Stopping on a signal: the stop waits for the end of a store write, and a run left unmarked is marked KILLED later."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    # a process of its own: the test runner keeps its signal handlers
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
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
