"""Two experiments writing to one MLflow store at the same time (a fresh SQLite file,
so both also race to create its tables): nothing lost, no "database is locked"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .common import cli_env, write_experiment

pytestmark = pytest.mark.slow


def test_two_experiments_on_one_store_at_once(tiny_zoo, tmp_path):
    env = cli_env(tmp_path / "shared.db", fresh=True)  # two processes create it at once
    store = env["MLFLOW_TRACKING_URI"]
    procs = {}
    for name, method in (("left", "task_arithmetic"), ("right", "linear")):
        merge = {"method": method, "parameters": {"weight": {"low": 0.0, "high": 1.5}}}
        search = {"sampler": "tpe", "seed": 1, "trials": 24}
        path = write_experiment(tiny_zoo, tmp_path / f"{name}.yaml", name=name, merge=merge, search=search, samples=20)
        cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(tmp_path / name), "--quiet"]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "locked" not in err.lower()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    for name in procs:
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        trials = [r for r in runs if "trial" in r.data.tags]
        assert sorted(int(r.data.tags["trial"]) for r in trials) == list(range(24))
        assert all(r.info.status == "FINISHED" and "fitness" in r.data.metrics for r in trials)
        assert all(len(r.data.params) == 3 for r in trials)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and "best_test_fitness" in parents[0].data.metrics


RACER = """
import sys, time
from evomerge.experiments.tracking import open_client
start, uri, name = float(sys.argv[1]), sys.argv[2], sys.argv[3]
while time.time() < start:
    pass
client = open_client(uri)
exp = client.create_experiment(name)
parent = client.create_run(exp)
for i in range(20):
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_metric(run.info.run_id, "fitness", i)
    client.set_terminated(run.info.run_id)
"""


def test_processes_opening_a_fresh_store_at_the_same_instant(tmp_path):
    """MLflow alone fails this (its table creation races: 'table ... already exists');
    evomerge's open_client serialises it."""
    import time

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = time.time() + 6  # every process imported and waiting
    env = cli_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(start), uri, f"e{i}"], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for i in range(4):
        exp = client.get_experiment_by_name(f"e{i}")
        assert len(client.search_runs([exp.experiment_id], max_results=100)) == 21
