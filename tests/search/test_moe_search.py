"""The mixture-of-experts search: decoding, the in-memory mixture equal to its export,
and a short search on the tiny zoo exported as a Mixtral that scores what the search said."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.experiments.config import ExperimentConfig
from evomerge.experiments.run import RunOptions, prepare, recipe_with_paths, run_experiment
from evomerge.search.moe_space import MoESpace

from .conftest import tiny_config

PROMPTS = {"zoo:cp": ["cp:abc=", "cp:kqz="], "zoo:rev": ["rev:abc=", "rev:kqz="], "zoo:sort": ["sort:cba="]}


def _space(min_experts: int = 2) -> MoESpace:
    return MoESpace(
        ["a", "b", "c"], "base", 2, gate_mode="random", prompts={}, negative_prompts={},
        min_experts=min_experts, gate_scale=(0.25, 4.0), dtype="float32",
    )  # fmt: skip


def test_the_centre_is_every_model_an_expert_at_gate_scale_one():
    space = _space()
    centre = space.default_params()
    moe = space.recipe(centre)
    assert [e.source_model for e in moe.experts] == ["a", "b", "c"] and moe.experts_per_token == 2
    assert all(e.gate_scale == pytest.approx(1.0) for e in moe.experts) and moe.base_model == "base"
    off = {**centre, "expert:b": -0.9}  # -0.9 + 0.7 < 0
    assert [e.source_model for e in space.recipe(off).experts] == ["a", "c"]
    none = {**centre, "expert:a": -1.0, "expert:b": -0.75, "expert:c": -0.8, "experts_per_token": 3.4}
    moe = space.recipe(none)  # repaired up to min_experts (the highest genes), k capped at the count
    assert [e.source_model for e in moe.experts] == ["b", "c"] and moe.experts_per_token == 2
    assert [e.source_model for e in _space(1).recipe(none).experts] == ["b"]
    kinds = {d.param: d.log for d in space.dims["moe"]}
    assert kinds == {"expert": False, "experts_per_token": False, "gate_scale": True}


def _moe_cfg(zoo, **moe) -> ExperimentConfig:
    cfg = tiny_config(zoo, search__trials=8).model_dump()
    cfg["merge"] = {"dtype": "float32"}
    cfg["moe"] = {"gate_mode": "cheap_embed", "prompts": PROMPTS, **moe}
    return ExperimentConfig.model_validate(cfg)


@pytest.mark.parametrize("gate_mode", ["cheap_embed", "random"])
def test_the_in_memory_mixture_is_the_exported_model(tiny_zoo, tmp_path, gate_mode):
    """A candidate with two of three experts, one per token and uneven gate scales, built
    in the worker and written by `evomerge moe`'s writer with the trial's seed: the same
    tensors, and the worker's score is the export's."""
    from transformers import AutoModelForCausalLM

    from evomerge.fitness.scoring import evaluate_model_dir
    from evomerge.operators.engine import tensor_seed
    from evomerge.operators.moe import run_moe
    from evomerge.operators.moe_config import MoEConfig
    from evomerge.search.worker import Job, MergeWorker

    cfg = _moe_cfg(tiny_zoo, gate_mode=gate_mode)
    prep = prepare(cfg, log=lambda _: None)
    space = prep.space
    assert isinstance(space, MoESpace)
    point = {**space.default_params(), "expert:zoo:cp": -0.9, "experts_per_token": 1.2}
    point |= {"gate_scale:zoo:rev": 2.5, "gate_scale:zoo:sort": 0.4}
    recipe = space.recipe(point).to_dict()
    worker = MergeWorker(prep.spec)
    scored = worker.run(Job(0, recipe, seed=7, split="test"))
    assert scored.ok, scored.error
    in_memory = worker.model
    assert type(in_memory).__name__ == "MixtralForCausalLM" and in_memory.model.layers[0].mlp.top_k == 1
    out = tmp_path / "moe"
    run_moe(MoEConfig.from_dict(recipe_with_paths(recipe, prep.paths)), out, seed=tensor_seed(7, "trial"))
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(1, 40, (3, 17), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(t, exported.state_dict()[k]) for k, t in in_memory.state_dict().items())
    with torch.no_grad():  # the same weights; float32 rounding apart (the kernels see other memory alignments)
        torch.testing.assert_close(in_memory(ids).logits, exported(ids).logits, rtol=0, atol=1e-5)
    assert evaluate_model_dir(out, cfg, split="test").fitness == scored.value
    # a source alone is scored as its dense model (the baselines)
    dense = worker.run(Job(1, space.source_recipe("zoo:rev"), seed=0, split="test"))
    assert dense.ok and type(worker.model).__name__ == "LlamaForCausalLM"


def test_a_moe_search_runs_and_exports_a_mixtral(tiny_zoo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from evomerge.cli import main
    from evomerge.fitness.scoring import evaluate_model_dir

    cfg = _moe_cfg(tiny_zoo).resolved()
    summary = run_experiment(cfg, tmp_path / "run", RunOptions(quiet=True, in_process=True, track=False))
    assert summary["trials"]["complete"] == 8 and set(summary["baselines"]) == {"all_experts"}
    assert set(summary["sources"]) == {"zoo:cp", "zoo:rev", "zoo:sort", "zoo:base"}
    best = yaml.safe_load((tmp_path / "run" / "best_recipe.yml").read_text())
    assert best["gate_mode"] == "cheap_embed" and len(best["experts"]) >= 2
    assert main(["status", str(tmp_path / "run"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "experts (gate scale), per token" in lines[1] and " x" in lines[2] and "|" in lines[2]
    out = tmp_path / "best"
    assert main(["export", str(tmp_path / "run"), str(out), "--no-register"]) == 0
    moe = yaml.safe_load((out / "mergekit_moe_config.yml").read_text())
    assert moe == best
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == len(best["experts"])
    record = json.loads((out / "evomerge.json").read_text())
    assert record["method"] == "moe" and record["test_fitness"] == summary["best_test_fitness"]
    # the exported directory scores on test what the search's worker scored
    assert evaluate_model_dir(out, cfg, split="test").fitness == summary["best_test_fitness"]
    assert {p["ref"] for p in record["parents"]} == {"zoo:base", *(f"zoo:{e['source_model'].rsplit('/', 1)[-1]}"
                                                                   for e in best["experts"])}  # fmt: skip


def test_models_that_cannot_become_a_mixtral_are_refused_before_work(tiny_zoo, tmp_path):
    import shutil

    from evomerge.errors import EvomergeError

    odd = tmp_path / "odd"
    shutil.copytree(tiny_zoo / "rev", odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    data = _moe_cfg(tiny_zoo).model_dump()
    data["models"] = ["zoo:cp", str(odd)]
    data["moe"]["prompts"] = {"zoo:cp": ["cp:a="], str(odd): ["rev:a="]}
    with pytest.raises(EvomergeError, match="model_type 'gpt2' cannot become part of a Mixtral"):
        prepare(ExperimentConfig.model_validate(data), log=lambda _: None)
