"""A merge worker: source models resident on one device, candidates merged in memory.

The worker loads every source once, keeps their tensors on its device, and owns
one resident model whose parameters each candidate overwrites in place with the
same planner and operators as the one-shot merge (no disk per candidate). It
then scores the model with the fitness evaluator. Nothing here knows of Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import Evaluator, FitnessConfig
from evomerge.operators.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from evomerge.operators.engine import load_inputs, merge_planned, tensor_seed
from evomerge.operators.plan import build_plan
from evomerge.operators.recipe import Recipe


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to set itself up (picklable)."""

    sources: dict[str, str]  # model ref -> local directory
    model_ref: str  # the source whose architecture and tokenizer the resident model takes
    fitness: dict[str, Any]
    zoo_root: str | None
    base_dir: str
    seed: int
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


@dataclass(frozen=True)
class Job:
    """One evaluation: a recipe (with model refs as names), at a fidelity, on a split."""

    key: int
    recipe: dict[str, Any]
    seed: int
    fraction: float = 1.0
    split: str | None = None
    attempt: int = 0


@dataclass
class JobResult:
    key: int
    value: float = float("nan")
    values: list[float] = field(default_factory=list)
    tasks: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    error: str | None = None
    fraction: float = 1.0
    split: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resident_checkpoint(path: Path, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    """Every tensor of a model directory, loaded once onto ``device``."""
    ck = open_checkpoint(path)
    state = {}
    for name, _info in ck.tensors.items():
        t = ck.get(name)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    ck.close()
    infos = {k: TensorInfo(k, path, v.dtype, tuple(v.shape)) for k, v in state.items()}
    return Checkpoint(path, ck.config, infos, pickled=state)


class MergeWorker:
    """Merges and scores candidates against resident sources."""

    def __init__(self, spec: WorkerSpec):
        from evomerge.fitness.scoring import load_model, pick_device
        from evomerge.operators.recipe import DTYPES

        if spec.threads:
            torch.set_num_threads(spec.threads)  # after imports: a module may have set it
        self.spec = spec
        self.device = pick_device(spec.device)
        dtype = DTYPES[spec.dtype]
        self.sources = {ref: resident_checkpoint(Path(p), self.device, dtype) for ref, p in spec.sources.items()}
        self.model, self.tokenizer = load_model(Path(spec.sources[spec.model_ref]), self.device, dtype)
        self.params = self.model.state_dict()
        fitness = FitnessConfig.model_validate(spec.fitness)
        self._fitness = fitness
        self._evaluators: dict[str, Evaluator] = {}

    def evaluator(self, split: str | None) -> Evaluator:
        key = split or self._fitness.split
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(
                self._fitness,
                zoo_root=Path(self.spec.zoo_root) if self.spec.zoo_root else None,
                base_dir=Path(self.spec.base_dir),
                seed=self.spec.seed,
                split=key,
            )
        return self._evaluators[key]

    @torch.no_grad()
    def merge(self, recipe: Recipe, seed: int) -> None:
        """Overwrite the resident model's tensors with the merge of ``recipe``."""
        plan = build_plan(recipe, self.sources)
        for pt in plan.tensors:
            if pt.name not in self.params:
                raise EvomergeError(f"merged tensor '{pt.name}' is not a parameter of the resident model")
            inputs = load_inputs(pt, self.sources, self.device, check_finite=False)
            out = merge_planned(pt, plan, inputs, self.device, seed)
            self.params[pt.name].copy_(out)

    def ready(self) -> bool:
        """Returns once the sources are resident (a Ray caller waits on it)."""
        return True

    def run(self, job: Job) -> JobResult:
        """Merge and score one job; failures come back as a result with ``error`` set."""
        start = time.perf_counter()
        result = JobResult(job.key, fraction=job.fraction, split=job.split)
        try:
            self.merge(Recipe.from_dict(job.recipe, f"trial {job.key}"), tensor_seed(job.seed, "trial"))
            merged = time.perf_counter()
            result.merge_seconds = merged - start
            fit = self.evaluator(job.split).evaluate(self.model, self.tokenizer, fraction=job.fraction)
            result.score_seconds = time.perf_counter() - merged
            result.value, result.values, result.tasks, result.samples = fit.fitness, fit.values, fit.tasks, fit.samples
            if any(v != v for v in [result.value, *result.values]):
                result.error = "the fitness is NaN"
        except EvomergeError as err:
            result.error = str(err)
        return result
