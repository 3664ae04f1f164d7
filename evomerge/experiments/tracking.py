"""MLflow tracking of a search, written by the driver only.

One MLflow experiment per experiment name, one parent run per run directory
(its id kept in ``RUN_DIR/mlflow.json``, so a resumed run reuses it), one child
run per trial tagged ``trial`` and ``state``, with the searched parameters as
params, fitness, per-task accuracies and merge/score seconds as metrics, the
source models' names and content hashes as tags, and the trial's recipe as a
YAML artifact. A trial that already has a child run never gets a second one; a child
run that a killed session left half-written is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig
from evomerge.experiments.dashboard import NOTE, configure_experiment, mark_best, note, search_params
from evomerge.experiments.rundir import RunDir, check_sqlite, write_json
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


def open_client(uri: str):
    """An MlflowClient on ``uri`` whose store is ready. MLflow creates a SQLite store's
    tables on first use, and two processes doing so at once fail ("table ... already
    exists", "duplicate column name"); a file lock beside the database serialises that."""
    import fcntl
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."

    if not uri.startswith("sqlite:///"):
        client = MlflowClient(uri)
        _probe(client, uri)
        return client
    db = Path(uri[len("sqlite:///") :])
    check_sqlite(db, "MLflow tracking store")
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # the tracking store's tables, under the lock
            client.search_registered_models(max_results=1)  # and the model registry's
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def _probe(client, uri: str) -> None:
    """Refuse a tracking store that does not answer, at once (MLflow retries an HTTP store
    with backoff for minutes): one request, no retries, a 10-second timeout."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # MlflowException, requests' and SQLAlchemy's errors alike
        raise EvomergeError(f"tracking store {uri}: cannot be reached ({_reason(err)})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(err: BaseException) -> str:
    """The gist of a connection error: its errno text when it has one, else its first line."""
    import re

    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if found:
        return found.group(0).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def mlflow_key(name: str) -> str:
    """A searched parameter's name as MLflow accepts it: weight[zoo:add]@mlp -> weight.zoo:add.mlp."""
    return name.replace("[", ".").replace("]", "").replace("@", ".")


def model_hash(path: str, blocks: int = 256, block: int = 4096) -> str:
    """A content fingerprint of a model directory's weights: every safetensors file's name,
    size and header, and ``blocks`` blocks sampled evenly through its data (fine-tunes of
    one base share their headers, never their weights). Reads about 1 MiB per file."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + str(size).encode() + fh.read(min(n, 1 << 24)))
            start = 8 + n
            span = max(0, size - start - block)
            for i in range(blocks):
                fh.seek(start + span * i // max(1, blocks - 1))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


def parent_run_id(run: RunDir, uri: str) -> str | None:
    """The parent run of a run directory, from ``RUN_DIR/mlflow.json``, when it was tracked in ``uri``."""
    if not run.tracking.is_file():
        return None
    saved = json.loads(run.tracking.read_text())
    return saved["parent_run_id"] if saved.get("tracking_uri") == uri else None


def trial_run_id(client, run: RunDir, number: int, uri: str) -> str | None:
    """The child run of trial ``number`` of a run directory tracked in ``uri`` (None when not tracked there)."""
    parent_id = parent_run_id(run, uri)
    if parent_id is None:
        return None
    parent = client.get_run(parent_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.trial = '{number}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


@dataclass(frozen=True)
class SystemMetrics:
    """A worker's system metrics (CPU, memory, disk, network; GPU with pynvml) through
    MLflow's own monitor, into a child run of the search named after the worker's host
    and process. Picklable: the worker calls ``start()`` where it runs (a Ray node) and
    the returned function when it stops."""

    uri: str
    experiment_id: str
    parent_id: str
    interval_s: float = 10.0

    def start(self) -> Callable[[], None]:
        """Start logging; on a node that cannot see the driver's SQLite store (another
        machine) nothing is logged: a store there would be a new, empty one."""
        import socket

        if self.uri.startswith("sqlite:///") and not Path(self.uri[len("sqlite:///") :]).is_file():
            return lambda: None

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        name = f"worker-{socket.gethostname()}-{os.getpid()}"
        tags = {"mlflow.parentRunId": self.parent_id, "evomerge.kind": "worker"}
        run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s, tracking_uri=self.uri)
        monitor.start()

        def stop() -> None:
            monitor.finish()
            client.set_terminated(run_id)

        return stop


def _source_key(ref: str) -> str:
    """The tag key of a source (MLflow keys allow no '@', which a Hub revision brings)."""
    return "source." + ref.replace("@", ":")


def _model_name(path: Path) -> str:
    """A source's short name: its Hub id for a Hub cache snapshot, else its directory's name."""
    from evomerge.operators.hub import hub_origin

    origin = hub_origin(path)
    return origin[0] if origin else path.name


class MlflowTracker:
    """A search-loop observer that records every finished trial as a child run."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, paths: dict[str, str], uri: str | None = None):
        self.uri = tracking_uri(uri)
        self.client = open_client(self.uri)
        exp = self.client.get_experiment_by_name(cfg.name)
        self.experiment_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(cfg.name, artifact_location=_artifact_root(self.uri))
        )
        self.run = run
        self.cfg = cfg
        configure_experiment(self.client, self.experiment_id, cfg)
        self.tags = {_source_key(ref): f"{_model_name(Path(p))}@{model_hash(p)}" for ref, p in paths.items()}
        self.parent_id = self._parent(cfg)
        self.best: float | None = None  # the best fitness logged so far (earlier sessions included)
        self.logged = self._children()

    def _parent(self, cfg: ExperimentConfig) -> str:
        saved = parent_run_id(self.run, self.uri)
        if saved is not None:
            self.client.update_run(saved, status="RUNNING")
            self._log_params(saved, cfg)
            return saved
        parent = self.client.create_run(
            self.experiment_id,
            run_name=self.run.path.name,
            tags={"run_dir": str(self.run.path.resolve()), "sampler": cfg.search.sampler, **self.tags},
        )
        self._log_params(parent.info.run_id, cfg)
        self.client.log_text(parent.info.run_id, cfg.to_yaml(), "config.yaml")
        write_json(self.run.tracking, {"tracking_uri": self.uri, "parent_run_id": parent.info.run_id})
        return parent.info.run_id

    def system_metrics(self) -> SystemMetrics | None:
        """What each worker starts to log its system metrics, when the config asks for them."""
        t = self.cfg.tracking
        return SystemMetrics(self.uri, self.experiment_id, self.parent_id, t.interval_s) if t.system_metrics else None

    def _log_params(self, run_id: str, cfg: ExperimentConfig) -> None:
        """The search settings as params; MLflow params are write-once, so a resumed run
        adds only the ones it lacks (a forced resume's changed values stay in config.yaml)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in search_params(cfg).items() if k not in have]
        if new:
            self.client.log_batch(run_id, params=new)

    def _children(self) -> set[int]:
        """The trials already logged. A child run still RUNNING was cut short while a killed
        session logged it (only one process drives a run directory, and this one has logged
        nothing yet): it is deleted, so that its trial is logged again, whole, once."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=50000
        )
        logged: set[int] = set()
        for r in runs:
            if "trial" not in r.data.tags:
                continue
            if r.info.status == "RUNNING":
                self.client.delete_run(r.info.run_id)
                continue
            logged.add(int(r.data.tags["trial"]))
            value = r.data.metrics.get("fitness")
            if r.data.tags.get("state") == "COMPLETE" and value is not None:
                self.best = value if self.best is None else max(self.best, value)
        return logged

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
        if record.state == "COMPLETE" and record.value is not None:  # the parent charts the search
            self.best = record.value if self.best is None else max(self.best, record.value)
            stamp = int(time.time() * 1000)
            points = {"trial_fitness": record.value, "best_so_far": self.best}
            self.client.log_batch(
                self.parent_id, metrics=[Metric(k, float(v), stamp, record.number) for k, v in points.items()]
            )

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
            self._log_sources(summary)
            best_run = mark_best(
                self.client,
                self.experiment_id,
                self.parent_id,
                int(summary["best_trial"]),
                {
                    "validation_fitness": summary.get("best_validation_fitness"),
                    "test_fitness": summary.get("best_test_fitness"),
                    **{f"test.acc.{t}": v for t, v in (summary.get("best_test_tasks") or {}).items()},
                },
            )
            recipe = yaml.safe_load(self.run.best_recipe.read_text()) if self.run.best_recipe.is_file() else None
            text = note({**summary, "run_dir": str(self.run.path.resolve())}, self.experiment_id, best_run, recipe)
            self.client.set_tag(self.parent_id, NOTE, text)
            reports = self.run.path / "reports"
            self._draw_family_tree(reports)
            if reports.is_dir():
                self.client.log_artifacts(self.parent_id, str(reports), "reports")
        self.client.set_terminated(self.parent_id, status=status)

    def _draw_family_tree(self, reports: Path) -> None:
        """The best merge's family tree (its sources and their own parents) as a report."""
        if not self.run.best_recipe.is_file():
            return
        from evomerge.experiments.lineage import build_tree, draw

        draw(build_tree(self.run.path), reports / "family_tree.png")

    def _log_sources(self, summary: dict[str, Any]) -> None:
        """The source models' scores as child runs tagged ``evomerge.kind=source`` (once per run)."""
        from mlflow.entities import Metric, RunTag

        done = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`evomerge.kind` = 'source'",
            max_results=1000,
        )
        seen = {r.data.tags.get("source") for r in done}
        tasks = ",".join(sorted({t for s in summary.get("sources", {}).values() for t in (s.get("test_tasks") or {})}))
        for ref, scores in summary.get("sources", {}).items():
            if ref in seen or scores.get("test_fitness") is None:
                continue
            name, _, digest = self.tags.get(_source_key(ref), ref).partition("@")
            tags = {"evomerge.kind": "source", "source": ref, "model": name, "hash": digest, "tasks": tasks}
            child = self.client.create_run(
                self.experiment_id, run_name=f"source-{name}", tags={"mlflow.parentRunId": self.parent_id, **tags}
            )
            metrics = {"test_fitness": scores["test_fitness"], "fitness": scores.get("fitness")}
            metrics |= {f"acc.{t}": v for t, v in (scores.get("tasks") or {}).items()}
            metrics |= {f"test.acc.{t}": v for t, v in (scores.get("test_tasks") or {}).items()}
            self.client.log_batch(
                child.info.run_id,
                metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            self.client.set_terminated(child.info.run_id)
        self._log_baselines(summary)

    def _log_baselines(self, summary: dict[str, Any]) -> None:
        """The search's starting point (the untuned merge, or a stack search's start) as a
        child run tagged ``evomerge.kind=baseline``, so the runs table shows it beside the
        best merge and the sources (once per run)."""
        from mlflow.entities import Metric

        done = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`evomerge.kind` = 'baseline'",
            max_results=100,
        )
        seen = {r.data.tags.get("baseline") for r in done}
        for key, scores in summary.get("baselines", {}).items():
            if key in seen or scores.get("test_fitness") is None:
                continue
            name = "untuned merge" if key == "default_merge" else key
            tags = {"mlflow.parentRunId": self.parent_id, "evomerge.kind": "baseline", "baseline": key}
            child = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            metrics = {"test_fitness": scores["test_fitness"], "fitness": scores.get("fitness")}
            metrics |= {f"acc.{t}": v for t, v in (scores.get("tasks") or {}).items()}
            metrics |= {f"test.acc.{t}": v for t, v in (scores.get("test_tasks") or {}).items()}
            stamp = int(time.time() * 1000)
            self.client.log_batch(
                child.info.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items() if v is not None]
            )
            self.client.set_terminated(child.info.run_id)


