"""The mixture-of-experts search space: which models become experts of a Mixtral built
on the base, how many experts each token takes, and how strongly each expert's router
row pulls (its ``gate_scale``).

Encoding, as the layer-stack space's (:mod:`evomerge.search.stack`): one gene per model
in [-1, 1], the model an expert when gene + BIAS > 0, so that the centre of the cube,
where CMA-ES starts, is every model an expert; at least ``min_experts`` are (the
highest genes win). ``experts_per_token`` is one real gene in [0.5, N + 0.5] rounded,
then capped at the number of experts; its centre is the middle count. Each model's
``gate_scale`` is a log-scaled gene in [low, high] whose centre is their geometric mean
(1 for the default range): router logits times s, so s > 1 makes an expert win more
tokens and weigh more among the chosen. A point becomes a mergekit-moe config (the
gate scales an evomerge extension that mergekit-moe ignores), built and scored in
memory by the workers and exported by ``evomerge moe``'s writer: the scored model is
the exported one.
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.operators.moe_config import GateMode, MoEConfig
from evomerge.search.space import Dim
from evomerge.search.stack import BIAS, stack_recipe

METHOD = "moe"


class MoESpace:
    """Genes over the models; a point becomes a :class:`MoEConfig`."""

    def __init__(
        self,
        models: list[str],
        base: str,
        n_layers: int,
        *,
        gate_mode: GateMode,
        prompts: dict[str, list[str]],
        negative_prompts: dict[str, list[str]],
        min_experts: int,
        gate_scale: tuple[float, float],
        dtype: str,
    ):
        self.models, self.base, self.n_layers, self.dtype = models, base, n_layers, dtype
        self.gate_mode, self.prompts, self.negative = gate_mode, prompts, negative_prompts
        self.min_experts = min_experts
        n = len(models)
        on = [Dim(f"expert:{m}", METHOD, "expert", -1.0, 1.0, False, m) for m in models]
        k = [Dim("experts_per_token", METHOD, "experts_per_token", 0.5, n + 0.5, False)]
        low, high = gate_scale
        scales = [Dim(f"gate_scale:{m}", METHOD, "gate_scale", low, high, True, m) for m in models]
        self.dims = {METHOD: on + k + scales}

    def sample(self, trial) -> dict[str, Any]:
        return {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in self.dims[METHOD]}

    def complete(self, params: dict[str, Any]) -> bool:
        return all(d.name in params for d in self.dims[METHOD])

    def default_params(self, method: str | None = None) -> dict[str, Any]:
        """The centre of the cube: every model an expert, the middle count per token, scale 1."""
        return {d.name: math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2 for d in self.dims[METHOD]}

    def experts(self, params: dict[str, Any]) -> list[str]:
        """The models that are experts at a point, in the models' order."""
        genes = [float(params[f"expert:{m}"]) + BIAS for m in self.models]
        on = {i for i, g in enumerate(genes) if g > 0}
        for i in sorted(range(len(genes)), key=lambda i: (-genes[i], i)):
            if len(on) >= self.min_experts:
                break
            on.add(i)
        return [m for i, m in enumerate(self.models) if i in on]

    def recipe(self, params: dict[str, Any], paths: dict[str, str] | None = None) -> MoEConfig:
        name = (paths or {}).get
        chosen = self.experts(params)
        per_token = min(len(chosen), max(1, round(float(params["experts_per_token"]))))
        experts = []
        for m in chosen:
            expert: dict[str, Any] = {"source_model": name(m, m), "gate_scale": float(params[f"gate_scale:{m}"])}
            if m in self.prompts:
                expert["positive_prompts"] = self.prompts[m]
            if m in self.negative:
                expert["negative_prompts"] = self.negative[m]
            experts.append(expert)
        return MoEConfig.from_dict(
            {
                "base_model": name(self.base, self.base),
                "gate_mode": self.gate_mode,
                "dtype": self.dtype,
                "experts_per_token": per_token,
                "experts": experts,
            },
            "mixture of experts",
        )

    def source_recipe(self, ref: str) -> dict[str, Any]:
        """A source model alone, as a stack of all its layers (what the workers score as it is)."""
        return stack_recipe([(ref, i) for i in range(self.n_layers)], self.dtype).to_dict()
