"""CMA-ES against an exhaustive grid over the demo's three task-arithmetic weights.

Scores every point of a grid (7 values per weight by default, 343 merges) on the
search split with the demo's fitness, then runs the demo's CMA-ES search (same
space, same samples, one in-process worker) for a quarter of the grid's
evaluations, and reports when CMA-ES first reached the grid's best fitness.

    python bench/cmaes_vs_grid.py [--values 7] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import optuna

from evomerge.experiments.config import load_config
from evomerge.experiments.run import prepare
from evomerge.search.dispatch import InProcessDispatcher
from evomerge.search.loop import Budget, SearchLoop
from evomerge.search.samplers import make_sampler, population_size
from evomerge.search.worker import Job, MergeWorker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, default=7)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(CONFIG)
    prep = prepare(cfg, workers=1)
    worker = MergeWorker(prep.spec)
    dims = prep.space.dims[cfg.merge.methods[0]]
    lo, hi = dims[0].low, dims[0].high
    axis = [lo + (hi - lo) * i / (args.values - 1) for i in range(args.values)]
    start = time.perf_counter()
    grid_best, grid_point = -1.0, None
    for point in itertools.product(axis, repeat=len(dims)):
        params = {d.name: v for d, v in zip(dims, point)}
        value = worker.run(Job(0, prep.space.recipe(params).to_dict(), seed=0)).value
        if value > grid_best:
            grid_best, grid_point = value, point
    grid_seconds = time.perf_counter() - start
    n_grid = len(axis) ** len(dims)
    budget = n_grid // 4
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        sampler = make_sampler("cmaes", seed, population=population_size(len(dims), cfg.workers), objectives=1)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.enqueue_trial(prep.space.default_params())
        loop = SearchLoop(study, prep.space, InProcessDispatcher(worker=worker), budget=Budget(budget), seed=seed)
        stats = loop.run()
        values = [r.value for r in stats.records if r.value is not None]
        reached = next((i + 1 for i, _ in enumerate(values) if max(values[: i + 1]) >= grid_best - 1e-12), None)
        runs.append({"seed": seed, "best": round(max(values), 4), "evaluations_to_grid_best": reached})
    print(
        json.dumps(
            {
                "grid": {
                    "values_per_weight": args.values,
                    "evaluations": n_grid,
                    "best": round(grid_best, 4),
                    "best_point": [round(x, 3) for x in grid_point or ()],
                    "seconds": round(grid_seconds, 1),
                },
                "cmaes_budget": budget,
                "cmaes": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
