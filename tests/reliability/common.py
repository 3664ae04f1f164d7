"""What the reliability tests share: an experiment on the tiny zoo written as a config
file for the real CLI, and the environment its processes run in."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["cp", "rev", "sort"]


def write_experiment(
    zoo: Path,
    path: Path,
    *,
    name: str,
    merge: dict[str, Any],
    search: dict[str, Any],
    samples: int,
    workers: int | str = 1,
) -> Path:
    """A CPU experiment (one worker unless told) merging the tiny zoo's specialists, as a YAML file."""
    cfg: dict[str, Any] = {
        "name": name,
        "zoo": str(zoo),
        "models": [f"zoo:{t}" for t in TASKS],
        "merge": merge,
        "fitness": {"tasks": TASKS, "samples": samples},
        "search": search,
        "workers": workers,
        "device": "cpu",
    }
    if merge["method"] != "linear":
        cfg["base_model"] = "zoo:base"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(store: Path | None = None, *, fresh: bool = False) -> dict[str, str]:
    """The environment of an evomerge process started by a test (Ray without auth, the
    repository importable, MLflow tracking into ``store`` when given). A new ``store`` is
    a copy of an empty store MLflow created once in this session (its schema migrations
    cost seconds per store); ``fresh`` leaves it for the process to create."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if store is not None:
        if not fresh and not store.exists():
            shutil.copyfile(_empty_store(), store)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    return env


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store as MLflow creates it (tables migrated, the default experiment)."""
    from mlflow.tracking import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="evomerge-empty-store-")) / "mlflow.db"
    atexit.register(shutil.rmtree, path.parent, True)
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster(workers: int = 0, cpus: int = 1) -> Iterator[str]:
    """A real Ray cluster on this machine: a head and ``workers`` worker nodes, each its own
    raylet started with `ray start --block` in a process group of its own, ``cpus`` CPUs
    and no GPU each. Yields the head's address; kills every node after."""
    port = free_port()
    local = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment
    exe = str(local) if local.is_file() else "ray"
    common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats", "--block"]
    head = [exe, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    head += ["--include-dashboard=false", *common]
    nodes: list[subprocess.Popen] = []
    logs = Path(tempfile.mkdtemp(prefix="evomerge-ray-nodes-"))

    def start(cmd: list[str]) -> None:
        # each node's agent ports named up front: a raylet waits for a dynamic port's file
        # only so long, and on a loaded machine its agent may not write it in time (the
        # raylet then exits: "Timed out waiting for file .../metrics_agent_port_...")
        ports = ["--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
        cmd = [*cmd, *(arg for flag in ports for arg in (flag, str(free_port())))]
        with open(logs / f"node{len(nodes)}.log", "w") as out:  # `ray start`'s own words, for a failure
            nodes.append(subprocess.Popen(cmd, env=cli_env(), start_new_session=True, stdout=out, stderr=out))

    def said() -> str:
        return "".join(f"\n--- {f.name}:\n" + f.read_text()[-1500:] for f in sorted(logs.glob("node*.log")))

    try:
        start(head)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert nodes[0].poll() is None and time.monotonic() < deadline, "ray start did not come up"
                time.sleep(0.5)
        for _ in range(workers):  # one at a time: raylets starting at once on 2 cores miss Ray's 30 s limit
            start([exe, "start", "--address", f"127.0.0.1:{port}", *common])
            registered = logs / f"node{len(nodes) - 1}.log"
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in registered.read_text():  # printed once the GCS knows the node
                assert nodes[-1].poll() is None and time.monotonic() < deadline, "a Ray node did not start" + said()
                time.sleep(0.5)
        assert all(n.poll() is None for n in nodes), "a Ray node exited" + said()
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGKILL)  # a node's raylet and workers share its process group
            except ProcessLookupError:
                pass
            node.wait()
        # `ray start` records its cluster for later `ray.init()` calls to join; it is gone now
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        shutil.rmtree(logs, ignore_errors=True)
