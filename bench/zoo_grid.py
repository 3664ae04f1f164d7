"""Task-arithmetic weight grid on the demo zoo, scored on a split (default: test).

Shows where the best merge weights lie (the zoo is designed so that they are not
uniform) and what the best grid point, the uniform 1/N merge and each source score.
Uses the same resident merge worker as the search.

    python bench/zoo_grid.py [--split test] [--values 0,0.25,0.5,0.75,1,1.25] [--samples N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from evomerge.experiments.config import ExperimentConfig
from evomerge.fitness.evaluate import FitnessConfig
from evomerge.fitness.zoo import default_zoo_dir, ensure_zoo, load_zoo
from evomerge.search.merge_space import MergeSpace
from evomerge.search.space import SearchSpace
from evomerge.search.worker import Job, MergeWorker, WorkerSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test")
    ap.add_argument("--values", default="0,0.25,0.5,0.75,1,1.25")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--zoo", default=None, help="a zoo directory, used as it is (default: the cached demo zoo)")
    args = ap.parse_args()
    zoo = ensure_zoo(default_zoo_dir()) if args.zoo is None else Path(args.zoo).resolve()
    load_zoo(zoo)  # a clear error when it is not a zoo
    fitness = FitnessConfig(tasks={"add": {}, "rev": {}, "sort": {}}, split=args.split, samples=args.samples)
    cfg = ExperimentConfig(
        zoo=str(zoo),
        models=["zoo:add", "zoo:rev", "zoo:sort"],
        base_model="zoo:base",
        merge=MergeSpace(method="task_arithmetic"),
        fitness=fitness,
    )
    paths = {r: str(cfg.resolve_model(r)) for r in ["zoo:base", *cfg.models]}
    worker = MergeWorker(WorkerSpec(paths, "zoo:base", fitness.model_dump(mode="json"), str(zoo), ".", 0))
    space = SearchSpace(cfg.merge, cfg.models, cfg.base_model, 4)
    values = [float(v) for v in args.values.split(",")]
    rows = []
    start = time.perf_counter()
    for w in itertools.product(values, repeat=3):
        params = {d.name: v for d, v in zip(space.dims["task_arithmetic"], w)}
        r = worker.run(Job(0, space.recipe(params).to_dict(), seed=0))
        rows.append((r.value, w, r.tasks))
    rows.sort(key=lambda x: -x[0])
    uniform = worker.run(Job(0, space.recipe(space.default_params()).to_dict(), seed=0))
    sources = {}
    for ref in cfg.models:
        recipe = {"merge_method": "linear", "models": [{"model": ref}]}
        sources[ref] = worker.run(Job(0, recipe, seed=0)).value
    report = {
        "split": args.split,
        "grid_points": len(rows),
        "best": [{"weights": w, "fitness": round(v, 4), "tasks": t} for v, w, t in rows[:5]],
        "uniform_1_over_n": round(uniform.value, 4),
        "sources": {k: round(v, 4) for k, v in sources.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
