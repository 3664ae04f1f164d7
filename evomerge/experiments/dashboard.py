"""What the MLflow UI shows of a search, at a glance.

MLflow 3.x opens an experiment in its GenAI view unless the experiment's
``mlflow.experimentKind`` tag says ``custom_model_development`` (its model-training
view). Its runs table shows no metric columns and nests child runs under their parent
unless told otherwise; a view kept in the experiment tag
``mlflow.sharedViewState.<key>`` and opened with ``?viewStateShareKey=<key>`` tells it:
runs sorted by test fitness, which only the picked best, the untuned merge and the
sources carry, so those come first, side by side (sorted runs are listed flat, children
included), with the fitness, validation, test and per-task columns. The parent run carries the search
settings as params, a Markdown description (``mlflow.note.content``) with the summary
table, the winning recipe and the export, and one point per finished trial of
``trial_fitness`` and ``best_so_far`` (step = trial number). The best trial's child
run is tagged ``evomerge.best`` and named so.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from evomerge.experiments.config import ExperimentConfig

EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.x: the model-training view, not the GenAI one
VIEW_KEY = "evomerge"
BEST_TAG = "evomerge.best"
NOTE = "mlflow.note.content"


BASELINE_LABELS = {
    "default_merge": "untuned merge (every weight 1/N)",
    "all_experts": "every model an expert (gate scales 1)",
}


def columns(tasks: list[str]) -> list[str]:
    """The runs table's metric columns, in order."""
    return ["fitness", "validation_fitness", "test_fitness", *[f"acc.{t}" for t in tasks]]


def view_state(tasks: list[str]) -> str:
    """The shared view of the runs table (MLflow's column keys are ``metrics.`name```)."""
    keys = [f"metrics.`{c}`" for c in columns(tasks)]
    # sorted by test fitness: the rows that have one (the picked best, the untuned merge and
    # the sources) come first, side by side, in the order the held-out split ranks them;
    # every other trial follows (the search fitness column sorts them on a click)
    state = {
        "orderByKey": "metrics.`test_fitness`",
        "orderByAsc": False,
        "searchFilter": "",
        "selectedColumns": keys,
        "columnOrder": keys,  # fitness first (MLflow would order metric columns by name)
    }
    return json.dumps(state)


def configure_experiment(client, experiment_id: str, cfg: ExperimentConfig) -> None:
    """The experiment opens in the model-training view, with evomerge's runs table at hand."""
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", view_state(list(cfg.fitness.tasks)))


def runs_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment in evomerge's view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def search_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The search's settings as MLflow params of the parent run."""
    s, f = cfg.search, cfg.fitness
    params: dict[str, Any] = {
        "sampler": s.sampler,
        "seed": s.seed,
        "trials": s.trials,
        "timeout_minutes": s.timeout_minutes,
        "rerank_top": s.rerank_top,
        "pruning": s.pruning.enabled and f"{s.pruning.pruner} {s.pruning.fractions}",
        "method": "layer stack" if cfg.layers else "mixture of experts" if cfg.moe else ",".join(cfg.merge.methods),
        "granularity": cfg.merge.granularity if cfg.layers is None and cfg.moe is None else None,
        "dtype": cfg.merge.dtype,
        "models": len(cfg.models),
        "base_model": cfg.base_model,
        "tasks": ",".join(f.tasks),
        "split": f.split,
        "samples": f.samples,
        "aggregate": f.aggregate,
        "backend": f.backend,
        "workers": cfg.workers,
        "device": cfg.device,
    }
    return {k: str(v) for k, v in params.items() if v is not None and v is not False}


def note(summary: dict[str, Any], experiment_id: str, best_run: str | None, recipe: dict[str, Any] | None) -> str:
    """The parent run's Markdown description: the summary table, the recipe, the export."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    best = summary["best_trial"]
    link = f"[trial {best}](#/experiments/{experiment_id}/runs/{best_run})" if best_run else f"trial {best}"
    rows = [
        "| candidate | search | validation | test |",
        "| --- | ---: | ---: | ---: |",
        f"| **best: {link}** | **{fmt(summary['best_fitness'])}** | {fmt(summary.get('best_validation_fitness'))} "
        f"| **{fmt(summary.get('best_test_fitness'))}** |",
    ]
    for name, row in summary.get("baselines", {}).items():
        label = BASELINE_LABELS.get(name, f"start ({name})")
        rows.append(f"| {label} | {fmt(row.get('fitness'))} | | {fmt(row.get('test_fitness'))} |")
    for name, row in summary.get("sources", {}).items():
        rows.append(f"| source `{name}` | {fmt(row.get('fitness'))} | | {fmt(row.get('test_fitness'))} |")
    t = summary.get("trials", {})
    lines = [
        f"## evomerge search `{summary['experiment']}`",
        "",
        f"Best merge: {link}, test fitness **{fmt(summary.get('best_test_fitness'))}** "
        "(held-out items, never seen by the search).",
        "",
        *rows,
        "",
        f"Trials: {t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, {t.get('failed', 0)} failed; "
        f"workers busy {summary.get('worker_busy_fraction', 0):.0%}.",
    ]
    if recipe:
        text = yaml.safe_dump(recipe, sort_keys=False).rstrip()
        lines += ["", "### Winning recipe (mergekit YAML)", "", "```yaml", text, "```"]
    export = summary.get("export")
    run_dir = summary.get("run_dir", "RUN_DIR")
    lines += ["", "### Export", ""]
    lines += [f"Exported to `{export}`." if export else f"Not exported yet: `evomerge export {run_dir} OUT_DIR`."]
    return "\n".join(lines) + "\n"


def mark_best(client, experiment_id: str, parent_id: str, number: int, figures: dict[str, float | None]) -> str | None:
    """Tag the best trial's child run (and only it) ``evomerge.best``, name it so, and log
    its validation and test figures; a mark left on another trial by an earlier session
    moves. Returns the best run's id (None when the trial has no child run)."""
    from mlflow.entities import Metric

    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000
    )
    best_id = None
    for r in children:
        trial = r.data.tags.get("trial")
        if trial is None:
            continue
        if int(trial) == number:
            best_id = r.info.run_id
        elif r.data.tags.get(BEST_TAG) == "true":
            client.delete_tag(r.info.run_id, BEST_TAG)
            client.set_tag(r.info.run_id, "mlflow.runName", f"trial-{trial}")
    if best_id is None:
        return None
    client.set_tag(best_id, BEST_TAG, "true")
    client.set_tag(best_id, "mlflow.runName", f"trial-{number} (best)")
    stamp = int(time.time() * 1000)
    client.log_batch(best_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in figures.items() if v is not None])
    return best_id


def with_export(text: str, out, model: str, version) -> str:
    """A parent run's description whose export section names an export (and its registry entry)."""
    from pathlib import Path

    line = f"Exported to `{Path(out).resolve()}` (registered model `{model}`, version {version.version})."
    head, found, _ = text.partition("### Export")
    return (head if found else text.rstrip() + "\n\n") + "### Export\n\n" + line + "\n"
