"""MLflow tracking of a search, written by the driver only.

One MLflow experiment per experiment name, one parent run per run directory
(its id kept in ``RUN_DIR/mlflow.json``, so a resumed run reuses it), one child
run per trial tagged ``trial`` and ``state``, with the searched parameters as
params, fitness, per-task accuracies and merge/score seconds as metrics, the
source models' names and content hashes as tags, and the trial's recipe as a
YAML artifact. A trial that already has a child run never gets a second one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from evomerge.experiments.config import ExperimentConfig
from evomerge.experiments.rundir import RunDir, write_json
from evomerge.search.loop import SearchStats, TrialRecord, record_from_trial

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Beside a SQLite store (MLflow would default to ./mlruns of whatever the working directory is)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def mlflow_key(name: str) -> str:
    """A searched parameter's name as MLflow accepts it: weight[zoo:add]@mlp -> weight.zoo:add.mlp."""
    return name.replace("[", ".").replace("]", "").replace("@", ".")


def model_hash(path: str) -> str:
    """A content hash of a model directory's weights (file names, sizes and safetensors headers)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 24)))
    return h.hexdigest()[:16]


class MlflowTracker:
    """A search-loop observer that records every finished trial as a child run."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, paths: dict[str, str], uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.name)
        self.experiment_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(cfg.name, artifact_location=_artifact_root(self.uri))
        )
        self.run = run
        self.tags = {f"source.{ref}": f"{Path(p).name}@{model_hash(p)}" for ref, p in paths.items()}
        self.parent_id = self._parent(cfg)
        self.logged = self._children()

    def _parent(self, cfg: ExperimentConfig) -> str:
        state = self.run.path / "mlflow.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("tracking_uri") == self.uri:
                self.client.update_run(saved["parent_run_id"], status="RUNNING")
                return saved["parent_run_id"]
        parent = self.client.create_run(
            self.experiment_id,
            run_name=self.run.path.name,
            tags={"run_dir": str(self.run.path.resolve()), "sampler": cfg.search.sampler, **self.tags},
        )
        self.client.log_text(parent.info.run_id, cfg.to_yaml(), "config.yaml")
        write_json(state, {"tracking_uri": self.uri, "parent_run_id": parent.info.run_id})
        return parent.info.run_id

    def _children(self) -> set[int]:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=50000
        )
        return {int(r.data.tags["trial"]) for r in runs if "trial" in r.data.tags}

    def __call__(self, record: TrialRecord, stats: SearchStats) -> None:
        if record.number in self.logged:
            return
        from mlflow.entities import Metric, Param, RunTag

        tags = {"mlflow.parentRunId": self.parent_id, "trial": str(record.number), "state": record.state, **self.tags}
        if record.error:
            tags["error"] = record.error[:4000]
        child = self.client.create_run(self.experiment_id, run_name=f"trial-{record.number}", tags=tags)
        rid = child.info.run_id
        metrics: dict[str, float] = {
            "merge_seconds": record.merge_seconds,
            "score_seconds": record.score_seconds,
            "samples": float(record.samples),
        }
        if record.value is not None:
            metrics["fitness"] = record.value
        metrics.update({f"acc.{t}": v for t, v in record.tasks.items()})
        self.client.log_batch(
            rid,
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
            params=[Param(mlflow_key(k), str(v)) for k, v in record.params.items()],
            tags=[RunTag(k, v) for k, v in tags.items() if k != "mlflow.parentRunId"],
        )
        self.client.log_text(rid, yaml.safe_dump(record.recipe, sort_keys=False), "recipe.yml")
        self.client.set_terminated(rid, status=STATUS[record.state])
        self.logged.add(record.number)

    def backfill(self, study, space) -> int:
        """Log every finished trial of the study that has no child run yet (killed between
        its tell and its log, or interrupted and failed on resume); return how many."""
        missing = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number not in self.logged]
        for t in missing:
            self(record_from_trial(t, space), SearchStats())
        return len(missing)

    def finish(self, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
        if summary:
            keys = ("best_fitness", "best_validation_fitness", "best_test_fitness", "worker_busy_fraction")
            for key in keys:
                if isinstance(summary.get(key), (int, float)):
                    self.client.log_metric(self.parent_id, key, float(summary[key]))
            self.client.set_tag(self.parent_id, "best_trial", str(summary.get("best_trial")))
            self.client.log_text(self.parent_id, json.dumps(summary, indent=2), "summary.json")
        self.client.set_terminated(self.parent_id, status=status)
