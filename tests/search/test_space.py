from __future__ import annotations

import optuna
import pytest

from evomerge.errors import EvomergeError
from evomerge.search.merge_space import MergeSpace
from evomerge.search.space import SearchSpace

MODELS = ["a", "b", "c"]


def space(**merge) -> SearchSpace:
    return SearchSpace(MergeSpace(**merge), MODELS, "base", n_layers=4)


def test_dims_come_from_declarations():
    s = space(method="ties")
    names = [d.name for d in s.dims["ties"]]
    assert names == ["weight[a]", "weight[b]", "weight[c]", "density[a]", "density[b]", "density[c]"]
    dens = [d for d in s.dims["ties"] if d.param == "density"][0]
    assert (dens.low, dens.high) == (0.1, 1.0)  # the declared search range


def test_config_bounds_and_fixed_values():
    s = space(
        method="ties",
        parameters={"weight": {"low": 0.0, "high": 2.0}, "density": 0.5, "lambda": {"low": 0.5, "high": 1.5}},
    )
    assert {d.param for d in s.dims["ties"]} == {"weight", "lambda"}
    assert s.fixed["ties"] == {"density": 0.5}
    recipe = s.recipe({**{d.name: 1.0 for d in s.dims["ties"]}})
    assert recipe.parameters["density"] == 0.5 and recipe.parameters["lambda"] == 1.0


def test_bounds_outside_the_valid_domain_are_refused():
    with pytest.raises(EvomergeError, match="density"):
        space(method="ties", parameters={"density": {"low": 0.5, "high": 1.5}})


def test_default_params_are_uniform_weights():
    s = space(method="task_arithmetic")
    assert s.default_params() == {
        "weight[a]": pytest.approx(1 / 3),
        "weight[b]": pytest.approx(1 / 3),
        "weight[c]": pytest.approx(1 / 3),
    }


def test_filters_granularity_makes_filter_lists():
    s = space(method="linear", granularity="filters", filters=["mlp"])
    params = {d.name: (0.2 if d.group == "mlp" else 0.7) for d in s.dims["linear"]}
    r = s.recipe(params)
    weight = r.models[0].parameters["weight"]
    assert [(e.filter, e.value) for e in weight] == [("mlp", 0.2), (None, 0.7)]


def test_layer_groups_make_slices():
    s = space(method="task_arithmetic", granularity=2)
    params = {d.name: float(d.group == "L2") for d in s.dims["task_arithmetic"]}
    r = s.recipe(params)
    assert [sl.sources[0].layer_range for sl in r.slices] == [(0, 2), (2, 4)]
    assert r.slices[1].sources[0].parameters["weight"] == 1.0 and r.slices[0].sources[0].parameters["weight"] == 0.0


def test_several_methods_are_a_categorical_choice():
    s = space(method=["task_arithmetic", "ties"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(10):
        trial = study.ask()
        params = s.sample(trial)
        seen.add(params["method"])
        assert s.recipe(params).merge_method == params["method"]
        study.tell(trial, 0.0)
    assert seen == {"task_arithmetic", "ties"}


def test_method_that_cannot_merge_this_many_models():
    with pytest.raises(EvomergeError, match="cannot merge 3"):
        space(method="slerp")
