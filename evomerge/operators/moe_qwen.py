"""A Qwen2-MoE output for a mergekit-moe config with one shared expert (as mergekit-moe
0.1.5 writes it).

Each layer keeps the base's attention (with q/k/v biases: the base's, else zeros, as
a Qwen2-MoE has them), norms and embeddings; expert e is model e's MLP under
``mlp.experts.{e}``, the shared expert's model's MLP is ``mlp.shared_expert``, every
token goes through it, scaled by sigmoid(``shared_expert_gate`` . x) (one row of the
gates, computed as the experts' are). The shared expert is as wide as the experts
(``shared_expert_intermediate_size`` = ``moe_intermediate_size`` = the base's
``intermediate_size``); top-k weights are renormalised (``norm_topk_prob``). Noise is
drawn per projection (down, gate, up, the shared expert's last), as mergekit does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.operators.moe_config import MoEConfig
from evomerge.operators.moe_sources import EMBED, MoESources, expert_part, router_dtype
from evomerge.operators.writer import Entry

ATTENTION = tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("bias", "weight")) + (
    "self_attn.o_proj.weight",
)
PROJECTIONS = ("down_proj", "gate_proj", "up_proj")  # mergekit's Qwen2 weight order: its order of noise draws


def qwen_kept(src: MoESources) -> list[str]:
    """The base's tensors a Qwen2-MoE keeps, in model order (biases included: zeros when absent)."""
    names = [EMBED]
    for i in range(src.layers):
        names.append(f"model.layers.{i}.input_layernorm.weight")
        names += [f"model.layers.{i}.post_attention_layernorm.weight"]
        names += [f"model.layers.{i}.{n}" for n in ATTENTION]
    names.append("model.norm.weight")
    if "lm_head.weight" in src.base.tensors:
        names.append("lm_head.weight")
    return names


def _bias_size(src: MoESources, name: str) -> int:
    """A missing attention bias's length: heads times head size (hidden / heads), as mergekit's zeros."""
    cfg = src.base.config
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    return (kv if name.endswith(("k_proj.bias", "v_proj.bias")) else heads) * (cfg["hidden_size"] // heads)


def qwen_entries(src: MoESources, dtype: torch.dtype | None) -> list[Entry]:
    """Every tensor of the Qwen2-MoE, in the order :func:`qwen_tensors` yields them."""
    entries: list[Entry] = []
    for name in qwen_kept(src):
        info = src.base.tensors.get(name)
        if info is None:
            entries.append((name, (_bias_size(src, name),), dtype or torch.float32))
        else:
            entries.append((name, info.shape, dtype or info.dtype))
        if name.endswith("post_attention_layernorm.weight"):
            entries += _layer_entries(src, int(name.split(".")[2]), dtype)
    return entries


def _layer_entries(src: MoESources, i: int, dtype: torch.dtype | None) -> list[Entry]:
    out: list[Entry] = []
    for part in PROJECTIONS:
        name = f"model.layers.{i}.mlp.{part}.weight"
        for e, ck in enumerate(src.experts):
            info = ck.tensors[name]
            out.append((f"model.layers.{i}.mlp.experts.{e}.{part}.weight", info.shape, dtype or info.dtype))
        shared = src.shared[0].tensors[name]
        out.append((f"model.layers.{i}.mlp.shared_expert.{part}.weight", shared.shape, dtype or shared.dtype))
    hidden = src.base.tensors[EMBED].shape[1]
    out.append((f"model.layers.{i}.mlp.gate.weight", (len(src.experts), hidden), router_dtype(src, dtype)))
    out.append((f"model.layers.{i}.mlp.shared_expert_gate.weight", (1, hidden), router_dtype(src, dtype)))
    return out


def qwen_tensors(
    cfg: MoEConfig, src: MoESources, gates: Tensor, gen: torch.Generator, dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    """The Qwen2-MoE's tensors in :func:`qwen_entries`' order; ``gates`` is layers x
    (experts + the shared expert) x hidden (see :meth:`MoEConfig.gated`)."""
    assert cfg.shared_experts is not None

    def cast(t: Tensor) -> Tensor:
        return (t.to(dtype) if dtype is not None else t).contiguous()

    shared_cfg, shared_ck = cfg.shared_experts[0], src.shared[0]
    experts = len(cfg.experts)
    for name in qwen_kept(src):
        if name in src.base.tensors:
            yield name, cast(src.base.get(name))
        else:  # a Qwen2-MoE's attention has biases; a Llama's has none
            yield name, torch.zeros(_bias_size(src, name), dtype=dtype)
        if not name.endswith("post_attention_layernorm.weight"):
            continue
        i = int(name.split(".")[2])
        for part in PROJECTIONS:
            source, down = f"model.layers.{i}.mlp.{part}.weight", part == "down_proj"
            for e, (expert, ck) in enumerate(zip(cfg.experts, src.experts)):
                tensor = expert_part(ck, expert, source, gen, down)
                yield f"model.layers.{i}.mlp.experts.{e}.{part}.weight", cast(tensor)
            yield (
                f"model.layers.{i}.mlp.shared_expert.{part}.weight",
                cast(expert_part(shared_ck, shared_cfg, source, gen, down)),
            )
        # the config's checks give the shared expert a row of the gates (prompts, or random gates)
        rows = gates[i].to(router_dtype(src, dtype))
        yield f"model.layers.{i}.mlp.gate.weight", rows[:experts].contiguous()
        yield f"model.layers.{i}.mlp.shared_expert_gate.weight", rows[experts:].contiguous()


def qwen_config(cfg: MoEConfig, base_dir: Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """The base's config as a Qwen2-MoE's: every layer sparse, the experts and the shared
    expert as wide as the base's MLP, top-k weights renormalised, no sliding window."""
    from transformers import AutoConfig, Qwen2MoeConfig

    base = AutoConfig.from_pretrained(str(base_dir))
    out = Qwen2MoeConfig(**base.to_dict())
    out.architectures = ["Qwen2MoeForCausalLM"]
    out.num_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.sliding_window = None
    out.use_sliding_window = False
    out.shared_expert_intermediate_size = out.intermediate_size
    out.moe_intermediate_size = out.intermediate_size
    if dtype is not None:
        out.dtype = dtype
    return out.to_diff_dict()
