"""A worker's peak host memory above its start, comparable with the memory plan.

Linux keeps a process's peak resident memory (``VmHWM`` in ``/proc/self/status``) and
lets a process bring it down to what it holds now (writing 5 to ``/proc/self/clear_refs``),
so a worker measures its own peak exactly even inside a long-lived process. Some kernels
and sandboxes keep the file but ignore the reset; there the peak is the most resident
memory seen by a sampling thread (``/proc/self/statm``, every ``interval`` seconds), which
can miss a spike shorter than the interval but never reports an earlier process's peak.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import weakref

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (its value is in kB), None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resident_bytes() -> int | None:
    """What this process holds resident now (``/proc/self/statm``'s second field, in pages)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _reset_high_water_mark() -> bool:
    """Bring ``VmHWM`` down to ``VmRSS``; True where the kernel did (checked, not assumed)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    # the two are read one after the other: allow what the process may touch in between
    return hwm is not None and rss is not None and hwm <= rss + (4 << 20)


class HostPeak:
    """The peak resident memory of this process from its construction on (bytes above
    what it held then); ``None`` on a system without ``/proc``.

    A sampling thread stops at :meth:`close`, when the ``HostPeak`` is garbage collected
    (a worker nobody stopped), and at interpreter exit, before Python's finalization
    (a daemon thread still running Python code while the runtime tears down can crash
    the process after its work is done)."""

    def __init__(self, interval: float = 0.002):
        self._exact = _reset_high_water_mark()
        self._start = _resident_bytes()
        self._most = [self._start or 0]  # shared with the sampling thread, which holds no reference to self
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self._exact and self._start is not None:
            self._thread = threading.Thread(
                target=_sample, args=(self._stop, self._most, interval), daemon=True, name="host-peak"
            )
            self._thread.start()
            _SAMPLERS[self._thread] = self._stop
            weakref.finalize(self, _stop_sampler, self._thread, self._stop)
            _stop_all_at_exit()

    @property
    def exact(self) -> bool:
        """Whether the kernel's own high-water mark is used (else a sampled one)."""
        return self._exact

    def bytes(self) -> int | None:
        """The peak so far above the start."""
        if self._start is None:
            return None
        if self._exact:
            peak = _status_bytes("VmHWM")
            return None if peak is None else max(0, peak - self._start)
        now = _resident_bytes() or 0
        return max(0, max(self._most[0], now) - self._start)

    def close(self) -> None:
        """Stop the sampling thread (where there is one)."""
        self._stop.set()
        if self._thread is not None:
            _stop_sampler(self._thread, self._stop)


def _sample(stop: threading.Event, most: list[int], interval: float) -> None:
    while not stop.wait(interval):
        now = _resident_bytes()
        if now is not None and now > most[0]:
            most[0] = now


_SAMPLERS: dict[threading.Thread, threading.Event] = {}  # the sampling threads not yet seen to end


def _stop_sampler(thread: threading.Thread, stop: threading.Event) -> None:
    """Tell ``thread`` to stop (it ends within one interval: it stays listed until then, for
    the exit hook to join) and forget the threads that have ended."""
    stop.set()
    for ended in [t for t in _SAMPLERS if not t.is_alive()]:
        _SAMPLERS.pop(ended, None)  # a finalizer may run on another thread


@functools.cache
def _stop_all_at_exit() -> None:
    """Stop and join every sampling thread at exit (registered once, with the first);
    ``atexit`` runs before the interpreter finalizes, unlike daemon threads' end."""

    def stop_all() -> None:
        for stop in list(_SAMPLERS.values()):
            stop.set()
        for thread in list(_SAMPLERS):
            thread.join(timeout=1.0)

    atexit.register(stop_all)
