"""Mixture-of-experts merges: mergekit-moe 0.1.5 parity on the tiny zoo (every gate mode,
noise and residual scaling included), the Mixtral that transformers loads and runs, and
one-line refusals that write nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.operators.moe import run_moe
from evomerge.operators.moe_config import MoEConfig

from ..cli import one_line_error, run_cli
from .test_mergekit_parity import mergekit


def _config(zoo: Path, gate_mode: str, **extra) -> dict:
    return {
        "base_model": str(zoo / "base"),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(zoo / "cp"), "positive_prompts": ["cp:abc=", "cp:hello="]},
            {"source_model": str(zoo / "rev"), "positive_prompts": ["rev:abc="], "negative_prompts": ["cp:ab="]},
            {
                "source_model": str(zoo / "sort"),
                "positive_prompts": ["sort:dcba="],
                "noise_scale": 0.01,
                "residual_scale": 0.5,
            },  # fmt: skip
        ],
        **extra,
    }


def _shared(zoo: Path, gate_mode: str) -> dict:
    """A Qwen2-MoE config: the base as the shared expert (mergekit-moe 0.1.5 reads only the
    base's and the experts' models, so its shared expert must be one of them)."""
    shared = {"source_model": str(zoo / "base"), "positive_prompts": ["cp:a=", "sort:b="], "noise_scale": 0.02,
              "residual_scale": 0.5}  # fmt: skip
    return _config(zoo, gate_mode, shared_experts=[shared])


def _mergekit_moe() -> str:
    exe = Path(mergekit()).with_name("mergekit-moe")
    assert exe.is_file(), f"{exe}: mergekit-moe is installed with mergekit-yaml"
    return str(exe)


QWEN = [f"qwen-{m}" for m in ("cheap_embed", "random", "hidden")]


@pytest.mark.slow
@pytest.mark.parametrize("gate_mode", ["cheap_embed", "random", "uniform_random", "hidden", "hidden_avg", *QWEN])
def test_every_tensor_and_the_config_as_mergekit_moe(tiny_zoo, tmp_path, gate_mode):
    """The same YAML through `evomerge moe --seed 3` and `mergekit-moe --random-seed 3`:
    every tensor bit-equal (the hidden-state gates too: both run the base in bfloat16 on
    the CPU), and the same config.json; a Mixtral, and with a shared expert a Qwen2-MoE."""
    path = tmp_path / "moe.yml"
    qwen = gate_mode.startswith("qwen-")
    data = _shared(tiny_zoo, gate_mode[5:]) if qwen else _config(tiny_zoo, gate_mode)
    path.write_text(yaml.safe_dump(data))
    res = run_cli("moe", str(path), str(tmp_path / "ev"), "--seed", "3", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    mk = subprocess.run([_mergekit_moe(), str(path), str(tmp_path / "mk"), "--random-seed", "3"],
                        capture_output=True, text=True, timeout=600)  # fmt: skip
    assert mk.returncode == 0, mk.stderr[-3000:]
    ours, theirs = load_file(tmp_path / "ev" / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    assert json.loads((tmp_path / "ev" / "config.json").read_text()) == json.loads(
        (tmp_path / "mk" / "config.json").read_text()
    )
    assert (tmp_path / "ev" / "mergekit_moe_config.yml").read_text() == path.read_text()
    arch = json.loads((tmp_path / "ev" / "config.json").read_text())["architectures"]
    assert arch == (["Qwen2MoeForCausalLM"] if qwen else ["MixtralForCausalLM"])


def test_a_shared_expert_makes_a_qwen2_moe_that_transformers_runs(tiny_zoo, tmp_path):
    """A shared expert of its own model (which mergekit-moe 0.1.5 cannot read): every token
    goes through it; Llama attention gets zero q/k/v biases."""
    from transformers import AutoModelForCausalLM

    data = _shared(tiny_zoo, "cheap_embed")
    data["shared_experts"][0] |= {"source_model": str(tiny_zoo / "sort"), "noise_scale": None}
    out = run_moe(MoEConfig.model_validate(data), tmp_path / "q").out_dir
    merged = load_file(out / "model.safetensors")
    sort = load_file(tiny_zoo / "sort" / "model.safetensors")
    up = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged["model.layers.1.mlp.shared_expert.up_proj.weight"], sort[up])
    assert not merged["model.layers.0.self_attn.q_proj.bias"].any()
    assert merged["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, sort[up].shape[1])
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 7, 11, 5]])).logits).all()
    assert "shared (every token)" in (out / "README.md").read_text()


def test_a_mixture_of_one_model_twice_computes_that_model(tiny_zoo, tmp_path):
    """Experts that are the same MLP give the dense model: Mixtral weighs its top-k experts
    by a softmax renormalised to 1, so any router gives sum_k w_k MLP(x) = MLP(x). Loaded
    by transformers as a MixtralForCausalLM, its logits are the base's."""
    from transformers import AutoModelForCausalLM

    twin = tmp_path / "twin"
    shutil.copytree(tiny_zoo / "base", twin)
    cfg = MoEConfig.model_validate(
        {
            "base_model": str(tiny_zoo / "base"),
            "gate_mode": "random",
            "experts": [{"source_model": str(tiny_zoo / "base")}, {"source_model": str(twin)}],
        }  # fmt: skip
    )
    out = run_moe(cfg, tmp_path / "moe", seed=1).out_dir
    moe = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_zoo / "base")).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 2
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "Mixture of experts" in card and "moe" in card and "gate_mode: random" in card
    assert {"tokenizer.json", "tokenizer_config.json", "mergekit_moe_config.yml"} <= {p.name for p in out.iterdir()}


