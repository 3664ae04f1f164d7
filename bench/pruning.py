"""Multi-fidelity pruning: samples scored against the best fitness reached.

The demo's space and fitness (search split, 300 samples per task), CMA-ES, one
in-process worker. For each seed, a search without pruning runs ``--trials``
trials; a search with a pruner then runs until it reaches the same best fitness
(or ``--factor`` times as many trials). Reported: the samples each scored until
it first reached that best, and their ratio (goal: at least 3x fewer with pruning).
A pruned trial's best is its full-fidelity score, so the two bests compare like
for like.

    python bench/pruning.py [--trials 48] [--seeds 0,1,2] [--fractions 0.111,0.333,1]
                            [--pruner successive_halving|median] [--sampler cmaes|tpe|random]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import optuna

from evomerge.experiments.config import load_config
from evomerge.experiments.run import prepare
from evomerge.search.dispatch import InProcessDispatcher
from evomerge.search.loop import Budget, SearchLoop, SearchStats, TrialRecord
from evomerge.search.samplers import make_pruner, make_sampler, population_size
from evomerge.search.worker import MergeWorker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _search(
    prep, worker, seed: int, trials: int, fractions: list[float], pruner: str, stop_at: float | None, kind: str, rf=3
):
    """(samples scored, best) after every complete trial, until ``stop_at`` is reached."""
    dims = sum(len(d) for d in prep.space.dims.values())
    sampler = make_sampler(kind, seed, population=population_size(dims, 2), objectives=1)
    study = optuna.create_study(
        direction="maximize", sampler=sampler, pruner=make_pruner(pruner, len(fractions) > 1, fractions, rf)
    )
    study.enqueue_trial(prep.space.default_params())
    curve: list[tuple[int, float]] = []
    loop = SearchLoop(
        study, prep.space, InProcessDispatcher(worker=worker), budget=Budget(trials), seed=seed, fractions=fractions
    )

    def observe(record: TrialRecord, stats: SearchStats) -> None:
        if record.state == "COMPLETE" and record.value is not None:
            best = max(record.value, curve[-1][1] if curve else -1.0)
            curve.append((stats.samples_scored, best))
            if stop_at is not None and best >= stop_at - 1e-12:
                loop.budget.trials = 0  # reached: ask no more

    loop.observers.append(observe)
    stats = loop.run()
    return curve, stats


def _first(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((samples for samples, best in curve if best >= target - 1e-12), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--factor", type=int, default=4, help="trial budget of the pruned search, in units of --trials")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default="0.111,0.333,1")
    ap.add_argument("--pruner", default="successive_halving", choices=["successive_halving", "median"])
    ap.add_argument("--sampler", default="cmaes", choices=["cmaes", "tpe", "random"])
    ap.add_argument("--reduction-factor", type=int, default=3)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prep = prepare(load_config(CONFIG), workers=1)
    worker = MergeWorker(prep.spec)
    fractions = [float(f) for f in args.fractions.split(",")]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        full, _ = _search(prep, worker, seed, args.trials, [1.0], "median", None, args.sampler)
        target = full[-1][1]
        pruned, stats = _search(
            prep,
            worker,
            seed,
            args.trials * args.factor,
            fractions,
            args.pruner,
            target,
            args.sampler,
            args.reduction_factor,
        )
        n_full, n_pruned = _first(full, target), _first(pruned, target)
        runs.append(
            {
                "seed": seed,
                "best_without_pruning": round(target, 4),
                "samples_to_reach_it_without": n_full,
                "best_with_pruning": round(pruned[-1][1], 4) if pruned else None,
                "samples_to_reach_it_with": n_pruned,
                "trials_with": stats.finished,
                "pruned_trials": stats.pruned,
                "samples_ratio": round(n_full / n_pruned, 2) if n_full and n_pruned else None,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "sampler": args.sampler,
        "fractions": fractions,
        "pruner": args.pruner,
        "trials": args.trials,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
