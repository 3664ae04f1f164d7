"""What the reliability tests share: an experiment on the tiny zoo written as a config
file for the real CLI, and the environment its processes run in."""

from __future__ import annotations

import atexit
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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


def complete_trials(run: Path) -> int:
    """Complete trials, read without Optuna (whose first open of a storage that the run is
    still creating races it for the schema) and without writing."""
    import sqlite3

    db = run / "study.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A real Ray cluster on this machine: a head and worker nodes, each its own raylet
    started with `ray start --block` in a process group of its own, ``cpus`` CPUs and no
    GPU each. A worker node started with ``hide`` runs in a mount namespace of its own
    (`unshare -m`) with an empty tmpfs over each of those directories: a machine that
    cannot see them."""

    def __init__(self, cpus: int = 1):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        local = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment
        self.exe = str(local) if local.is_file() else "ray"
        self.common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats", "--block"]
        self.nodes: list[subprocess.Popen] = []
        self.logs = Path(tempfile.mkdtemp(prefix="evomerge-ray-nodes-"))

    def _start(self, cmd: list[str]) -> subprocess.Popen:
        # each node's agent ports named up front: a raylet waits for a dynamic port's file
        # only so long, and on a loaded machine its agent may not write it in time (the
        # raylet then exits: "Timed out waiting for file .../metrics_agent_port_...")
        ports = ["--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
        cmd = [*cmd, *(arg for flag in ports for arg in (flag, str(free_port())))]
        with open(self.logs / f"node{len(self.nodes)}.log", "w") as out:  # `ray start`'s own words, for a failure
            node = subprocess.Popen(cmd, env=cli_env(), start_new_session=True, stdout=out, stderr=out)
        self.nodes.append(node)
        return node

    def said(self) -> str:
        return "".join(f"\n--- {f.name}:\n" + f.read_text()[-1500:] for f in sorted(self.logs.glob("node*.log")))

    def start_head(self) -> None:
        head = [self.exe, "start", "--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1"]
        node = self._start([*head, "--include-dashboard=false", *self.common])
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert node.poll() is None and time.monotonic() < deadline, "ray start did not come up" + self.said()
                time.sleep(0.5)

    def add_worker(self, hide: Sequence[Path] = ()) -> subprocess.Popen:
        """Start a worker node and wait until the cluster knows it (one at a time: raylets
        starting at once on 2 cores miss Ray's 30 s registration limit)."""
        cmd = [self.exe, "start", "--address", self.address, *self.common]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs evomerge-hidden {shlex.quote(str(d))}" for d in hide)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
        node = self._start(cmd)
        registered = self.logs / f"node{len(self.nodes) - 1}.log"
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in registered.read_text():  # printed once the GCS knows the node
            assert node.poll() is None and time.monotonic() < deadline, "a Ray node did not start" + self.said()
            time.sleep(0.5)
        return node

    def kill(self, node: subprocess.Popen) -> None:
        """kill -9 of a node: its raylet, its workers and everything else it started."""
        try:
            os.killpg(node.pid, signal.SIGKILL)  # a node's raylet and workers share its process group
        except ProcessLookupError:
            pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        # `ray start` records its cluster for later `ray.init()` calls to join; it is gone now
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()
        shutil.rmtree(self.logs, ignore_errors=True)


@contextmanager
def ray_cluster(workers: int = 0, cpus: int = 1, hide: Sequence[Path] = ()) -> Iterator[RayCluster]:
    """A :class:`RayCluster` with a head and ``workers`` worker nodes (the last one started
    with ``hide`` when given), every node killed after."""
    cluster = RayCluster(cpus)
    try:
        cluster.start_head()
        for i in range(workers):
            cluster.add_worker(hide if i == workers - 1 else ())
        assert all(n.poll() is None for n in cluster.nodes), "a Ray node exited" + cluster.said()
        yield cluster
    finally:
        cluster.stop()
