"""A worker over several devices: the resident model split by layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evomerge.search.memory import GIB, llama_footprint, plan_memory
from evomerge.search.split import layer_owners, worker_devices


def test_layers_go_in_runs_embeddings_first_head_last(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family[0])
    a, b = torch.device("cpu"), torch.device("meta")  # two distinct devices, only named here
    owners = layer_owners(model, [a, b])
    assert owners["model.layers.0"] == a and owners["model.layers.1"] == b
    assert owners["model.embed_tokens"] == a and owners["model.norm"] == b
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert owners["lm_head"] == (a if tied else b)  # a tied head stays with the embeddings
    assert worker_devices(torch.device("cuda"), 3) == [torch.device("cuda", i) for i in range(3)]


def test_a_split_worker_scores_as_one_device_does(tiny_cfg):
    """Two devices (both the CPU here: the hooks run, nothing moves): the same trial values,
    per-sample results and merged tensors as one device."""
    from evomerge.experiments.run import prepare
    from evomerge.search.worker import Job, MergeWorker

    prep = prepare(tiny_cfg(), log=lambda _: None)
    recipes = [prep.space.recipe(prep.space.default_params()).to_dict()]
    recipes.append({**recipes[0], "merge_method": "ties"} if recipes[0].get("base_model") else recipes[0])
    one, two = MergeWorker(prep.spec), MergeWorker(replace(prep.spec, gpus_per_worker=2))
    assert all(hasattr(two.model.get_decoder().layers[i], "_hf_hook") for i in range(2))
    for key, recipe in enumerate(recipes):
        a, b = one.run(Job(key, recipe, seed=key)), two.run(Job(key, recipe, seed=key))
        assert a.ok and b.ok, (a.error, b.error)
        assert (a.value, a.values, a.per_sample) == (b.value, b.values, b.per_sample)
        assert all(torch.equal(one.params[k], two.params[k]) for k in one.params)


def test_each_gpu_of_a_split_worker_holds_its_share():
    """7B Llama, four sources resident, on two GPUs: each holds half the weights plus one
    embedding matrix of each model, and the whole merge and scoring working set."""
    config = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    }
    fp = llama_footprint(config, 4, 2)
    one = plan_memory(fp, "resident", "cuda", None)
    two = plan_memory(fp, "resident", "cuda", None, gpus=2)
    expect = (fp.model + fp.sources) / 2 + 5 * fp.largest * 2 + fp.temporaries + fp.activations
    assert abs(two.device_gib - expect / GIB) < 1e-6
    saved = (fp.model + fp.sources) / 2 - 5 * fp.largest * 2  # half the weights, less one embedding each
    assert one.device_gib - two.device_gib == pytest.approx(saved / GIB)
    assert "per GPU (2 a worker)" in two.line() and two.summary()["gpus_per_worker"] == 2
