"""Every shipped config loads, validates and yields a search space."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.experiments.config import load_config
from evomerge.search.moe_space import MoESpace
from evomerge.search.space import SearchSpace, Space
from evomerge.search.stack import StackSpace

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    text = path.read_text()
    assert text.startswith("#"), "a shipped config opens with a comment saying what it does"
    assert "evomerge run" in text.split("\n\n")[0] or "evomerge run" in text[:1500]
    cfg = load_config(path)
    if cfg.layers is not None:  # a layer-stack search
        low, high = cfg.layers.min_layers or 1, cfg.layers.max_layers or 64
        space: Space = StackSpace(
            cfg.models, dict.fromkeys(cfg.models, 32), repeats=cfg.layers.repeats, depth=(low, high), dtype="float32"
        )
    elif cfg.moe is not None:  # a mixture-of-experts search
        assert cfg.base_model is not None and cfg.moe.gate_scale.low and cfg.moe.gate_scale.high
        space = MoESpace(
            cfg.models, cfg.base_model, 32, gate_mode=cfg.moe.gate_mode, prompts=cfg.moe.prompts,
            negative_prompts=cfg.moe.negative_prompts, min_experts=cfg.moe.min_experts,
            gate_scale=(cfg.moe.gate_scale.low, cfg.moe.gate_scale.high), dtype="float32",
        )  # fmt: skip
    else:
        space = SearchSpace(cfg.merge, cfg.models, cfg.base_model, n_layers=32)
    dims = next(iter(space.dims.values()))
    assert dims, "the config searches something"
    recipe = space.recipe(space.default_params())
    methods = ["passthrough"] if cfg.layers else ["moe"] if cfg.moe else cfg.merge.methods
    assert recipe.merge_method in methods


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "demo_slices.yaml"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: []\nfitness: {tasks: [a]}\n", "models"),
        ("models: [a]\nfitness: {tasks: [a]}\nsearch: {sampler: annealing}\n", "search.sampler"),
        ("models: [a]\nfitness: {tasks: [a]}\nsearch: {trials: null}\n", "budget"),
        ("models: [a]\nfitness: {tasks: [a]}\nmerge: {parameters: {weight: {low: 2, high: 1}}}\n", "low"),
        ("models: [a]\nfitness: {tasks: [a]}\nworkers: 0\n", "workers"),
        ("models: [a]\nfitness: {tasks: [a]}\nbogus: 1\n", "bogus"),
        ("- a\n", "mapping"),
        (
            "models: [a, b]\nfitness: {tasks: [a]}\nmoe: {gate_mode: random}\n",
            "moe: a mixture-of-experts search needs a base_model",
        ),
        (
            "models: [a, b]\nbase_model: c\nfitness: {tasks: [a]}\nmoe: {prompts: {a: [x]}}\n",
            "moe.prompts: gate_mode cheap_embed needs prompts for 'b'",
        ),
        (
            "models: [a, b]\nbase_model: c\nfitness: {tasks: [a]}\nmoe: {gate_mode: random, min_experts: 3}\n",
            "moe.min_experts: 3",
        ),
        (
            "models: [a, b]\nbase_model: c\nfitness: {tasks: [a]}\nmoe: {gate_mode: random, prompts: {z: [x]}}\n",
            "moe.prompts: 'z' is not one",
        ),
        (
            "models: [a, b]\nbase_model: c\nfitness: {tasks: [a]}\nmoe: {gate_mode: random, gate_scale: {low: 0, high: 2}}\n",  # noqa: E501
            "gate_scale",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, message):
    from evomerge.errors import EvomergeError

    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(EvomergeError, match=message) as info:
        load_config(p)
    assert "c.yaml" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("split", ["search", "validation", "test"])
def test_the_lm_eval_config_ships_tasks_that_load(split):
    """configs/llama_ties_lmeval.yaml names local lm-eval task YAMLs: they exist, evomerge
    counts their documents, and lm-eval itself loads each split from the JSONL beside them."""
    import json

    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.lmeval import _task_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama_ties_lmeval.yaml")
    evaluator = Evaluator(cfg.fitness, base_dir=cfg.source_dir, split=split)
    assert set(evaluator.lm_tasks) == {"arith", "code"}
    for name, spec in evaluator.lm_tasks.items():
        assert spec.yaml_path is not None and spec.yaml_path.is_file()
        data = spec.yaml_path.parent / f"{name}.{split}.jsonl"
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        assert len(evaluator.order[name]) == len(rows) == 8
        manager = TaskManager(include_path=str(spec.yaml_path.parent), include_defaults=False)
        task = next(iter(get_task_dict([_task_config(spec, split)], manager).values()))
        assert [doc["prompt"] for doc in task.eval_docs] == [row["prompt"] for row in rows]
