"""Peak resident memory of a block of code, sampled from /proc (Linux) or getrusage."""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path


def current_rss_mb() -> float:
    """Resident memory of this process in MB."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        pages = int(statm.read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, the best available elsewhere
    return usage / (2**20 if sys.platform == "darwin" else 2**10)


class PeakMemory:
    """Context manager sampling RSS every ``interval`` seconds; ``peak_mb`` after exit.

    The process-wide peak (getrusage) never goes down, so a per-block peak needs sampling.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())
