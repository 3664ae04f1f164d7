"""The opened models of a mixture of experts and the pieces both of its outputs (Mixtral,
Qwen2-MoE) take from them: the kept tensor names, an expert's MLP tensor with its noise
and residual scale, the routers' dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from evomerge.operators.checkpoint import Checkpoint
from evomerge.operators.moe_config import Expert

EMBED = "model.embed_tokens.weight"
LAYER_KEEP = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
)
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoESources:
    """The opened models of a mixture: the base and each expert's source (in order)."""

    base: Checkpoint
    experts: list[Checkpoint]
    shared: list[Checkpoint] = field(default_factory=list)  # the shared expert's model (Qwen2-MoE)
    arch: str = "mixtral"  # the output's model_type: mixtral or qwen2_moe

    @property
    def layers(self) -> int:
        return int(self.base.num_layers or 0)

    def kept(self) -> list[str]:
        """The base's tensors the mixture keeps, in model order (an absent ``lm_head`` is a tied one)."""
        names = [EMBED]
        for i in range(self.layers):
            names += [f"model.layers.{i}.{n}" for n in LAYER_KEEP]
        names.append("model.norm.weight")
        if "lm_head.weight" in self.base.tensors:
            names.append("lm_head.weight")
        return names


def router_dtype(src: MoESources, dtype: torch.dtype | None) -> torch.dtype:
    """The routers' dtype: the output's, else (no dtype anywhere) the base embedding's."""
    return dtype or src.base.tensors[EMBED].dtype


def expert_part(ck: Checkpoint, expert: Expert, name: str, gen: torch.Generator, down: bool) -> Tensor:
    """An expert's MLP tensor, with its noise (drawn from ``gen``) and, on ``down_proj``, its residual scale."""
    t = ck.get(name)
    if expert.noise_scale is not None:
        t = t + torch.randn(t.shape, dtype=t.dtype, generator=gen) * expert.noise_scale
    if down and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t
