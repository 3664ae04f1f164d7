"""Optuna samplers and pruners by name, each seeded explicitly."""

from __future__ import annotations

import math

from evomerge.errors import EvomergeError


def population_size(n_dims: int, workers: int, requested: int | None = None) -> int:
    """CMA-ES population: the requested size, else 4 + 3 ln n (Hansen 2016, Eq. 48),
    rounded up to a multiple of the worker count so no worker waits at a generation end."""
    base = requested or 4 + int(3 * math.log(max(n_dims, 1)))
    return int(math.ceil(base / workers) * workers)


def make_sampler(name: str, seed: int, *, population: int, objectives: int):
    import optuna

    if objectives > 1 and name not in ("nsgaii", "random", "tpe"):
        raise EvomergeError(f"search.sampler '{name}' is single-objective; use nsgaii for several objectives")
    if name == "cmaes":
        # Optuna imports the cmaes package (and scipy.stats, 0.5 s here) at the first
        # CMA-ES sample: pay it now, not in the driver mid-search while workers wait.
        import cmaes  # noqa: F401

        return optuna.samplers.CmaEsSampler(
            seed=seed, popsize=population, n_startup_trials=1, warn_independent_sampling=False
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    if name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(population, 4))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise EvomergeError(f"unknown sampler '{name}'")


def fidelity_step(fraction: float) -> int:
    """The step at which a score on ``fraction`` of the samples is reported: the fraction
    in thousandths, so that a pruner's resource is the share of the samples scored."""
    return max(1, round(fraction * 1000))


def make_pruner(kind: str, enabled: bool, fractions: list[float], reduction_factor: int = 3):
    """Median (Optuna's median stopping rule) or successive halving (Jamieson & Talwalkar
    2016; ASHA, Li et al. 2020): at the first fraction and at r, r^2 times it, a trial
    goes on only if it is in the top 1/r of the trials scored there, so fractions such
    as [1/9, 1/3, 1] (r = 3) give every cut a rung."""
    import optuna

    if not enabled:
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=fidelity_step(fractions[0]), reduction_factor=reduction_factor
    )
