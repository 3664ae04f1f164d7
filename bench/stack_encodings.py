"""Two encodings of the layer-stack space, searched side by side on the demo zoo.

* ``sakana``: the shipped encoding (`evomerge.search.stack.StackSpace`): every layer of
  every model laid out in order, ``repeats`` times, one on/off gene per slot (biased so
  that the centre is the start), and a residual-scale gene per added slot.
* ``slots``: an ordered list of K slots, each choosing a model, a first layer and a
  length (a contiguous range, mergekit's slice), an on/off gene and a residual scale;
  slot 0 decodes to the start at the centre of the cube, the others are off there.

Same config (`configs/demo_slices.yaml`: the stage-1 merge first, then the three
specialists), same fitness and budget, CMA-ES, one in-process worker; reports the
best search fitness per seed and when each search first beat the start.

    python bench/stack_encodings.py [--trials 64] [--seeds 0,1,2] [--slots 3]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import optuna

from evomerge.experiments.config import load_config
from evomerge.experiments.run import prepare
from evomerge.search.dispatch import InProcessDispatcher
from evomerge.search.loop import Budget, SearchLoop
from evomerge.search.samplers import make_sampler, population_size
from evomerge.search.space import Dim
from evomerge.search.stack import BIAS, METHOD, LayerGenes, StackSpace
from evomerge.search.worker import MergeWorker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_slices.yaml"


class SlotListSpace(LayerGenes):
    """K slots of (on, model, first layer, length, scale) genes, all in [-1, 1] but the
    scale. A categorical or integer choice is read from where its gene falls among
    equal bins, shifted so that the centre picks slot 0's start values."""

    def __init__(self, stacks: StackSpace, k: int):
        self.models, self.n_layers, self.dtype = stacks.models, stacks.n_layers, stacks.dtype
        self.depth = stacks.depth
        self.layers_first = self.n_layers[self.models[0]]
        scale = next(d for d in stacks.dims[METHOD] if d.param == "scale")
        self.scale = (scale.low, scale.high)
        dims = []
        for s in range(k):
            for gene in ("on", "model", "first", "length"):
                dims.append(Dim(f"slot{s}:{gene}", METHOD, gene, -1.0, 1.0, False))
            if s:
                dims.append(Dim(f"slot{s}:scale", METHOD, "scale", *self.scale, False))
        self.k = k
        self.dims = {METHOD: dims}

    @staticmethod
    def _pick(gene: float, n: int, centre: int) -> int:
        """An index in [0, n): equal bins over [-1, 1], rotated so that 0 maps to ``centre``."""
        u = min(max((gene + 1) / 2, 0.0), 1.0 - 1e-12)
        return (math.floor(u * n) - n // 2 + centre) % n

    def layers(self, params: dict[str, Any]) -> list[tuple[str, int, float]]:
        out: list[tuple[str, int, float]] = []
        for s in range(self.k):
            bias = BIAS if s == 0 else -BIAS
            if float(params[f"slot{s}:on"]) + bias <= 0:
                continue
            model = self.models[self._pick(float(params[f"slot{s}:model"]), len(self.models), 0)]
            n = self.n_layers[model]
            first = self._pick(float(params[f"slot{s}:first"]), n, 0)
            length = 1 + self._pick(float(params[f"slot{s}:length"]), n, n - 1)
            scale = 1.0 if s == 0 else float(params[f"slot{s}:scale"])
            out += [(model, i, scale) for i in range(first, min(n, first + length))]
        low, high = self.depth
        out = out[:high]
        if len(out) < low:  # too shallow: the start (every encoding must decode to a valid stack)
            out = [(self.models[0], i, 1.0) for i in range(self.layers_first)]
        return out



def search(space, worker: MergeWorker, trials: int, seed: int, start: float, workers: int) -> dict[str, Any]:
    n = len(space.dims[METHOD])
    sampler = make_sampler("cmaes", seed, population=population_size(n, workers), objectives=1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(space.default_params())
    loop = SearchLoop(study, space, InProcessDispatcher(worker=worker), budget=Budget(trials), seed=seed)
    stats = loop.run()
    values = [r.value for r in stats.records if r.value is not None]
    best = max(values)
    beat = next((i + 1 for i, v in enumerate(values) if v > start + 1e-9), None)
    trial = study.best_trial
    return {
        "seed": seed,
        "best": round(best, 4),
        "first_above_start": beat,
        "best_stack": " ".join(
            f"m{space.models.index(m)}:{i}" + (f"x{x:.2f}" if x != 1.0 else "")
            for m, i, x in space.layers(trial.params)
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--slots", type=int, default=3)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(CONFIG).resolved()
    prep = prepare(cfg, workers=1)
    assert isinstance(prep.space, StackSpace)
    worker = MergeWorker(prep.spec)
    from evomerge.search.worker import Job

    start = worker.run(Job(0, prep.space.recipe(prep.space.default_params()).to_dict(), seed=0)).value
    spaces = {"sakana": prep.space, "slots": SlotListSpace(prep.space, args.slots)}
    report: dict[str, Any] = {"start": round(start, 4), "trials": args.trials}
    for name, space in spaces.items():
        report[name] = {
            "genes": len(space.dims[METHOD]),
            "runs": [search(space, worker, args.trials, int(s), start, cfg.workers) for s in args.seeds.split(",")],
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
