"""The run directory: resolved config and its hash, the Optuna storage, results."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def config_hash(self) -> Path:
        return self.path / "config.sha256"

    @property
    def storage(self) -> str:
        return f"sqlite:///{(self.path / 'study.db').resolve()}"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def best_recipe(self) -> Path:
        return self.path / "best_recipe.yml"

    @property
    def started_config(self) -> Path:
        return self.path / ".config.started.yaml"

    def create(self, cfg: ExperimentConfig, *, accept_change: bool = False) -> None:
        """Write the resolved config; refuse a directory that holds a run of another config
        unless ``accept_change`` (a forced resume), which records the new one."""
        text = cfg.to_yaml()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.config_hash.exists():
            if self.config_hash.read_text().strip() == digest:
                return
            if not accept_change:
                raise EvomergeError(
                    f"{self.path}: holds a run with another config (use 'evomerge resume' or a new --out)"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config, text)
        if not self.started_config.exists():
            write_atomic(self.started_config, text)
        write_atomic(self.config_hash, digest + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
