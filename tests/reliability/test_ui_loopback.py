"""`evomerge ui` serves the MLflow store on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from evomerge.testing import free_port

from .common import cli_env

pytestmark = pytest.mark.slow


def test_ui_binds_loopback_and_serves_the_store(tmp_path):
    port = free_port()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment("seen", artifact_location=(tmp_path / "art").as_uri())
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and body is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                    data=b'{"max_results": 10}',
                    headers={"Content-Type": "application/json"},
                )
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the UI did not come up"
        assert "seen" in {e["name"] for e in body["experiments"]}
        import psutil

        listening = psutil.net_connections("inet")
        bound = [c.laddr.ip for c in listening if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert bound and set(bound) == {"127.0.0.1"}, bound
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


NO_DASHBOARD = """
import psutil, ray
from evomerge.search.ray_pool import init_ray
init_ray(None, 1)
try:
    assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    listening = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert 8265 not in listening, "a dashboard listens on 8265"
finally:
    ray.shutdown()
print("no dashboard")
"""


def test_a_local_ray_cluster_starts_no_dashboard():
    """Ray's web dashboard (an HTTP server with job submission) is never started for a
    local cluster. (Ray's own gRPC services are another matter: see RELIABILITY.md.) In a
    process of its own, as a run starts it: Ray started and stopped more than once in one
    process can crash it (ray-project/ray#31145), and the suite's own Ray session is
    tests/search/test_ray.py's."""
    res = subprocess.run([sys.executable, "-c", NO_DASHBOARD], env=cli_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.split("\n")[-2] == "no dashboard", res.stderr[-3000:]


def test_optuna_dashboard_serves_the_runs_study_on_loopback(tiny_zoo, tmp_path):
    """`evomerge ui RUN_DIR --optuna`: optuna-dashboard on the run's study.db, bound to
    127.0.0.1; SIGTERM stops it."""
    import psutil

    from evomerge.experiments.run import RunOptions, run_experiment

    from ..search.conftest import tiny_config

    run = tmp_path / "run"
    run_experiment(tiny_config(tiny_zoo, name="studied").resolved(), run, RunOptions(quiet=True, in_process=True,
                   track=False))  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "evomerge.cli", "ui", str(run), "--optuna", "--port", str(port)]
    ui = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line, deadline = "", time.monotonic() + 90
        while "optuna-dashboard for" not in line:
            assert ui.poll() is None and time.monotonic() < deadline, "optuna-dashboard did not come up"
            line = ui.stdout.readline() if ui.stdout else ""
        assert line.split(": ", 1)[1].split()[0] == f"http://127.0.0.1:{port}/dashboard"
        body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10).read())
        assert [s["study_name"] for s in body["study_summaries"]] == ["studied"]
        listening = psutil.net_connections("inet")
        bound = [c.laddr.ip for c in listening if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert bound and set(bound) == {"127.0.0.1"}, bound
        server = psutil.Process(ui.pid).children(recursive=True)
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
    _, alive = psutil.wait_procs(server, timeout=20)
    assert not alive
