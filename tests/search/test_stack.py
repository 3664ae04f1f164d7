"""The layer-stack space: decoding and repair, in-memory stacks equal to their export,
bad input refused before any work, and a short search on the tiny zoo."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig
from evomerge.experiments.run import RunOptions, prepare, run_experiment
from evomerge.search.stack import StackSpace, stack_of, stack_recipe

from .conftest import tiny_config


def _space(depth=(2, 6)) -> StackSpace:
    return StackSpace(["a", "b"], {"a": 4, "b": 4}, repeats=2, depth=depth, dtype="float32")


def test_genes_decode_to_ordered_stacks_within_the_depth_bounds():
    space = _space()
    names = [d.name for d in space.dims["passthrough"]]
    assert len(names) == 16 and names[0] == "slot[0]:a:0" and names[12] == "slot[12]:b:0"
    assert space.stack(space.default_params()) == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]  # the centre
    genes = dict.fromkeys(names, -1.0)  # every slot off, the start's too (-1 + 0.7 < 0)
    for k in (1, 5, 9, 14):  # a1, b1, a1 again (second pass), b2
        genes[names[k]] = 0.9
    assert space.stack(genes) == [("a", 1), ("b", 1), ("a", 1), ("b", 2)]
    near = dict(space.default_params())
    near[names[2]], near[names[13]] = -0.8, 0.8  # one step each way flips a gene
    assert space.stack(near) == [("a", 0), ("a", 1), ("a", 3), ("b", 1)]
    assert len(space.stack(dict.fromkeys(names, 1.0))) == 6  # repaired down to max_layers
    few = dict.fromkeys(names, -1.0)
    few[names[7]] = 0.5  # still off (0.5 - 0.7 < 0), but the best score: picked first
    assert space.stack(few) == [("a", 0), ("b", 3)]  # repaired up to min_layers, ties in slot order


def test_a_stack_is_written_as_mergekit_slices():
    recipe = stack_recipe([("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 1)], "bfloat16", {"a": "/m/a"})
    data = recipe.to_dict()
    assert data["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 2], [1, 3], [1, 2]]
    assert [s["sources"][0]["model"] for s in data["slices"]] == ["/m/a", "b", "/m/a"]
    assert stack_of(stack_recipe([("b", 3), ("a", 0)], "float32")) == [("b", 3, 1.0), ("a", 0, 1.0)]


def test_added_layers_carry_a_residual_scale_gene():
    space = StackSpace(["a", "b"], {"a": 2, "b": 2}, repeats=2, depth=(1, 8), dtype="float32", scale=(0.0, 1.0))
    on = [d.name for d in space.dims["passthrough"] if d.param == "on"]
    scales = {d.name: d for d in space.dims["passthrough"] if d.param == "scale"}
    assert len(on) == 8 and len(scales) == 6  # every slot but the start's two has one
    assert all((d.low, d.high) == (0.0, 1.0) for d in scales.values())
    assert space.layers(space.default_params()) == [("a", 0, 1.0), ("a", 1, 1.0)]  # the centre: the start
    point = dict(space.default_params())
    point[on[3]] = 0.9  # b1 on (first pass)
    point[on[5]] = 0.9  # a1 again (second pass)
    point["slot[3]:b:1:scale"], point["slot[5]:a:1:scale"] = 0.25, 1.0
    layers = space.layers(point)
    assert layers == [("a", 0, 1.0), ("a", 1, 1.0), ("b", 1, 0.25), ("a", 1, 1.0)]
    recipe = space.recipe(point)
    data = recipe.to_dict()
    scaled = data["slices"][1]["sources"][0]
    assert scaled["parameters"]["scale"] == [
        {"filter": "o_proj", "value": 0.25},
        {"filter": "down_proj", "value": 0.25},
        {"value": 1.0},
    ]
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 2], [1, 2], [1, 2]]
    assert stack_of(recipe) == layers
    other = recipe.model_copy(deep=True)
    other.slices[1].sources[0].parameters["scale"][0].value = 0.5  # o_proj and down_proj scaled apart
    assert stack_of(other) is None  # not a stack the search could propose: merged, not assembled


@pytest.mark.parametrize(
    "layers, message",
    [
        ({"min_layers": 5, "max_layers": 3}, "min_layers (5) is above max_layers (3)"),
        ({"repeats": 1, "max_layers": 7}, "max_layers 7 exceeds the 6 slots"),
        ({"scale": {"low": -0.5, "high": 1.0}}, "scale: give a range {low, high} with 0 <= low < high"),
        ({"scale": {"value": 0.5}}, "scale: give a range"),
    ],
)
def test_impossible_depths_are_refused(tiny_zoo, layers, message):
    with pytest.raises((EvomergeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(_stack_cfg(tiny_zoo, **layers), log=lambda _: None)


def test_models_that_cannot_be_stacked_are_refused(tiny_zoo, family):
    cfg = _stack_cfg(tiny_zoo)
    cfg.models = ["zoo:cp", str(family[1])]  # hidden size 64 against the test family's
    with pytest.raises(EvomergeError, match="differ in .*their layers cannot be stacked"):
        prepare(cfg, log=lambda _: None)
    with pytest.raises(ValueError, match="takes no base_model"):
        ExperimentConfig.model_validate({**_stack_cfg(tiny_zoo).model_dump(), "base_model": "zoo:base"})


def test_the_in_memory_stack_is_the_exported_model(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.experiments.run import recipe_with_paths
    from evomerge.operators.engine import run_merge
    from evomerge.operators.recipe import Recipe
    from evomerge.search.worker import Job, MergeWorker

    prep = prepare(_stack_cfg(tiny_zoo), log=lambda _: None)
    stack = [("zoo:rev", 0), ("zoo:rev", 1), ("zoo:cp", 1, 0.3), ("zoo:sort", 0), ("zoo:cp", 1), ("zoo:sort", 1, 1.7)]
    recipe = stack_recipe(stack, "float32")
    worker = MergeWorker(prep.spec)
    in_memory = worker.stacks.assemble(recipe)
    out = tmp_path / "stacked"
    run_merge(Recipe.from_dict(recipe_with_paths(recipe.to_dict(), prep.paths), "test"), out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(1, 40, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, exported(ids, use_cache=False).logits)
    sources = {r: m for r, m in worker.stacks.models.items()}
    plain = [(k, m, i) for k, (m, i, *scale) in enumerate(stack) if not scale]
    assert all(in_memory.model.layers[k] is sources[m].model.layers[i] for k, m, i in plain)  # no copies
    twin, layer = in_memory.model.layers[2], sources["zoo:cp"].model.layers[1]
    assert twin.self_attn.q_proj.weight is layer.self_attn.q_proj.weight  # a scaled layer shares the rest
    assert torch.equal(twin.mlp.down_proj.weight, (layer.mlp.down_proj.weight * 0.3).float())
    assert in_memory.model.layers[4] is layer  # the source layer itself is untouched
    scored = worker.run(Job(0, recipe.to_dict(), seed=0))
    assert scored.ok and 0 <= scored.value <= 1
    # The stack (cache off: a layer runs twice) is scored in full, the export with
    # its shared prompt head cached: the same hits item by item.
    from evomerge.fitness.native import encode, score, shared_prefix
    from evomerge.fitness.tasks import held_out

    enc = encode(worker.stacks.tokenizer, held_out("rev", 60, seed=0, exclude=set()))
    assert shared_prefix(enc) > 0
    assert score(in_memory, enc).tolist() == score(exported, enc).tolist()


def _stack_cfg(zoo, **layers) -> ExperimentConfig:
    cfg = tiny_config(zoo, search__trials=8).model_dump()
    cfg.pop("base_model")
    cfg["merge"] = {"dtype": "float32"}
    cfg["layers"] = {"repeats": 2, **layers}
    return ExperimentConfig.model_validate(cfg)


def test_a_stack_search_runs_and_exports_a_loadable_deeper_model(tiny_zoo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from evomerge.cli import main

    cfg = _stack_cfg(tiny_zoo, min_layers=4, max_layers=6).resolved()
    summary = run_experiment(cfg, tmp_path / "run", RunOptions(quiet=True, in_process=True, track=False))
    assert summary["trials"]["complete"] == 8 and set(summary["baselines"]) == {"start"}
    assert set(summary["sources"]) == {"zoo:cp", "zoo:rev", "zoo:sort"}
    assert main(["status", str(tmp_path / "run"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "layer stack" in lines[1] and ("|" in lines[2] or "-" in lines[2])  # e.g. "cp 0-1 | rev 1"
    out = tmp_path / "best"
    assert main(["export", str(tmp_path / "run"), str(out), "--no-register"]) == 0
    recipe = (out / "mergekit_config.yml").read_text()
    assert "passthrough" in recipe and "layer_range" in recipe
    depth = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert 4 <= depth <= 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == depth
    record = json.loads((out / "evomerge.json").read_text())
    assert record["test_fitness"] == summary["best_test_fitness"]
    used = {s["sources"][0]["model"] for s in yaml.safe_load(recipe)["slices"]}
    assert {p["path"] for p in record["parents"]} == used  # the models the stack uses, no others


def test_a_stack_proposed_again_reuses_its_score(tiny_zoo, tmp_path):
    """CMA-ES near its mean decodes to the same stack again and again: the loop tells the
    first result again instead of merging and scoring it twice, on resume too."""
    from evomerge.experiments.run import open_study
    from evomerge.experiments.rundir import RunDir
    from evomerge.search.dispatch import InProcessDispatcher
    from evomerge.search.loop import Budget, SearchLoop
    from evomerge.search.worker import MergeWorker

    cfg = _stack_cfg(tiny_zoo)
    prep = prepare(cfg, log=lambda _: None)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    study = open_study(cfg, run, prep)
    dispatcher = InProcessDispatcher(worker=MergeWorker(prep.spec))
    submitted: list[int] = []
    submit = dispatcher.submit
    dispatcher.submit = lambda job: (submitted.append(job.key), submit(job))[1]  # type: ignore[method-assign]
    stats = SearchLoop(study, prep.space, dispatcher, budget=Budget(16), seed=0).run()
    assert stats.complete == 16
    again = [t for t in study.trials if "same_as" in t.user_attrs]
    assert again and len(submitted) == 16 - len(again)
    assert stats.samples_scored == len(submitted) * 3 * 20
    recipe = lambda t: prep.space.recipe(t.params).to_dict()  # noqa: E731
    for t in again:
        first = study.trials[t.user_attrs["same_as"]]
        assert "same_as" not in first.user_attrs and first.number in submitted
        assert recipe(t) == recipe(first) and t.value == first.value
    # a resumed loop knows what the earlier one scored
    submitted.clear()
    stats = SearchLoop(study, prep.space, dispatcher, budget=Budget(32), seed=0).run()
    later = [t for t in study.trials[16:] if "same_as" in t.user_attrs]
    assert later and len(submitted) == 16 - len(later)
    assert any(t.user_attrs["same_as"] < 16 for t in later)


def test_a_residual_scale_needs_residual_projections(tiny_zoo, monkeypatch):
    import evomerge.experiments.run as run_module

    monkeypatch.setattr(run_module, "RESIDUAL", ("c_proj",))  # as if the models were GPT-2 style
    with pytest.raises(EvomergeError, match="layers.scale: model 'zoo:.*' has no c_proj tensors"):
        prepare(_stack_cfg(tiny_zoo, scale={"low": 0.0, "high": 1.0}), log=lambda _: None)
    monkeypatch.undo()
    assert prepare(_stack_cfg(tiny_zoo, scale={"low": 0.0, "high": 1.0}), log=lambda _: None).space.scaled
