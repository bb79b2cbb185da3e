"""Stopping a command on SIGTERM / SIGINT, and when the ``mlflow run`` that started it is stopped.

A signal raises ``SystemExit`` (SIGTERM) or ``KeyboardInterrupt`` (SIGINT) where the program is,
and also sets :data:`STOP`: a library that swallows the exception cannot keep training going,
since the training loop's per-epoch hook calls :func:`raise_if_stopped`. The run then ends KILLED
(``tracking``'s interrupt handling). Inside :func:`deferred` (a write to the tracking store) the
exception waits for the end of the block: cut in half, a SQLite write can leave the store locked
for the write that marks the run KILLED, and the run would stay RUNNING.

``mlflow run`` does not pass SIGTERM (a ``kill``, a scheduler's timeout) on to the entry point's
process: left alone, training would go on, finish FINISHED and be registrable although the user
stopped it. Under ``mlflow run`` the CLI watches that process and, once it is gone, stops itself
as if signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

#: Seconds between two looks at the watched process.
POLL_SECONDS = 0.5
#: Set once a stop was asked for; :data:`_SIGNAL` holds which signal.
STOP = threading.Event()
_SIGNAL: list[int] = []
#: How many :func:`deferred` blocks the main thread is in.
_DEFERRED = [0]


def _stop(signum, frame) -> None:
    STOP.set()
    _SIGNAL.append(signum)
    if not _DEFERRED[0]:
        raise_if_stopped()


@contextlib.contextmanager
def deferred(*, raise_after: bool = True):
    """Hold a stop that a signal asks for until the block has ended, then raise it (``raise_after``).

    For writes to the tracking store: the exception is raised between two writes, never inside
    one. ``raise_after=False`` is for the write that records the stop itself.
    """
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1
    if raise_after:
        raise_if_stopped()


def raise_if_stopped() -> None:
    """Raise the exception of the signal received, if one was: ``KeyboardInterrupt`` for SIGINT, else ``SystemExit``."""
    if not STOP.is_set():
        return
    signum = _SIGNAL[0] if _SIGNAL else signal.SIGTERM
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGINT into a stop of the command (see the module's text)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command's parentheses


def _cmdline(pid: int) -> bytes:
    # The command line of a live process; b"" once it has ended (a zombie's is empty too).
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_mlflow_run(pid: int) -> bool:
    argv = _cmdline(pid).split(b"\0")
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


def keep_killed(run_id: str, tracking_uri: str, *, this_process: bool = False) -> bool:
    """Mark ``run_id`` KILLED from a detached process once the processes that could overwrite it have ended.

    Under ``mlflow run``: that ``mlflow run`` process. It marks the run FAILED after its entry
    point exits with an error, even when the entry point already ended it KILLED: MLflow 3.17's
    ``_maybe_set_run_terminated`` checks ``RunStatus.is_terminated`` (integer statuses) against
    the run's status string, which never matches. With ``this_process``: this process too (when
    it could not write KILLED itself, its end releases whatever held the store).

    Returns whether the detached process was started (there was something to wait for).
    """
    import subprocess
    import sys

    watched = [pid for pid in (mlflow_run_ancestor(), os.getpid() if this_process else None) if pid is not None]
    if not watched:  # (MLflow has removed MLFLOW_RUN_ID from the environment by now: look at the ancestors)
        return False
    code = ("import sys, time\n"
            "from contrastive_sc.mlops.signals import _cmdline\n"
            "watched = [(int(pid), _cmdline(int(pid))) for pid in sys.argv[3:]]\n"
            "while any(command and _cmdline(pid) == command for pid, command in watched):\n"
            "    time.sleep(0.2)\n"
            "from mlflow import MlflowClient\n"
            "for attempt in range(30):  # another process may hold the SQLite store for a moment\n"
            "    try:\n"
            "        MlflowClient(tracking_uri=sys.argv[1]).set_terminated(sys.argv[2], 'KILLED')\n"
            "        break\n"
            "    except Exception:\n"
            "        time.sleep(1)\n")
    subprocess.Popen([sys.executable, "-c", code, tracking_uri, run_id, *map(str, watched)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return True


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
