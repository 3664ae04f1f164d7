"""Planning a merge again for a recipe of the same structure: only the parameters change."""

from __future__ import annotations

from evomerge.operators.checkpoint import open_checkpoint
from evomerge.operators.plan import build_plan, replan, structure
from evomerge.operators.recipe import Recipe


def _recipe(base: str, models: list[str], first: object, second: object, lam: float) -> Recipe:
    return Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": lam},
            "models": [
                {"model": models[0], "parameters": {"weight": first}},
                {"model": models[1], "parameters": {"weight": second}},
            ],
        }
    )


def test_a_recipe_of_the_same_structure_replans_as_a_fresh_plan(family):
    base, *models = [str(p) for p in family]
    ckpts = {p: open_checkpoint(p) for p in [base, *models]}
    filtered = [{"filter": "self_attn", "value": 0.2}, {"value": 0.7}]
    old = _recipe(base, models, [0.1, 0.9], filtered, 1.0)
    new = _recipe(base, models, [0.6, 0.3], [{"filter": "self_attn", "value": 0.9}, {"value": 0.4}], 0.8)
    assert structure(old) == structure(new)
    fresh, again = build_plan(new, ckpts), replan(build_plan(old, ckpts), new, ckpts)
    assert [(t.name, t.params, t.shape, t.sources, t.base) for t in again.tensors] == [
        (t.name, t.params, t.shape, t.sources, t.base) for t in fresh.tensors
    ]
    assert again.recipe is new
    # a different form (a scalar for a gradient, another filter) is another structure
    assert structure(_recipe(base, models, 0.5, filtered, 1.0)) != structure(old)
    other = [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]
    assert structure(_recipe(base, models, [0.1, 0.9], other, 1.0)) != structure(old)