def test_experts_of_a_different_rank_are_their_own(tiny_zoo, tmp_path):
    """Expert e of layer l is model e's MLP at layer l; the routers' rows are unit vectors."""
    cfg = MoEConfig.model_validate(_config(tiny_zoo, "cheap_embed"))
    out = run_moe(cfg, tmp_path / "moe", seed=0).out_dir
    merged = load_file(out / "model.safetensors")
    cp = load_file(tiny_zoo / "cp" / "model.safetensors")
    rev = load_file(tiny_zoo / "rev" / "model.safetensors")
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    inter = cp["model.layers.1.mlp.gate_proj.weight"].shape[0]
    gate_up = merged["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[0, :inter], cp["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[1, inter:], rev["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.1.mlp.experts.down_proj"][1], rev["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    router = merged["model.layers.0.mlp.gate.weight"]
    assert router.shape == (3, base["model.embed_tokens.weight"].shape[1])
    torch.testing.assert_close(router.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    "change, says",
    [
        ({"gate_mode": "hidden", "drop_prompts": True}, "experts.0.positive_prompts: gate_mode hidden needs prompts"),
        ({"experts_per_token": 4}, "experts_per_token: 4 is not between 1 and the 3 expert(s)"),
        (
            {"shared_experts": [{"source_model": "x"}, {"source_model": "y"}]},
            "shared_experts: one shared expert at most",
        ),
        ({"shared_experts": [{"source_model": "x"}]}, "shared_experts.0.positive_prompts: gate_mode cheap_embed needs"),
        ({"architecture": "deepseek"}, "architecture: 'deepseek': evomerge writes Mixtral or Qwen2-MoE"),
        ({"gate_mode": "random", "shared_base": True}, "makes mergekit-moe write a DeepSeek-MoE"),
        ({"architecture": "qwen"}, "a Qwen2-MoE needs exactly one shared expert"),
        ({"same_models": True}, "experts: every expert is the same model"),
        ({"gate_mode": "fancy"}, "gate_mode: Input should be"),
        ({"gpt2": True}, "model_type 'gpt2' cannot become part of a Mixtral"),
    ],
)
def test_bad_configs_are_one_line_and_write_nothing(tiny_zoo, tmp_path, change, says):
    data = _config(tiny_zoo, change.pop("gate_mode", "cheap_embed"), **{k: v for k, v in change.items() if k not in (
        "drop_prompts", "same_models", "gpt2", "shared_base")})  # fmt: skip
    if change.get("shared_base"):
        data["shared_experts"] = [{"source_model": str(tiny_zoo / "base")}]
    if change.get("drop_prompts"):
        del data["experts"][0]["positive_prompts"]
    if change.get("same_models"):
        for e in data["experts"]:
            e["source_model"] = str(tiny_zoo / "cp")
    if change.get("gpt2"):
        odd = tmp_path / "odd"
        shutil.copytree(tiny_zoo / "rev", odd)
        cfg = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        data["experts"][1]["source_model"] = str(odd)
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data))
    res = run_cli("moe", str(path), str(tmp_path / "out"), "--quiet")
    line = one_line_error(res)
    assert says in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_tensor_a_mixtral_has_no_place_for_is_refused(tiny_zoo, tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "base"
    shutil.copytree(tiny_zoo / "base", odd)
    state = load_file(odd / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(
        state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    )
    save_file(state, odd / "model.safetensors")
    cfg = MoEConfig.model_validate({**_config(tiny_zoo, "random"), "base_model": str(odd)})
    with pytest.raises(EvomergeError, match="q_proj.bias' has no place in a Mixtral"):
        run_moe(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
