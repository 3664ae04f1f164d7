"""What a search worker holds and how a candidate reaches its sources."""

from __future__ import annotations

from pathlib import Path

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


def test_runs_of_tensors_sharing_parameters_merge_as_one_with_the_same_bits(tiny_cfg, monkeypatch):
    """Sources and model packed end to end: an elementwise merge (linear, task arithmetic)
    runs once over each run of tensors with equal parameters (a layer gradient breaks the
    runs at layers), and gives the bits of merging tensor by tensor; TIES never runs so."""
    from evomerge.experiments.run import prepare
    from evomerge.search import worker as worker_module
    from evomerge.search.worker import MergeWorker

    prep = prepare(tiny_cfg(), log=lambda _: None)
    w = MergeWorker(prep.spec)
    refs = list(prep.spec.sources)
    base, models = refs[0], refs[1:]
    gradient = {"weight": [0.2, 0.9]}  # interpolated over the layers: each layer's own weight
    recipes = [
        {"merge_method": "linear",
         "models": [{"model": m, "parameters": {"weight": 0.3 + i}} for i, m in enumerate(models)]},
        {"merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": m, "parameters": gradient if i == 0 else {"weight": 0.5}} for i, m in enumerate(models)]},
        {"merge_method": "ties", "base_model": base,
         "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models]},
    ]  # fmt: skip
    calls: list[int] = []
    merge_run = worker_module._merge_run
    monkeypatch.setattr(
        worker_module, "_merge_run", lambda plan, run, seed: calls.append(len(run)) or merge_run(plan, run, seed)
    )
    for recipe in recipes:
        calls.clear()
        w.merge(Recipe.from_dict(recipe), seed=1)
        runs, merged = list(calls), {k: v.clone() for k, v in w.params.items()}
        with monkeypatch.context() as m:
            m.setattr(MergeWorker, "_follows", lambda *a: False)
            w.merge(Recipe.from_dict(recipe), seed=1)
        assert all(torch.equal(merged[k], w.params[k]) for k in merged), recipe["merge_method"]
        n = len(build_plan(Recipe.from_dict(recipe), w.sources).tensors)
        if recipe["merge_method"] == "linear":
            assert runs == [n]  # one merge for the whole model
        elif recipe["merge_method"] == "task_arithmetic":
            assert 1 < len(runs) < n  # broken at the layers, whose weights differ
        else:
            assert runs == [1] * n


def test_a_worker_on_a_node_without_the_drivers_paths_scores_what_was_shipped(tiny_zoo, tmp_path):
    """The sources and the fitness's files shipped from the driver (``models_from: driver``),
    on a node that cannot see the driver's directories: the same fitness, bit for bit, as a
    worker reading them in place; without them, one line naming the source and the node."""
    import shutil
    from dataclasses import replace

    import pytest

    from evomerge.errors import EvomergeError
    from evomerge.experiments.run import for_nodes, prepare
    from evomerge.search.worker import Job, MergeWorker
    from tests.search.conftest import tiny_config

    zoo = tmp_path / "driver" / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    cfg = tiny_config(zoo, models_from="driver")
    prep = prepare(cfg, log=lambda _: None)
    recipe = {"merge_method": "task_arithmetic", "base_model": "zoo:base",
              "models": [{"model": m, "parameters": {"weight": 0.7}} for m in cfg.models]}  # fmt: skip
    job = Job(0, recipe, seed=3)
    in_place = MergeWorker(prep.spec).run(job)
    spec = for_nodes(prep)
    shutil.rmtree(tmp_path / "driver")
    shipped = MergeWorker(spec).run(job)
    assert in_place.error is None and shipped.error is None, shipped.error
    assert shipped.value == in_place.value and shipped.per_sample == in_place.per_sample

    with pytest.raises(EvomergeError, match=r"models: 'zoo:base': .* is not on node .*models_from: driver"):
        MergeWorker(replace(spec, shipped_models=None))


def test_a_source_the_node_lacks_resolves_by_its_hub_id_in_the_nodes_cache(family, tmp_path, monkeypatch):
    """A source the driver took from its Hub cache travels as ``org/name@<commit>``: a node
    without the driver's snapshot path finds it through its own Hub cache, offline."""
    from evomerge.operators.hub import hub_origin
    from evomerge.search.worker import WorkerSpec, local_sources
    from evomerge.testing import populate_hub_cache

    commit = "0123456789abcdef0123456789abcdef01234567"
    node_cache = tmp_path / "node-hf" / "hub"
    populate_hub_cache(node_cache, "acme/tuned-1m", family[1], commit=commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "node-hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    driver_path = str(tmp_path / "driver-hf" / "hub" / "models--acme--tuned-1m" / "snapshots" / commit)
    spec = WorkerSpec(
        sources={"tuned": driver_path, "base": str(family[0])}, model_ref="base", fitness={}, zoo_root=None,
        base_dir=str(tmp_path), seed=0, hub_ids={"tuned": f"acme/tuned-1m@{commit}"},
    )  # fmt: skip
    local = local_sources(spec)
    assert local["base"] == str(family[0])  # a path this node has is read in place
    assert hub_origin(Path(local["tuned"])) == ("acme/tuned-1m", commit)
    assert Path(local["tuned"]).is_relative_to(node_cache)
