from __future__ import annotations

import pytest
import yaml

from evomerge.errors import RecipeError
from evomerge.operators.recipe import FilterValue, Recipe, load_yaml, resolve_value


def test_models_recipe_roundtrips_through_yaml():
    text = """
merge_method: ties
base_model: base
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
models:
  - model: a
    parameters:
      weight: [0.1, 0.5, 0.9]
      density: [{filter: mlp, value: 0.5}, {value: 0.8}]
  - model: b
    parameters: {weight: 0.3, density: 0.6}
"""
    r = Recipe.from_dict(yaml.safe_load(text))
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert r.referenced_models() == ["base", "a", "b"]


def test_gradient_interpolation():
    assert resolve_value([0.0, 1.0], "x", 0, 5) == 0.0
    assert resolve_value([0.0, 1.0], "x", 4, 5) == 1.0
    assert resolve_value([0.0, 1.0], "x", 2, 5) == pytest.approx(0.5)
    assert resolve_value([0.0, 1.0, 0.0], "x", 1, 5) == pytest.approx(0.5)
    assert resolve_value([0.2, 0.8], "x", None, 5) == 0.2
    assert resolve_value([0.2, 0.8], "x", 0, 1) == 0.8


def test_filters_first_match_wins_and_fallback():
    value = [
        FilterValue(filter="self_attn", value=0.1),
        FilterValue(filter="mlp", value=[0.0, 1.0]),
        FilterValue(value=0.7),
    ]
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight", 0, 2) == 0.1
    assert resolve_value(value, "model.layers.1.mlp.up_proj.weight", 1, 2) == 1.0
    assert resolve_value(value, "model.norm.weight", None, 2) == 0.7
    assert resolve_value(value[:1], "lm_head.weight", None, 2) is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"merge_method": "ties"}, "exactly one of"),
        (
            {
                "merge_method": "linear",
                "models": [],
            },
            "empty",
        ),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "unknown dtype"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "union", "bogus": 1}}, "bogus"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "bogus": 1}, "bogus"),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]},
            "layer_range",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
            },
            "different layer counts",
        ),
        (["merge_method", "linear"], "mapping"),
    ],
)
def test_invalid_recipes_name_the_problem(data, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_dict(data, "r.yml")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("r.yml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: ties\nmodels:\n  - model: [a\n")
    with pytest.raises(RecipeError, match=r"bad.yml: invalid YAML at line \d+"):
        load_yaml(p)


def test_model_refs_are_renamed_by_structure_never_by_text():
    """Only the places that name a model change: a filter and a chat template that
    happen to equal a model's name stay as they are."""
    from evomerge.experiments.run import recipe_with_paths

    text = """
merge_method: ties
base_model: mlp
tokenizer_source: a
chat_template: "{{ 'a' }}{% if true %}mlp{% endif %}"
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters: {weight: [{filter: mlp, value: 0.5}, {filter: a, value: 0.2}, {value: 0.8}]}
      - model: mlp
        layer_range: [0, 2]
"""
    recipe = Recipe.from_dict(yaml.safe_load(text)).to_dict()
    named = recipe_with_paths(recipe, {"a": "/models/a", "mlp": "/models/mlp"})
    assert named["base_model"] == "/models/mlp" and named["tokenizer_source"] == "/models/a"
    sources = named["slices"][0]["sources"]
    assert [s["model"] for s in sources] == ["/models/a", "/models/mlp"]
    assert [f.get("filter") for f in sources[0]["parameters"]["weight"]] == ["mlp", "a", None]
    assert named["chat_template"] == recipe["chat_template"]
    assert Recipe.from_dict(recipe).with_models({}) == Recipe.from_dict(recipe)
