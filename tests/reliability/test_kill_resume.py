"""kill -9 of the driver and its Ray workers, then `evomerge resume`: the budget is
met, no finished trial is lost or run twice, exactly one MLflow child run per trial.

One test kills from outside at whatever moment the fifth trial finishes; the others
kill from inside the real code path at a chosen moment (tests/reliability/killer.py):
in the middle of a merge, in the middle of scoring, and between a tell and its log
(one run killed three times, each resume at a later moment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.search.loop import is_interrupted, origin_of

from .common import cli_env, complete_trials, write_experiment

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


def _experiment(tiny_zoo: Path, tmp_path: Path, trials: int, workers: int = 1) -> tuple[Path, Path, dict[str, str]]:
    dare = {"method": "dare_linear", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.7}}
    search = {"sampler": "cmaes", "seed": 3, "trials": trials}
    path = write_experiment(
        tiny_zoo, tmp_path / "exp.yaml", name="killed", merge=dare, search=search, samples=60, workers=workers
    )
    return path, tmp_path / "run", cli_env(tmp_path / "mlflow.db")


def _resume(run: Path, env: dict[str, str], *, killer: str | None = None) -> subprocess.CompletedProcess:
    module = "tests.reliability.killer" if killer else "evomerge.cli"
    env = {**env, "EVOMERGE_TEST_KILL": killer} if killer else env
    return subprocess.run(
        [sys.executable, "-m", module, "resume", str(run), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def _resume_and_check(run: Path, env: dict[str, str], trials: int, before: dict[int, float]) -> list:
    """Resume, then check every promise; return the finished trials."""
    res = _resume(run, env)
    assert res.returncode == 0, res.stderr[-3000:]
    return _check(run, env, trials, before)


def _check(run: Path, env: dict[str, str], trials: int, before: dict[int, float]) -> list:
    finished = _finished(run, "killed")
    assert len(finished) == len(_all(run, "killed"))  # nothing left WAITING or RUNNING
    evaluated = [t for t in finished if not is_interrupted(t)]
    assert len(evaluated) == trials  # the budget counts evaluated candidates; interrupted ones are retried
    assert sum(t.state.name == "COMPLETE" for t in evaluated) == trials  # nothing here fails on its own
    # an interrupted trial with all three weights was dispatched: its parameter set runs again, to the end;
    # one with fewer was killed while drawing its parameters, never dispatched, and is not retried
    by_number = {t.number: t for t in finished}
    for t in finished:
        if is_interrupted(t) and len(t.params) == 3:
            later = [u for u in finished if origin_of(u) == origin_of(t) and u.number > t.number]
            assert later and not is_interrupted(later[-1]), f"trial {t.number} was never run again"
            assert all(u.params == t.params for u in later)
    for t in finished:
        if "retry_of" in t.user_attrs:
            assert t.params == by_number[t.user_attrs["retry_of"]].params
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


def _all(run: Path, name: str) -> list:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}")
    return study.trials


def test_kill_9_mid_search_then_resume(tiny_zoo, tmp_path):
    path, run, env = _experiment(tiny_zoo, tmp_path, 40)
    cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while complete_trials(run) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    before = {t.number: t.value for t in _finished(run, "killed") if t.state.name == "COMPLETE"}
    assert 5 <= len(before) < 40
    _resume_and_check(run, env, 40, before)


def test_kill_9_at_chosen_moments_then_resume(tiny_zoo, tmp_path):
    """Killed mid-merge of trial 5 (the run), mid-scoring of trial 9 (the first resume),
    between the tell and the MLflow log of trial 13 (the second resume), then resumed to
    the end: after each kill the trial is where the moment left it, and in the end each
    trial killed in flight failed and was run again, the logged one was logged once."""
    trials = 16
    path, run, env = _experiment(tiny_zoo, tmp_path, trials)
    cmd = [sys.executable, "-m", "tests.reliability.killer", "run", str(path), "--out", str(run), "--quiet"]
    first = subprocess.run(
        cmd,
        env={**env, "EVOMERGE_TEST_KILL": "merge:5"},
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    before = {t.number: t.value for t in _finished(run, "killed") if t.state.name == "COMPLETE"}
    assert 5 not in before and len(before) >= 4  # killed in flight: left RUNNING
    for moment in ("score:9", "log:13"):
        res = _resume(run, env, killer=moment)
        assert res.returncode == -signal.SIGKILL, (moment, res.stderr[-3000:])
        finished = {t.number: t for t in _finished(run, "killed")}
        number = int(moment.split(":")[1])
        if moment.startswith("log"):
            assert finished[number].state.name == "COMPLETE"  # told, never logged
        else:
            assert number not in finished
        assert all(finished[n].value == v for n, v in before.items())
        before = {n: t.value for n, t in finished.items() if t.state.name == "COMPLETE"}
    after = {t.number: t for t in _resume_and_check(run, env, trials, before)}
    for number in (5, 9):
        assert after[number].state.name == "FAIL"
        retry = next(t for t in after.values() if t.user_attrs.get("retry_of") == number)
        assert retry.state.name == "COMPLETE"


def _run_until(cmd: list[str], env: dict[str, str], run: Path, complete: int) -> None:
    """Start ``cmd`` in its own process group; kill -9 the group once ``complete`` trials are."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while complete_trials(run) < complete:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_twice_with_two_workers_then_resume_meets_the_budget(tiny_zoo, tmp_path):
    """Two workers, two jobs queued on each: every kill cuts several trials short. Killed
    after about 6 and about 12 of 18 trials (the second time during a resume), then
    resumed: 18 evaluated trials, every interrupted parameter set run again, none
    left waiting, one MLflow child run per trial."""
    path, run, env = _experiment(tiny_zoo, tmp_path, 18, workers=2)
    _run_until([sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"], env, run, 6)
    before = {t.number: t.value for t in _finished(run, "killed") if t.state.name == "COMPLETE"}
    _run_until([sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"], env, run, 12)
    assert any(is_interrupted(t) for t in _finished(run, "killed"))
    _resume_and_check(run, env, 18, before)


def test_kill_9_during_a_resumes_own_start_then_resume(tiny_zoo, tmp_path):
    """Killed mid-merge, then killed again while the resume queues the retries (after the
    first retry is queued, before its original is told FAIL): the next resume queues
    no second retry of it and meets the budget."""
    trials = 12
    path, run, env = _experiment(tiny_zoo, tmp_path, trials, workers=2)
    cmd = [sys.executable, "-m", "tests.reliability.killer", "run", str(path), "--out", str(run), "--quiet"]
    first = subprocess.run(
        cmd, env={**env, "EVOMERGE_TEST_KILL": "merge:5"}, start_new_session=True, capture_output=True, timeout=300
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    running = [t.number for t in _all(run, "killed") if t.state.name == "RUNNING"]
    assert len(running) >= 2  # both workers held jobs
    second = _resume(run, env, killer="enqueue:1")
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    states = {t.number: t.state.name for t in _all(run, "killed")}
    assert any(s == "WAITING" for s in states.values()) and any(states[n] == "RUNNING" for n in running)
    before = {t.number: t.value for t in _finished(run, "killed") if t.state.name == "COMPLETE"}
    finished = _resume_and_check(run, env, trials, before)
    for n in running:  # each interrupted parameter set ran exactly once more
        assert sum(t.user_attrs.get("retry_of") == n for t in finished) == 1
