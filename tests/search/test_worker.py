"""What a search worker holds and how a candidate reaches its sources."""

from __future__ import annotations

import torch

from evomerge.operators.engine import load_inputs
from evomerge.operators.plan import build_plan
from evomerge.operators.recipe import Recipe
from evomerge.search.worker import resident_checkpoint


def test_resident_sources_are_merged_in_place_never_copied(family, monkeypatch):
    """Each planned input is asked for on the merge device, and a resident tensor there
    comes back as the very storage the worker holds: no copy to the host and back."""
    base, *fts = family
    sources = {str(p): resident_checkpoint(p, torch.device("cpu"), torch.float32) for p in family}
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fts],
        }
    )
    plan = build_plan(recipe, sources)
    asked = []
    for ck in sources.values():
        get = ck.get
        monkeypatch.setattr(ck, "get", lambda name, device="cpu", get=get: asked.append(device) or get(name, device))
    device = torch.device("cpu")
    for pt in plan.tensors:
        tensors, base_t = load_inputs(pt, sources, device, check_finite=False)
        held = [sources[r.model].pickled[r.tensor] for r in (*pt.sources, pt.base)]
        assert [t.data_ptr() for t in (*tensors, base_t)] == [h.data_ptr() for h in held], pt.name
    assert asked and all(d is device for d in asked)  # on a GPU: the tensor already there
