"""End-to-end merges of tiny Llama models through the streaming engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.operators.engine import run_merge
from evomerge.operators.recipe import Recipe


def state(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def recipe(text: str, **fmt) -> Recipe:
    return Recipe.from_dict(yaml.safe_load(text.format(**fmt)))


def test_linear_merge_equals_formula_and_loads(family, tmp_path):
    base, a, b, _ = family
    r = recipe(
        """
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.25}}}}
  - {{model: {b}, parameters: {{weight: 0.75}}}}
""",
        a=a,
        b=b,
    )
    out = tmp_path / "out"
    res = run_merge(r, out)
    merged, sa, sb = state(out), state(a), state(b)
    assert set(merged) == set(sa)
    for k in sa:
        torch.testing.assert_close(merged[k], 0.25 * sa[k] + 0.75 * sb[k])
    assert res.tensors == len(sa)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"][:2] == ["merge", "evomerge"]
    assert "base_model" not in front and f"`{a}` (a local model)" in card  # the Hub takes Hub ids only
    assert Recipe.from_yaml(out / "mergekit_config.yml") == r
    assert not list(tmp_path.glob(".out.*"))


def test_slices_stack_layers_and_update_config(deep_family, tmp_path):
    base, a, b = deep_family
    r = recipe(
        """
merge_method: passthrough
dtype: bfloat16
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
""",
        a=a,
        b=b,
    )
    out = tmp_path / "stack"
    run_merge(r, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["dtype"] == "bfloat16"
    merged, sa, sb = state(out), state(a), state(b)
    key = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[key.format(2)], sa[key.format(2)].bfloat16())
    assert torch.equal(merged[key.format(3)], sb[key.format(1)].bfloat16())
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(merged["lm_head.weight"], sb["lm_head.weight"].bfloat16())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    model(torch.tensor([[1, 2, 3]]))


def test_slice_gradient_uses_layer_index_within_slice(deep_family, tmp_path):
    base, a, b = deep_family
    r = recipe(
        """
merge_method: slerp
base_model: {base}
parameters: {{t: [0.0, 1.0]}}
slices:
  - sources: [{{model: {base}, layer_range: [0, 4]}}, {{model: {a}, layer_range: [0, 4]}}]
""",
        base=base,
        a=a,
    )
    out = tmp_path / "grad"
    run_merge(r, out)
    merged, s0, sa = state(out), state(base), state(a)
    key = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key.format(0)], s0[key.format(0)])
    torch.testing.assert_close(merged[key.format(3)], sa[key.format(3)])
    torch.testing.assert_close(merged["model.embed_tokens.weight"], s0["model.embed_tokens.weight"])


def test_sharded_output_and_sharded_input_roundtrip(family, tmp_path):
    base, a, b, _ = family
    r = recipe(
        """
merge_method: task_arithmetic
base_model: {base}
models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]
""",
        base=base,
        a=a,
        b=b,
    )
    sharded = tmp_path / "sharded"
    run_merge(r, sharded, max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # the sharded output is itself a valid input
    r2 = recipe("merge_method: linear\nmodels: [{{model: {s}}}]", s=sharded)
    again = tmp_path / "again"
    run_merge(r2, again)
    one, two = state(sharded), state(again)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_dare_is_seeded_per_tensor(family, tmp_path):
    base, a, b, _ = family
    text = """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
