"""PNG reports of a search, written into ``RUN_DIR/reports`` (and logged to MLflow by the
tracker): the optimisation history, the parameter importances, and the Pareto front
when there are several objectives. Optuna's matplotlib backend draws them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

REPORTS = "reports"


def write_reports(
    study,
    objectives: list[str],
    out: Path,
    log: Callable[[str], None] = print,
    references: dict[str, float] | None = None,
) -> list[Path]:
    """Draw what the study allows (a plot that cannot be drawn yet is skipped with a line in
    the log). ``references`` (label -> search fitness, such as the best source and the
    untuned merge) are drawn across the optimisation history, so one look says whether
    the search beat them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    if not complete:
        return []
    out.mkdir(parents=True, exist_ok=True)
    multi = len(objectives) > 1
    first = objectives[0]
    plots: dict[str, Callable[[], object]] = {"history": lambda: history(study, objectives, references)}
    if len(complete) >= 3 and len({k for t in complete for k in t.params}) >= 2:
        plots["importance"] = lambda: ovm.plot_param_importances(
            study, target=(lambda t: t.values[0]) if multi else None, target_name=first
        )
    if multi:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=objectives)
    written = []
    for name, draw in plots.items():
        path = out / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                draw()
            fig = plt.gcf()
            fig.set_size_inches(8, 5)
            fig.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        except (ValueError, RuntimeError) as err:  # e.g. importances of parameters that never varied
            log(f"report {name}: skipped ({err})")
        finally:
            plt.close("all")
    return written


def history(study, objectives: list[str], references: dict[str, float] | None = None):
    """The optimisation history of the first objective, with a dashed line for each reference."""
    import optuna.visualization.matplotlib as ovm

    multi = len(objectives) > 1
    target = (lambda t: t.values[0]) if multi else None
    ax = ovm.plot_optimization_history(study, target=target, target_name=objectives[0])
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="0.35", linewidth=1.2, label=f"{label} ({value:.4f})")
    if references:
        ax.legend(loc="lower right", fontsize=8)
    return ax
