"""What the reliability tests share: an experiment on the tiny zoo written as a config
file for the real CLI, and the environment its processes run in."""

from __future__ import annotations

import os
import socket
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
    workers: int = 1,
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


def cli_env(store: Path | None = None) -> dict[str, str]:
    """The environment of an evomerge process started by a test (Ray without auth, the
    repository importable, MLflow tracking into ``store`` when given)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if store is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
