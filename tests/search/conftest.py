from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.experiments.config import ExperimentConfig


def tiny_config(zoo: Path, **over) -> ExperimentConfig:
    data = {
        "name": "tiny",
        "zoo": str(zoo),
        "models": ["zoo:cp", "zoo:rev", "zoo:sort"],
        "base_model": "zoo:base",
        "merge": {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}}},
        "fitness": {"tasks": ["cp", "rev", "sort"], "samples": 20},
        "search": {"sampler": "cmaes", "seed": 0, "trials": 6},
        "workers": 1,
        "device": "cpu",
        "threads_per_worker": 1,
    }
    for key, value in over.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ExperimentConfig.model_validate(data)


@pytest.fixture
def tiny_cfg(tiny_zoo):
    return lambda **over: tiny_config(tiny_zoo, **over)
