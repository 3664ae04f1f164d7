"""What the reliability tests share: an experiment on the tiny zoo written as a config
file for the real CLI, and the environment its processes run in."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from evomerge.testing import RayCluster

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


@contextmanager
def ray_cluster(
    workers: int = 0, cpus: int = 1, hide: Sequence[Path] = (), *, jobs: bool = False
) -> Iterator[RayCluster]:
    """A :class:`evomerge.testing.RayCluster` with a head (its job server too, with
    ``jobs``) and ``workers`` worker nodes (the last one started with ``hide`` when given),
    every node killed after."""
    cluster = RayCluster(cpus, env=cli_env())
    try:
        cluster.start_head(jobs=jobs)
        for i in range(workers):
            cluster.add_worker(hide if i == workers - 1 else ())
        assert all(n.poll() is None for n in cluster.nodes), "a Ray node exited" + cluster.said()
        yield cluster
    finally:
        cluster.stop()