def log_lineage(tree_json: dict[str, Any], png: Path, target: Path, uri: str | None = None) -> str:
    """Log a family tree (JSON and PNG) to MLflow; return the run it went to.

    The run is the trial's child run for an evomerge export tracked in this store, the
    parent run for a run directory, else a run named after the model in the experiment
    ``evomerge-lineage``."""
    from evomerge.experiments.lineage import LINEAGE_FILE

    uri = tracking_uri(uri)
    client = open_client(uri)
    run_id = None
    record = target / LINEAGE_FILE
    if record.is_file():
        data = json.loads(record.read_text())
        if Path(data.get("run_dir", "")).is_dir():
            run_id = trial_run_id(client, RunDir(Path(data["run_dir"])), int(data["trial"]), uri)
    if run_id is None:
        run_id = parent_run_id(RunDir(target), uri)
    if run_id is None:
        exp = client.get_experiment_by_name("evomerge-lineage")
        exp_id = exp.experiment_id if exp else client.create_experiment("evomerge-lineage", _artifact_root(uri))
        created = client.create_run(exp_id, run_name=target.name, tags={"model_dir": str(target)})
        run_id = created.info.run_id
        client.set_terminated(run_id)
    client.log_text(run_id, json.dumps(tree_json, indent=2), "lineage/tree.json")
    client.log_artifact(run_id, str(png), "lineage")
    return run_id
