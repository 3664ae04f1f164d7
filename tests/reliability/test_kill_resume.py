"""kill -9 of the driver and its Ray workers mid-search, then `evomerge resume`:
the budget is met, no finished trial is lost or run twice, one MLflow child per trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


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


def test_kill_9_mid_search_then_resume(tiny_zoo, tmp_path):
    cfg = {
        "name": "killed",
        "zoo": str(tiny_zoo),
        "models": ["zoo:cp", "zoo:rev", "zoo:sort"],
        "base_model": "zoo:base",
        "merge": {"method": "dare_linear", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.7}},
        "fitness": {"tasks": ["cp", "rev", "sort"], "samples": 60},
        "search": {"sampler": "cmaes", "seed": 3, "trials": 40},
        "workers": 1,
        "device": "cpu",
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)}
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
    res = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = _finished(run, "killed")
    assert len(trials) == 40  # the budget exactly: interrupted trials (failed) and their retries count
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in interrupted)
    after = {t.number: t.value for t in trials if t.state.name == "COMPLETE"}
    assert all(after[n] == v for n, v in before.items())  # nothing finished was lost or redone
    for t in trials:
        if "retry_of" in t.user_attrs:
            assert t.params == trials[t.user_attrs["retry_of"]].params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [int(r.data.tags["trial"]) for r in runs if "trial" in r.data.tags]
    assert len(children) == len(set(children))  # exactly one child per trial
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert (run / "summary.json").is_file()
