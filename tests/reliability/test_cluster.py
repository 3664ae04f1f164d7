"""A search on a real multi-node Ray cluster: a head and two worker nodes started with
`ray start` on this machine (each its own raylet, one CPU each), `evomerge run
--ray-address` against it. The workers spread over the nodes, and `summary.json` says
which nodes ran trials and how busy each was."""

from __future__ import annotations

import json

import pytest

from ..cli import run_cli
from .common import cli_env, ray_cluster, write_experiment

pytestmark = pytest.mark.slow


def test_a_search_on_a_three_node_cluster_uses_several_nodes(tiny_zoo, tmp_path):
    merge = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}}}
    path = write_experiment(
        tiny_zoo, tmp_path / "exp.yaml", name="cluster", merge=merge, search={"trials": 6}, samples=20, workers="auto"
    )
    run = tmp_path / "run"
    env = cli_env(tmp_path / "mlflow.db")
    with ray_cluster(workers=2) as address:
        res = run_cli("run", str(path), "--out", str(run), "--ray-address", address, "--quiet", env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        status = run_cli("status", str(run), env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trials"]["complete"] == 6
    # workers: auto placed from the cluster's resources (not this driver's cores): one
    # worker of one thread on each of the three one-CPU nodes
    assert (summary["workers"], summary["nodes"]) == (3, 3), summary
    busy = summary["node_busy_fraction"]
    assert len(busy) == 3 and all(0 < fraction <= 1.0 for fraction in busy.values())
    assert status.returncode == 0 and "ray nodes: 3 (" in status.stdout
