"""``evomerge ui``: a lean MLflow UI server, opened on a search's runs table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.dashboard import runs_url
from evomerge.experiments.rundir import RunDir
from evomerge.experiments.tracking import parent_run_id


def landing_experiment(client, run_dir: str | None, uri: str) -> str | None:
    """The experiment to open: a run directory's, else the most recently updated one."""
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        if not run.config.is_file():
            raise EvomergeError(f"{run_dir}: not a run directory (no config.yaml)")
        parent = parent_run_id(run, uri)
        if parent is None:
            raise EvomergeError(f"{run_dir}: not tracked in {uri} (see its mlflow.json, or pass --tracking-uri)")
        return client.get_run(parent).info.experiment_id
    found = [e for e in client.search_experiments(order_by=["last_update_time DESC"], max_results=20)]
    found = [e for e in found if e.name != "Default"] or found
    return found[0].experiment_id if found else None


def serve(uri: str, host: str, port: int, experiment_id: str | None, *, open_browser: bool = False) -> int:
    """A lean MLflow UI (one worker, no job runner, no usage telemetry) on ``uri``, opened
    on a search's runs table, until Ctrl-C or SIGTERM."""
    import os
    import sys

    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow's own switch for its usage telemetry
        "DO_NOT_TRACK": "true",
    }
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    base = _base(host, port)
    url = runs_url(base, experiment_id) if experiment_id is not None else base
    return run_server([*cmd, "--workers", "1"], env, f"{base}/health", f"MLflow UI for {uri}: {url}", url, open_browser)


def serve_optuna(run_dir: str, host: str, port: int, *, open_browser: bool = False) -> int:
    """optuna-dashboard on a run's study storage (Optuna's own views: parallel coordinates,
    contours, importances), until Ctrl-C or SIGTERM."""
    import os
    import sys

    run = RunDir(Path(run_dir))
    if not run.study_db.is_file():
        raise EvomergeError(f"{run_dir}: no study.db (not a run directory, or no trial run yet)")
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.is_file():
        raise EvomergeError("--optuna: optuna-dashboard is not installed (pip install optuna-dashboard)")
    cmd = [str(exe), run.storage, "--host", host, "--port", str(port), "--quiet"]
    base = _base(host, port)
    url = f"{base}/dashboard"
    return run_server(cmd, dict(os.environ), f"{base}/api/studies", f"optuna-dashboard for {run_dir}: {url}", url,
                      open_browser)  # fmt: skip


def _base(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def run_server(cmd: list[str], env: dict[str, str], health: str, banner: str, url: str, open_browser: bool) -> int:
    """Run a server in a process group of its own until it exits, or until Ctrl-C or SIGTERM,
    which stop the whole group (a server's own workers included); print ``banner`` once
    ``health`` answers."""
    import os
    import signal
    import subprocess
    import urllib.request

    server = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum: int, _frame: Any) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise SystemExit(0 if signum == signal.SIGTERM else 130)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + 120
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(health, timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    if server.poll() is not None:
        return int(server.returncode or 1)
    print(f"{banner}  (Ctrl-C stops it)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    return int(server.wait())