"""
    r = recipe(text, base=base, a=a, b=b)
    run_merge(r, tmp_path / "s1", seed=1)
    run_merge(r, tmp_path / "s1b", seed=1)
    run_merge(r, tmp_path / "s2", seed=2)
    x, y, z = state(tmp_path / "s1"), state(tmp_path / "s1b"), state(tmp_path / "s2")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(x[k], z[k]) for k in x)


@pytest.mark.parametrize(
    "method",
    ["ties", "dare_linear", "breadcrumbs_ties", "della", "sce", "model_stock", "multislerp", "karcher", "nuslerp"],
)
def test_every_method_merges_real_models(family, tmp_path, method):
    base, a, b, c = family
    extra = "\n    parameters: {density: 0.6}" if method in ("ties", "dare_linear", "breadcrumbs_ties", "della") else ""
    models = [a, b] if method == "nuslerp" else [a, b, c]
    lines = "\n".join(f"  - model: {m}{extra}" for m in models)
    base_line = "" if method == "karcher" else f"base_model: {base}\n"
    r = Recipe.from_dict(yaml.safe_load(f"merge_method: {method}\n{base_line}models:\n{lines}\n"))
    run_merge(r, tmp_path / method)
    merged = state(tmp_path / method)
    # every tensor is the operator applied to that tensor of each source, with the recipe's
    # parameters (the declared defaults otherwise) and the per-tensor generator
    from evomerge.operators.engine import tensor_seed
    from evomerge.operators.registry import get_operator

    op = get_operator(method)
    sources = [state(m) for m in models]
    base_state = None if method == "karcher" else state(base)
    params = {p.name: p.default for p in op.params}
    if extra:
        params["density"] = 0.6
    params = {p.name: [params[p.name]] * len(models) if p.per_model else params[p.name] for p in op.params}
    assert set(merged) == set(sources[0])
    for name, out in merged.items():
        gen = torch.Generator().manual_seed(tensor_seed(0, name)) if op.random else None
        inputs = [s[name].float() for s in sources]
        expected = op.fn(inputs, None if base_state is None else base_state[name].float(), gen, **params)
        torch.testing.assert_close(out, expected.to(out.dtype), rtol=0, atol=0, msg=name)
    assert all(not torch.equal(merged[k], src[k]) for src in sources for k in merged if "layers.0." in k)


@pytest.mark.parametrize("budget", [1, 50_000, 1 << 30])
def test_read_ahead_holds_at_most_its_budget(family, tmp_path, monkeypatch, budget):
    """The reader runs ahead of the merge by at most READ_AHEAD_BYTES of inputs (but
    always at least the next tensor); the output does not depend on how far."""
    import threading

    from evomerge.operators import engine

    base, a, b, _ = family
    r = recipe(
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}},"
        " {{model: {b}, parameters: {{weight: 0.5, density: 0.7}}}}]",
        base=base,
        a=a,
        b=b,
    )
    held, peak, biggest, total, loads = [0], [0], [0], [0], [0]
    all_read = threading.Event()
    load, merge = engine.load_inputs, engine.merge_planned
    n_tensors = len(state(a))

    def nbytes(inputs) -> int:
        return sum(t.numel() * t.element_size() for t in [*inputs[0], inputs[1]] if t is not None)

    def counting_load(pt, ckpts, dev, **kw):
        inputs = load(pt, ckpts, dev, **kw)
        held[0] += nbytes(inputs)
        total[0] += nbytes(inputs)
        peak[0], biggest[0] = max(peak[0], held[0]), max(biggest[0], nbytes(inputs))
        loads[0] += 1
        if loads[0] == n_tensors:
            all_read.set()
        return inputs

    def counting_merge(pt, plan, inputs, dev, seed):
        if pt is plan.tensors[0]:
            all_read.wait(0.5)  # a slow first merge: the reader goes as far as it may
        out = merge(pt, plan, inputs, dev, seed)
        held[0] -= nbytes(inputs)
        return out

    monkeypatch.setattr(engine, "load_inputs", counting_load)
    monkeypatch.setattr(engine, "merge_planned", counting_merge)
    monkeypatch.setattr(engine, "READ_AHEAD_BYTES", budget)
    run_merge(r, tmp_path / "out")
    assert held[0] == 0 and loads[0] == n_tensors
    # the tensor being merged, plus what was read ahead within the budget (at least one more)
    assert peak[0] <= biggest[0] + max(budget, biggest[0])
    if budget >= total[0]:  # everything fits: the reader read it all before the first merge ended
        assert peak[0] == total[0]
    monkeypatch.undo()
    run_merge(r, tmp_path / "plain")
    one, two = state(tmp_path / "out"), state(tmp_path / "plain")
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("method, leaves_a_core", [("linear", True), ("ties", False)])
def test_torch_path_merges_leave_a_core_to_the_reader(family, tmp_path, monkeypatch, method, leaves_a_core):
    from evomerge.operators import engine

    base, a, b, _ = family
    extra = f"base_model: {base}\nparameters: {{{{density: 0.5}}}}\n" if method == "ties" else ""
    r = recipe("merge_method: {m}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n" + extra, m=method, a=a, b=b)
    seen: set[int] = set()
    merge = engine.merge_planned

    def recording(*args):
        seen.add(torch.get_num_threads())
        return merge(*args)

    monkeypatch.setattr(engine, "merge_planned", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run_merge(r, tmp_path / "out")
        assert seen == ({2} if leaves_a_core else {3})
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
