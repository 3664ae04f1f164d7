"""Fitness estimated from a few items per task (``fitness.estimator: irt``), plugged into
the search as a dispatcher: the loop asks and tells as ever, knowing nothing of it.

Calibration scores a few models on every sample of the search split (the sources, the
base and some random merges of the search space) and fits the item response model of
:mod:`evomerge.fitness.irt`; each candidate of the search is then scored on the anchor
items only, and its result carries the estimated accuracies and fitness.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import FitnessConfig, aggregate
from evomerge.fitness.irt import IrtEstimator, calibrate
from evomerge.search.dispatch import Dispatcher, run_jobs
from evomerge.search.space import Space
from evomerge.search.worker import Job, JobResult


@dataclass
class Calibrated:
    estimator: IrtEstimator
    samples: int  # the samples the calibration scored


def random_recipes(space: Space, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` merges drawn uniformly from the search space (Optuna's seeded random sampler)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.recipe(space.sample(study.ask())).to_dict() for _ in range(n)]


def calibrate_on(
    dispatcher: Dispatcher, models: dict[str, tuple[dict[str, Any], int]], cfg: FitnessConfig, seed: int
) -> Calibrated:
    """Score each of ``models`` (name -> recipe and its merge seed) on every sample of the
    search split and calibrate the estimator on their per-sample correctness."""
    names = list(models)
    jobs = [Job(k, models[name][0], seed=models[name][1]) for k, name in enumerate(names)]
    results = run_jobs(dispatcher, jobs)
    failed = [(names[k], r.error) for k, r in results.items() if not r.ok]
    if failed:
        name, error = failed[0]
        raise EvomergeError(f"fitness.estimator irt: calibration model {name} could not be scored: {error}")
    responses = {
        task: torch.tensor([results[k].per_sample[task] for k in range(len(names))], dtype=torch.bool)
        for task in results[0].per_sample
    }
    assert cfg.anchors is not None  # the config requires anchors with estimator irt
    estimator = calibrate(responses, cfg.anchors, seed, names)
    return Calibrated(estimator, sum(r.samples for r in results.values()))


class EstimatingDispatcher:
    """Search-split jobs scored on the anchors, their results' accuracies and fitness
    the estimates; jobs on other splits (validation, test) pass through unchanged."""

    def __init__(self, inner: Dispatcher, estimator: IrtEstimator, cfg: FitnessConfig):
        self.inner, self.estimator, self.cfg = inner, estimator, cfg
        self.anchors = estimator.anchors()

    @property
    def workers(self) -> int:
        return self.inner.workers

    def idle(self) -> int:
        return self.inner.idle()

    def submit(self, job: Job) -> None:
        self.inner.submit(job if job.split not in (None, self.cfg.split) else replace(job, items=self.anchors))

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        return [self._estimated(r) for r in self.inner.wait(timeout)]

    def _estimated(self, result: JobResult) -> JobResult:
        if not result.ok or result.split not in (None, self.cfg.split):
            return result
        tasks = self.estimator.estimate(result.per_sample)
        result.tasks = tasks
        result.value, result.values = aggregate(self.cfg, tasks)
        return result

    def close(self) -> None:
        self.inner.close()
