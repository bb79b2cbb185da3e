"""Stopping an entry point when the ``mlflow run`` that started it is stopped.

``mlflow run`` does not pass SIGTERM (a ``kill``, a scheduler's timeout) on to the entry point's
process: left alone, training would go on, finish FINISHED and be registrable although the user
stopped it. Under ``mlflow run`` the CLI watches that process and, once it is gone, stops itself
as if signalled, so the run ends KILLED (see ``tracking``'s interrupt handling).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

#: Seconds between two looks at the watched process.
POLL_SECONDS = 0.5


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command's parentheses


def _is_mlflow_run(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"mlflow") for part in argv) and b"run" in argv


def mlflow_run_ancestor() -> int | None:
    """The pid of the ``mlflow run`` process this process descends from, if any (Linux ``/proc``)."""
    pid = os.getppid()
    for _ in range(8):
        if pid is None or pid <= 1:
            return None
        if _is_mlflow_run(pid):
            return pid
        pid = _parent(pid)
    return None


def stop_with_mlflow_run() -> bool:
    """Under ``mlflow run``, SIGTERM this process once that ``mlflow run`` process has ended.

    Returns whether a watcher was started (only under ``mlflow run``, where ``MLFLOW_RUN_ID`` is set).
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        return False
    ancestor = mlflow_run_ancestor()
    if ancestor is None:
        return False

    def watch() -> None:
        while _parent(ancestor) is not None and _is_mlflow_run(ancestor):
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlflow-run-watcher", daemon=True).start()
    return True
