"""A search on a real multi-node Ray cluster: a head and two worker nodes started with
`ray start` on this machine (each its own raylet, one CPU each), an evomerge run handed
to the head with `ray job submit`, and one joined with `evomerge run --ray-address`. The
workers spread over the nodes, and `summary.json` says which nodes ran trials and how
busy each was. One worker node cannot see the driver's directories (the zoo, the
config's folder, the evomerge package): the models come from the driver (``models_from:
driver``), the fitness data and evomerge with the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ..cli import run_cli
from .common import ROOT, cli_env, complete_trials, ray_cluster, write_experiment

pytestmark = pytest.mark.slow

# the search's budget in time (its trials take a fraction of a second): long enough for a
# node to start and its workers to load on a loaded machine after the loss (a `ray start`
# there has taken 8 s to 114 s, its workers' start ten more)
MINUTES = 3


def test_a_search_submitted_as_a_ray_job_uses_three_nodes(tiny_zoo, tmp_path):
    merge = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}}}
    path = write_experiment(
        tiny_zoo, tmp_path / "exp.yaml", name="cluster", merge=merge, search={"trials": 6}, samples=20, workers="auto"
    )
    path.write_text(path.read_text() + "models_from: driver\n")
    run = tmp_path / "run"
    env = cli_env(tmp_path / "mlflow.db")
    with ray_cluster(workers=2, hide=[tiny_zoo.parent, tmp_path, ROOT / "evomerge"], jobs=True) as cluster:
        # the job's driver runs on the head node and joins the cluster through RAY_ADDRESS,
        # which Ray sets for it; `ray job submit` waits and exits 1 when the job fails
        entry = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"]
        cluster.env = env  # the job's driver tracks into the test's store
        res = cluster.submit(entry)
        assert res.returncode == 0 and "succeeded" in res.stdout, (res.stdout + res.stderr)[-3000:]
        status = run_cli("status", str(run), env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trials"]["complete"] == 6
    # workers: auto placed from the cluster's resources (not this driver's cores): one
    # worker of one thread on each of the three one-CPU nodes
    assert (summary["workers"], summary["nodes"]) == (3, 3), summary
    busy = summary["node_busy_fraction"]
    assert len(busy) == 3 and all(0 < fraction <= 1.0 for fraction in busy.values())  # the hidden node's too
    assert status.returncode == 0 and "ray nodes: 3 (" in status.stdout


def test_a_lost_node_costs_no_trial_and_a_node_that_joins_gets_work(tiny_zoo, tmp_path):
    """kill -9 of a worker node (its raylet and the worker on it) mid-search: the trials it
    held are run again on the head, the budget is met with none lost or counted twice; a
    node of two CPUs joins mid-search and runs trials: the lost worker's replacement,
    waiting for room, starts there, and the pool (``workers: auto``) grows onto its other
    CPU. A head and one node (not two): the fewer processes the search keeps busy on a
    2-core machine, the sooner the new node's `ray start` gets through."""
    dare = {"method": "dare_linear", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.7}}
    search = {"trials": None, "timeout_minutes": MINUTES}
    path = write_experiment(
        tiny_zoo, tmp_path / "exp.yaml", name="lost", merge=dare, search=search, samples=60, workers="auto"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run), "--quiet"]
    with ray_cluster(workers=1) as cluster:
        proc = subprocess.Popen(
            [*cmd, "--ray-address", cluster.address], env=cli_env(tmp_path / "mlflow.db"),
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while complete_trials(run) < 2:  # the two workers are up and busy
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
                time.sleep(0.2)
            cluster.kill(cluster.nodes[-1])
            lost_at = time.monotonic()
            cluster.add_worker(cpus=2)
            joined = time.monotonic() - lost_at
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((run / "summary.json").read_text())
    assert joined < MINUTES * 60 * 2 / 3, f"the node took {joined:.0f} s to join: the search may end before it works"
    trials = summary["trials"]
    assert trials["complete"] > 20, trials
    assert trials == {"complete": trials["complete"], "pruned": 0, "failed": 0, "interrupted": 0}
    # trials ran on the lost node, the head, and the node that joined
    figures = {k: summary[k] for k in ("trials", "wall_seconds", "workers", "nodes", "node_busy_fraction")}
    assert summary["nodes"] == 3 and len(summary["node_busy_fraction"]) == 3, figures
    # two at the start, one more when the cluster grew; or two more, when the new node
    # joined before Ray noticed the loss (its health checks take seconds): the pool grew
    # onto both its CPUs and the lost worker's replacement waits for room (counted)
    assert summary["workers"] in (3, 4), figures
