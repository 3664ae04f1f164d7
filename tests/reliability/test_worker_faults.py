"""A Ray actor SIGKILLed from outside in the middle of a candidate: its job is retried
once on a fresh actor, and the search finishes its budget with no trial lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .common import cli_env, complete_trials, write_experiment

pytestmark = pytest.mark.slow


def _actors(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in root.children(recursive=True):
        try:
            if p.name().startswith("ray::MergeWorker") or "MergeWorker" in " ".join(p.cmdline()[:1]):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_actor_killed_mid_candidate_is_replaced_and_the_search_finishes(tiny_zoo, tmp_path):
    ties = {"method": "ties", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.5}}
    search = {"sampler": "cmaes", "seed": 5, "trials": 20}
    path = write_experiment(tiny_zoo, tmp_path / "exp.yaml", name="actor-killed", merge=ties, search=search, samples=60)
    run = tmp_path / "run"
    env = cli_env(tmp_path / "mlflow.db")
    cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + 180
        victim = None
        while victim is None:  # the actor, once it is busy with a trial after the first one
            assert proc.poll() is None and time.monotonic() < deadline
            busy = [a for a in _actors(driver) if ".run" in a.name() or a.cpu_percent(0.05) > 20]
            victim = busy[0] if busy and list(run.glob("study.db")) and complete_trials(run) >= 2 else None
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        while not [a for a in _actors(driver) if a.pid != victim.pid]:  # the replacement
            assert proc.poll() is None and time.monotonic() < deadline + 60, "the actor was not replaced"
            time.sleep(0.1)
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((run / "summary.json").read_text())
    # the killed trial was retried, not lost
    assert summary["trials"] == {"complete": 20, "pruned": 0, "failed": 0, "interrupted": 0}

