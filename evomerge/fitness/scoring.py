"""Loading a model directory and scoring it on an experiment's fitness."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from evomerge.errors import EvomergeError, ModelError
from evomerge.fitness.evaluate import Evaluator, FitnessResult, aggregate


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def load_model(path: Path, device: torch.device, dtype: torch.dtype | None = None):
    """A causal LM and its tokenizer from a local directory; remote code is never run."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model path '{path}' is not a model directory (no config.json)")
    if "auto_map" in json.loads(cfg.read_text()):
        raise ModelError(f"{cfg}: the model asks for remote code (auto_map), which evomerge never runs")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load model: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def load_tokenizer(path: Path):
    """The tokenizer of a model directory (cached: a worker asks for the same few)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load its tokenizer: {str(err).splitlines()[0]}") from None


def evaluate_model_dir(
    path: Path, cfg, *, split: str | None = None, backend: str | None = None, estimator=None
) -> FitnessResult:
    """Score the model at ``path`` on ``cfg.fitness`` (an :class:`ExperimentConfig`); with
    an ``estimator`` (:class:`evomerge.fitness.irt.IrtEstimator`, calibrated on the search
    split), on its anchor items only, the accuracies and fitness estimated as a search does."""
    if estimator is not None and (split or cfg.fitness.split) != cfg.fitness.split:
        raise EvomergeError(f"--estimator irt: the estimator was calibrated on the {cfg.fitness.split} split only")
    device = pick_device(cfg.device)
    evaluator = Evaluator(
        cfg.fitness,
        zoo_root=cfg.zoo_dir(),
        base_dir=cfg.source_dir,
        seed=cfg.search.seed,
        split=split,
        backend=backend,
    )
    model, tokenizer = load_model(path, device)
    if estimator is None:
        return evaluator.evaluate(model, tokenizer)
    result = evaluator.evaluate(model, tokenizer, items=estimator.anchors())
    result.tasks = estimator.estimate(result.per_sample)
    result.fitness, result.values = aggregate(cfg.fitness, result.tasks)
    return result
