"""The killable runner: work in a process forked from a fork server, killed at its deadline."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from contrastive_sc.analysis.cluster import cluster_labels
from contrastive_sc.serve.isolation import HeavySlots, ServerBusy, WorkerDied, WorkTimedOut, run_killable


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_runs_in_another_process_and_returns_its_result():
    pid = run_killable(os.getpid, deadline=time.monotonic() + 120)  # the first call waits for the fork server
    assert pid != os.getpid()
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    labels = run_killable(cluster_labels, (x, "kmeans"), {"n_clusters": 3, "seed": 1}, deadline=time.monotonic() + 60)
    np.testing.assert_array_equal(labels, cluster_labels(x, "kmeans", n_clusters=3, seed=1))


def test_work_past_its_deadline_is_killed_and_reaped():
    run_killable(os.getpid, deadline=time.monotonic() + 120)
    children_before = set(_forkserver_children())
    started = time.monotonic()
    with pytest.raises(WorkTimedOut, match="passed its deadline and its process was stopped"):
        run_killable(time.sleep, (30,), deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 10
    assert not [pid for pid in set(_forkserver_children()) - children_before if _alive(pid)]
    with pytest.raises(WorkTimedOut):
        run_killable(os.getpid, deadline=time.monotonic() - 1)


def _forkserver_children() -> list[int]:
    """Processes whose parent is this process's fork server (the work's processes)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver._forkserver_pid
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().split(")")[-1].split()[1]) == server:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def test_errors_come_back_as_value_errors_or_runtime_errors():
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_killable(int, ("x",), deadline=time.monotonic() + 60)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_killable(divmod, (1, 0), deadline=time.monotonic() + 60)


def test_a_process_killed_by_the_system_is_reported():
    with pytest.raises(WorkerDied, match=r"ended without an answer: signal 9 \(SIGKILL; out of memory\?\)"):
        run_killable(signal.raise_signal, (signal.SIGKILL,), deadline=time.monotonic() + 60)
    with pytest.raises(WorkerDied, match="exit code 3"):
        run_killable(os._exit, (3,), deadline=time.monotonic() + 60)


def test_slots_refuse_at_once_beyond_their_size():
    slots = HeavySlots(2, busy_message="busy, retry")
    inside, release = threading.Barrier(3), threading.Event()

    def hold():
        with slots.hold():
            inside.wait()
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()
    started = time.monotonic()
    with pytest.raises(ServerBusy, match="busy, retry"), slots.hold():
        pass
    assert time.monotonic() - started < 0.5
    release.set()
    for thread in threads:
        thread.join()
    with slots.hold():  # freed again
        pass
    with pytest.raises(ValueError, match="at least one slot"):
        HeavySlots(0)
