"""Managing run directories: resume and status (export lives in ``export.py``)."""

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
    """The config the run started with, read through today's schema (a setting added
    since, at its default, is no change)."""
    if not run.started_config.is_file():
        return None
    try:
        return load_config(run.started_config).to_yaml()
    except EvomergeError:
        return run.started_config.read_text()


def trial_table(path: Path, top: int = 10) -> dict[str, Any]:
    """Progress and the best trials of a run, read from its study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = RunDir(path)
    cfg = load_config(run.config)
    study = optuna.load_study(study_name=cfg.name, storage=run.storage)
    from evomerge.search.loop import is_interrupted

    states: dict[str, int] = {}
    for t in study.trials:
        name = "INTERRUPTED" if is_interrupted(t) else t.state.name
        states[name] = states.get(name, 0) + 1
    counted = sum(states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))  # what the budget counts
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    done.sort(key=lambda t: -(t.values[0] if t.values else float("-inf")))
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else None
    return {
        "experiment": cfg.name,
        "budget": cfg.search.trials,
        "counted": counted,
        "states": states,
        "top": [{"trial": t.number, "values": t.values, "params": t.params} for t in done[:top]],
        "stacks": _described(cfg, [t.params for t in done[:top]]),
        "described_as": "layer stack" if cfg.layers else "experts (gate scale), per token" if cfg.moe else None,
        "summary": summary,
    }


def _described(cfg: ExperimentConfig, points: list[dict[str, Any]]) -> list[str] | None:
    """For a layer-stack or mixture-of-experts search, each point as text (its genes say
    little): the stack, or the experts with their gate scales and the count per token."""
    if (cfg.layers is None and cfg.moe is None) or not points:
        return None
    from evomerge.experiments.run import prepare
    from evomerge.search.moe_space import MoESpace
    from evomerge.search.placement import Placement
    from evomerge.search.stack import StackSpace, runs_of

    space = prepare(cfg, log=lambda _: None, placed=Placement(False, 1, None)).space  # no workers placed
    if isinstance(space, MoESpace):
        return [_mixture(space, p) for p in points]
    assert isinstance(space, StackSpace)
    return [
        " | ".join(
            (f"{space.label(m)} {a}-{b - 1}" if b - a > 1 else f"{space.label(m)} {a}")
            + (f" x{scale:.2f}" if scale != 1.0 else "")
            for m, a, b, scale in runs_of(space.layers(p))
        )
        for p in points
    ]


def _mixture(space: Any, point: dict[str, Any]) -> str:
    moe = space.recipe(point)
    experts = ", ".join(f"{e.source_model.removeprefix('zoo:')} x{e.gate_scale:.2f}" for e in moe.experts)
    return f"{experts} | {moe.experts_per_token}"
