"""Managing run directories: resume, status, export of a trial as a model."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig, load_config
from evomerge.experiments.rundir import RunDir


def config_for_resume(path: Path, *, force: bool = False) -> ExperimentConfig:
    """The run's config; refuse (showing the difference) if it changed since the run started."""
    run = RunDir(path)
    if not run.config.is_file():
        raise EvomergeError(f"{path}: not a run directory (no config.yaml)")
    cfg = load_config(run.config)
    started = _started_config(run)
    now = cfg.to_yaml()
    if started is not None and started != now and not force:
        diff = "".join(difflib.unified_diff(started.splitlines(True), now.splitlines(True), "started", "now"))
        raise EvomergeError(
            f"{run.config}: the config changed since the run started (pass --force to continue anyway):\n{diff}"
        )
    return cfg


def _started_config(run: RunDir) -> str | None:
    return run.started_config.read_text() if run.started_config.is_file() else None


def trial_table(path: Path, top: int = 10) -> dict[str, Any]:
    """Progress and the best trials of a run, read from its study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = RunDir(path)
    cfg = load_config(run.config)
    study = optuna.load_study(study_name=cfg.name, storage=run.storage)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    done.sort(key=lambda t: -(t.values[0] if t.values else float("-inf")))
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else None
    return {
        "experiment": cfg.name,
        "budget": cfg.search.trials,
        "states": states,
        "top": [{"trial": t.number, "values": t.values, "params": t.params} for t in done[:top]],
        "summary": summary,
    }


def export_trial(path: Path, out: Path, *, trial: int | None = None, device: str = "cpu", force: bool = False):
    """Materialise the best (or the given) trial of a run as a Hugging Face model directory."""
    import optuna

    from evomerge.experiments.run import prepare, recipe_with_paths
    from evomerge.operators.engine import run_merge

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = RunDir(path)
    cfg = load_config(run.config)
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    number = trial if trial is not None else summary.get("best_trial")
    if number is None:
        raise EvomergeError(f"{path}: no finished search (no summary.json); name a trial with --trial")
    study = optuna.load_study(study_name=cfg.name, storage=run.storage)
    if not 0 <= number < len(study.trials) or study.trials[number].state.name != "COMPLETE":
        raise EvomergeError(f"{path}: trial {number} is not a complete trial of this run")
    prep = prepare(cfg, log=lambda _: None)
    recipe_dict = recipe_with_paths(prep.space.recipe(study.trials[number].params).to_dict(), prep.paths)
    from evomerge.operators.recipe import Recipe

    recipe = Recipe.from_dict(recipe_dict, f"trial {number}")
    from evomerge.operators.engine import tensor_seed
    from evomerge.search.loop import origin_of, trial_seed

    card = _card_extra(cfg, number, study.trials[number].values, summary)
    return run_merge(
        recipe,
        out,
        device=device,
        seed=tensor_seed(trial_seed(cfg.search.seed, origin_of(study.trials[number])), "trial"),
        overwrite=force,
        card_extra=card,
    )


def _card_extra(cfg: ExperimentConfig, number: int, values: list[float], summary: dict[str, Any]) -> str:
    lines = [
        "## Search",
        "",
        f"Found by evomerge experiment `{cfg.name}`, trial {number}, with the "
        f"{cfg.search.sampler} sampler (seed {cfg.search.seed}).",
        "",
    ]
    lines.append(f"- search fitness ({cfg.fitness.split} split): {values[0]:.4f}")
    if summary.get("best_trial") == number and summary.get("best_test_fitness") is not None:
        lines.append(f"- test fitness: {summary['best_test_fitness']:.4f}")
    lines.append(f"- tasks: {', '.join(cfg.fitness.tasks)}")
    return "\n".join(lines)
