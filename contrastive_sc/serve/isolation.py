"""Work that can be stopped: a function run in its own process, killed at a deadline, a few at a time.

MLflow's scoring server runs each request in a thread and answers 504 at its time limit while
the thread goes on computing (a thread cannot be stopped), so abandoned requests pile up and
hold their memory. :func:`run_killable` runs the function in a process instead: at the deadline
the process is killed and its memory returns to the system. :class:`HeavySlots` bounds how many
such processes one server worker runs at once, so that quick requests always find a thread.

The processes are forked from a *fork server* (``multiprocessing``'s ``forkserver``): a clean,
single-threaded process started once, which has imported the clustering libraries. Forking the
server worker itself is not safe: measured here, a KMeans in a child forked after the parent had
run scikit-learn (its GNU OpenMP thread pool) hung, while the same child from the fork server
finished in a second. Each child lowers its priority (``nice``), so that the quick requests of
its parent keep the CPU.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

#: Modules the fork server imports once, so that each child starts ready (scikit-learn alone
#: takes 1-3 s to import on a two-core machine). ``__main__``: the parent's main script, which
#: each child would otherwise import again (``multiprocessing`` does, for spawned processes).
PRELOAD = ("__main__", "contrastive_sc.serve.isolation", "contrastive_sc.analysis.cluster", "numpy", "scipy.sparse",
           "sklearn.neighbors", "sklearn.cluster", "igraph")
#: Niceness added to each child: its parent's quick requests come first on a busy machine.
CHILD_NICENESS = 10
#: Seconds after its deadline at which a child ends itself, should its parent never kill it.
CHILD_ALARM_MARGIN = 30

_start_lock = threading.Lock()
_preload_chosen: list[bool] = []  # non-empty once the fork server's modules are chosen


class ServerBusy(RuntimeError):
    """Every slot for killable work is taken (answered 503: retry)."""


class WorkTimedOut(RuntimeError):
    """The work passed its deadline and its process was killed (answered 504)."""


class WorkerDied(RuntimeError):
    """The work's process ended without an answer (killed by the system, e.g. out of memory)."""


def _package_root() -> str:
    """The folder this package was imported from: the children must import the same code."""
    return str(Path(__file__).resolve().parents[2])


def start_fork_server(extra_preload: tuple[str, ...] = ()) -> None:
    """Start this process's fork server if it is not running; idempotent and cheap when it is.

    The server is started with this package's folder first on ``PYTHONPATH``: a served model
    imports the package from the model's own ``code`` folder, which a new interpreter would
    not find (or would find another installed version of). ``extra_preload``: modules it
    imports besides :data:`PRELOAD` (only the first start of the process chooses).
    """
    from multiprocessing import forkserver

    with _start_lock:
        if not _preload_chosen:
            preload = list(dict.fromkeys([*PRELOAD, *extra_preload]))
            multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
            _preload_chosen.append(True)
        before = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
        os.environ["PYTHONPATH"] = os.pathsep.join([_package_root(), *filter(None, [before["PYTHONPATH"]])])
        # `python -c` would put the working folder first on sys.path, ahead of PYTHONPATH (Python >= 3.11).
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            forkserver.ensure_running()
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_killable(func, args: tuple = (), kwargs: dict | None = None, *, deadline: float):
    """``func(*args, **kwargs)`` in a new process, killed if it has not answered by ``deadline``.

    Parameters
    ----------
    func
        A module-level function (it is pickled by reference); ``args``, ``kwargs`` and the
        result are pickled.
    deadline
        ``time.monotonic()`` value at which the process is killed.

    Raises
    ------
    WorkTimedOut
        At the deadline (the process is killed and reaped first).
    WorkerDied
        The process ended without an answer (a signal: out of memory, a crash).
    ValueError
        ``func`` raised ``ValueError`` (a bad request): the same message.
    RuntimeError
        ``func`` raised anything else: its type and message.
    """
    if deadline - time.monotonic() <= 0:
        msg = "the deadline passed before the work could start"
        raise WorkTimedOut(msg)
    start_fork_server()
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    alarm = math.ceil(deadline - time.monotonic()) + CHILD_ALARM_MARGIN
    process = context.Process(target=_child, args=(sender, func, args, kwargs or {}, _package_root(), alarm),
                              daemon=True, name="contrastive-sc-clustering")
    exit_code = outcome = answered = None
    try:
        process.start()
        sender.close()
        answered = receiver.poll(max(deadline - time.monotonic(), 0.0))
        if answered:
            with contextlib.suppress(EOFError, OSError):
                outcome = receiver.recv()
    finally:
        receiver.close()
        if outcome is not None:
            # A child that answered is on its way out: it is reaped in the background (exiting
            # takes it 0.1-0.2 s on a busy machine), and killed should it linger.
            threading.Thread(target=_stop, args=(process, 10.0), daemon=True).start()
        else:
            exit_code = _stop(process)
    if not answered:
        msg = "the work passed its deadline and its process was stopped"
        raise WorkTimedOut(msg)
    if outcome is None:
        code = exit_code
        cause = (f"signal {-code} ({signal.Signals(-code).name}{'; out of memory?' if -code == 9 else ''})"
                 if code is not None and code < 0 else f"exit code {code}")
        msg = f"the clustering process ended without an answer: {cause}"
        raise WorkerDied(msg)
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "value_error":
        raise ValueError(value)
    raise RuntimeError(value)


def _stop(process, grace: float = 0.0) -> int | None:
    """Kill ``process`` if it still runs and reap it, so that neither it nor its memory is left; its exit code."""
    if process.pid is None:  # never started
        return None
    if grace:
        process.join(grace)
    if process.is_alive():
        with contextlib.suppress(OSError):
            process.kill()
    process.join(10)
    code = process.exitcode
    if code is not None:
        process.close()
    return code


def _child(sender, func, args, kwargs, package_root: str, alarm: int) -> None:
    _die_with_parent()
    signal.alarm(alarm)  # SIGALRM's default action ends the process
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)
    try:
        if _package_root() != package_root:
            msg = (f"the clustering process imported contrastive_sc from {_package_root()}, its server from "
                   f"{package_root}")
            raise RuntimeError(msg)
        outcome = ("ok", func(*args, **kwargs))
    except ValueError as error:
        outcome = ("value_error", str(error))
    except Exception as error:  # reported to the parent, which logs it
        outcome = ("error", f"{type(error).__name__}: {error}")
    sender.send(outcome)
    sender.close()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server) ends; a no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class HeavySlots:
    """At most ``size`` pieces of killable work at once; past that, :class:`ServerBusy` at once.

    Refusing rather than queueing keeps the server's request threads (about six in MLflow's
    scoring server) free for quick requests, and bounds the memory the work holds.
    """

    def __init__(self, size: int, busy_message: str = "every slot for heavy work is taken; retry later") -> None:
        if size < 1:
            msg = f"HeavySlots needs at least one slot, got {size}"
            raise ValueError(msg)
        self.size = size
        self.busy_message = busy_message
        self._free = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def hold(self):
        if not self._free.acquire(blocking=False):
            raise ServerBusy(self.busy_message)
        try:
            yield
        finally:
            self._free.release()
