"""kill -9 of the driver and its Ray workers, then `evomerge resume`: the budget is
met, no finished trial is lost or run twice, exactly one MLflow child run per trial.

One test kills from outside at whatever moment the fifth trial finishes; the others
kill from inside the real code path at a chosen moment (tests/reliability/killer.py):
in the middle of a merge, in the middle of scoring, and between a tell and its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .common import cli_env, write_experiment

pytestmark = pytest.mark.slow


def _finished(run: Path, name: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not (run / "study.db").exists():
        return []
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}")
    except KeyError:
        return []
    return [t for t in study.trials if t.state.is_finished()]


def _experiment(tiny_zoo: Path, tmp_path: Path, trials: int) -> tuple[Path, Path, dict[str, str]]:
    dare = {"method": "dare_linear", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.7}}
    search = {"sampler": "cmaes", "seed": 3, "trials": trials}
    path = write_experiment(tiny_zoo, tmp_path / "exp.yaml", name="killed", merge=dare, search=search, samples=60)
    return path, tmp_path / "run", cli_env(tmp_path / "mlflow.db")


def _resume_and_check(run: Path, env: dict[str, str], trials: int, before: dict[int, float]) -> list:
    """Resume, then check every promise; return the finished trials."""
    res = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    finished = _finished(run, "killed")
    assert len(finished) == trials  # the budget exactly: interrupted trials (failed) and their retries count
    # fewer than the three weights: killed while drawing its parameters, never dispatched, not retried
    interrupted = [t for t in finished if t.state.name == "FAIL" and len(t.params) == 3]
    retries = [t for t in finished if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in interrupted)
    for t in retries:
        assert t.params == finished[t.user_attrs["retry_of"]].params
    after = {t.number: t.value for t in finished if t.state.name == "COMPLETE"}
    assert all(after[n] == v for n, v in before.items())  # nothing finished was lost or redone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = sorted(int(r.data.tags["trial"]) for r in runs if "trial" in r.data.tags)
    assert children == [t.number for t in finished]  # exactly one child run per trial
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    states = {int(r.data.tags["trial"]): r.data.tags["state"] for r in runs if "trial" in r.data.tags}
    assert all(states[t.number] == t.state.name for t in finished)
    assert (run / "summary.json").is_file()
    return finished


def test_kill_9_mid_search_then_resume(tiny_zoo, tmp_path):
    path, run, env = _experiment(tiny_zoo, tmp_path, 40)
    cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_finished(run, "killed")) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    before = {t.number: t.value for t in _finished(run, "killed") if t.state.name == "COMPLETE"}
    assert 5 <= len(before) < 40
    _resume_and_check(run, env, 40, before)


@pytest.mark.parametrize("moment", ["merge:5", "score:7", "log:9"])
def test_kill_9_at_a_chosen_moment_then_resume(tiny_zoo, tmp_path, moment):
    trials = 16
    path, run, env = _experiment(tiny_zoo, tmp_path, trials)
    env["EVOMERGE_TEST_KILL"] = moment
    cmd = [sys.executable, "-m", "tests.reliability.killer", "run", str(path), "--out", str(run), "--quiet"]
    proc = subprocess.run(cmd, env=env, start_new_session=True, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    number = int(moment.split(":")[1])
    finished = {t.number: t for t in _finished(run, "killed")}
    if moment.startswith("log"):
        assert finished[number].state.name == "COMPLETE"  # told, never logged
    else:
        assert number not in finished  # killed in flight: left RUNNING
    before = {n: t.value for n, t in finished.items() if t.state.name == "COMPLETE"}
    after = {t.number: t for t in _resume_and_check(run, env, trials, before)}
    if not moment.startswith("log"):
        assert after[number].state.name == "FAIL"
        retry = next(t for t in after.values() if t.user_attrs.get("retry_of") == number)
        assert retry.state.name == "COMPLETE"
