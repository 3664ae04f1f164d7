import gc
import subprocess
import sys
import time

import pytest
import torch

from evomerge.search import hostpeak
from evomerge.search.hostpeak import HostPeak

MIB = 1 << 20


def _touch(mib: int, hold: float = 0.05) -> None:
    """Hold ``mib`` MiB resident for ``hold`` seconds, then free it."""
    block = torch.ones(mib * MIB // 4)
    time.sleep(hold)
    del block


@pytest.fixture(params=["kernel", "sampled"])
def mode(request, monkeypatch):
    if request.param == "sampled":  # a sandbox that ignores the reset
        monkeypatch.setattr(hostpeak, "_reset_high_water_mark", lambda: False)
    return request.param


def test_the_peak_counts_what_came_after_the_start_and_not_before(mode):
    _touch(400)  # an earlier peak of this process
    peak = HostPeak()
    try:
        if mode == "sampled":
            assert not peak.exact
        first = peak.bytes()
        assert first is not None and first < 300 * MIB  # the 400 MiB before the start is not counted
        _touch(200)
        assert peak.bytes() >= 190 * MIB  # freed since, still the peak
    finally:
        peak.close()


def test_a_closed_sampler_stops_its_thread(monkeypatch):
    monkeypatch.setattr(hostpeak, "_reset_high_water_mark", lambda: False)
    peak = HostPeak()
    peak.close()
    peak._thread.join(timeout=5)
    assert not peak._thread.is_alive()


def test_a_sampler_nobody_closed_stops_when_dropped(monkeypatch):
    monkeypatch.setattr(hostpeak, "_reset_high_water_mark", lambda: False)
    peak = HostPeak()
    thread = peak._thread
    assert thread is not None and thread.is_alive()
    del peak
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


EXIT_CHECK = """
import atexit, threading
# registered first, so it runs last: after hostpeak's own exit hook
alive = lambda: sum(t.name == "host-peak" and t.is_alive() for t in threading.enumerate())
atexit.register(lambda: print("alive at exit:", alive()))
from evomerge.search import hostpeak
hostpeak._reset_high_water_mark = lambda: False
peaks = [hostpeak.HostPeak() for _ in range(8)]  # never closed, still referenced at exit
print("sampling:", sum(p._thread.is_alive() for p in peaks))
"""


def test_samplers_are_stopped_before_the_interpreter_finalizes():
    """A daemon thread running Python code while the runtime tears down can crash a
    process whose work is done: every sampler is stopped and joined at exit."""
    res = subprocess.run([sys.executable, "-c", EXIT_CHECK], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["sampling:", "8", "alive", "at", "exit:", "0"], res.stdout
