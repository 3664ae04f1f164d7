"""What the MLflow store holds for the dashboard: the experiment's view, the parent run's
settings, chart and description, the best trial's mark, and the reports."""

from __future__ import annotations

import json

import optuna

from evomerge.experiments.dashboard import BEST_TAG, EXPERIMENT_KIND, NOTE, VIEW_KEY
from evomerge.experiments.run import RunOptions, run_experiment

from .search.conftest import tiny_config


def _store(uri, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}
    return client, exp, parent, children


def test_the_store_shows_the_search_at_a_glance(tiny_zoo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "run"
    cfg = tiny_config(tiny_zoo, name="glance", search__trials=8).resolved()
    summary = run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri))
    client, exp, parent, children = _store(uri, "glance")
    # the experiment opens in the model-training view, with a runs table sorted by test fitness
    assert exp.tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view["orderByKey"] == "metrics.`test_fitness`" and view["orderByAsc"] is False
    # the untuned merge is a run too, beside the sources, with its search and test fitness
    baseline = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("evomerge.kind") == "baseline"]
    assert [r.info.run_name for r in baseline] == ["untuned merge"]
    default = summary["baselines"]["default_merge"]
    assert baseline[0].data.metrics["test_fitness"] == default["test_fitness"]
    assert baseline[0].data.metrics["fitness"] == default["fitness"]
    first = ["metrics.`fitness`", "metrics.`validation_fitness`", "metrics.`test_fitness`"]
    assert view["selectedColumns"][:3] == first and view["columnOrder"][:3] == first
    assert "metrics.`acc.rev`" in view["selectedColumns"]
    # search settings are params
    assert parent.data.params["sampler"] == "cmaes" and parent.data.params["trials"] == "8"
    assert parent.data.params["tasks"] == "cp,rev,sort" and parent.data.params["method"] == "task_arithmetic"
    # one chart point per complete trial, step = trial number; best-so-far ends at the best
    study = optuna.load_study(study_name="glance", storage=f"sqlite:///{out / 'study.db'}")
    complete = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    trial_points = client.get_metric_history(parent.info.run_id, "trial_fitness")
    assert {m.step: m.value for m in trial_points} == complete
    best_points = sorted(client.get_metric_history(parent.info.run_id, "best_so_far"), key=lambda m: m.timestamp)
    values = [m.value for m in best_points]
    assert values == sorted(values) and values[-1] == max(complete.values())
    # the description: the summary table with the best trial linked to its run, the recipe, the export
    best = summary["best_trial"]
    text = parent.data.tags[NOTE]
    assert f"[trial {best}](#/experiments/{exp.experiment_id}/runs/{children[best].info.run_id})" in text
    assert "untuned merge" in text and "source `zoo:cp`" in text and "merge_method: task_arithmetic" in text
    assert f"{summary['best_test_fitness']:.4f}" in text and "evomerge export" in text
    # the best trial's run, and it alone, is marked, named so, and carries its validation and test figures
    marked = [n for n, r in children.items() if r.data.tags.get(BEST_TAG) == "true"]
    assert marked == [best] and children[best].data.tags["mlflow.runName"] == f"trial-{best} (best)"
    assert children[best].data.metrics["test_fitness"] == summary["best_test_fitness"]
    assert children[best].data.metrics["validation_fitness"] == summary["best_validation_fitness"]
    # reports and the family tree are image artifacts of the parent
    reports = {a.path for a in client.list_artifacts(parent.info.run_id, "reports")}
    assert {"reports/history.png", "reports/family_tree.png"} <= reports


def test_a_resumed_run_moves_the_best_mark(tiny_zoo, tmp_path):
    """A mark that an earlier session left on another trial moves to the best one."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "run"
    cfg = tiny_config(tiny_zoo, name="moves", search__trials=6).resolved()
    summary = run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri))
    client, _, _, children = _store(uri, "moves")
    best = summary["best_trial"]
    other = next(n for n in children if n != best)
    client.delete_tag(children[best].info.run_id, BEST_TAG)
    client.set_tag(children[other].info.run_id, BEST_TAG, "true")  # as an earlier best would be marked
    client.set_tag(children[other].info.run_id, "mlflow.runName", f"trial-{other} (best)")
    bigger = tiny_config(tiny_zoo, name="moves", search__trials=8).resolved()
    summary = run_experiment(bigger, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri), resume=True)
    _, _, _, children = _store(uri, "moves")
    marked = [n for n, r in children.items() if r.data.tags.get(BEST_TAG) == "true"]
    assert marked == [summary["best_trial"]]
    assert children[other].data.tags["mlflow.runName"] == f"trial-{other}" or other == summary["best_trial"]


def test_the_history_report_draws_the_references(tiny_zoo, tmp_path):
    from evomerge.experiments.plots import history

    out = tmp_path / "run"
    cfg = tiny_config(tiny_zoo, name="refs", search__trials=4).resolved()
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, track=False))
    study = optuna.load_study(study_name="refs", storage=f"sqlite:///{out / 'study.db'}")
    ax = history(study, ["fitness"], {"best source: zoo:cp": 0.2, "untuned merge": 0.1})
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if line.get_label()[0] != "_"}
    lines.pop("Best Value")  # Optuna's own best-so-far line
    assert lines == {"best source: zoo:cp (0.2000)": 0.2, "untuned merge (0.1000)": 0.1}


def test_workers_log_their_system_metrics_when_asked(tiny_zoo, tmp_path):
    """`tracking: {system_metrics: true}`: each worker runs MLflow's own system-metrics
    monitor into a child run of the search, finished when the worker stops."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = tiny_config(tiny_zoo, name="system", search__trials=4).model_dump()
    cfg["tracking"] = {"system_metrics": True, "interval_s": 0.2}
    from evomerge.experiments.config import ExperimentConfig

    run_experiment(
        ExperimentConfig.model_validate(cfg).resolved(),
        tmp_path / "run",
        RunOptions(quiet=True, in_process=True, tracking_uri=uri),
    )
    client, exp, parent, _ = _store(uri, "system")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    workers = [r for r in runs if r.data.tags.get("evomerge.kind") == "worker"]
    assert len(workers) == 1 and workers[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert workers[0].info.status == "FINISHED" and workers[0].info.run_name.startswith("worker-")
    names = set(workers[0].data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= names, names
