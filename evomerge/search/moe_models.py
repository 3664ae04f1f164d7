"""A mixture-of-experts worker's models: each source's MLP tensors held on the device,
and one Mixtral shell per expert count whose attention, norms and embeddings are the
base's (loaded once) and whose experts and routers each candidate overwrites in place,
with the same functions as the export (:mod:`evomerge.operators.moe`), so the scored
model is the exported one. A source alone (a baseline) is its dense model, loaded on
first use. Nothing here knows of Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.operators.checkpoint import open_checkpoint
from evomerge.operators.moe import fuse_experts, mixtral_config
from evomerge.operators.moe_config import MoEConfig, is_moe
from evomerge.operators.moe_gates import gate_vectors
from evomerge.operators.moe_sources import EMBED, MLP, MoESources
from evomerge.operators.recipe import Recipe


class MoEModels:
    """Candidates of a mixture-of-experts search, assembled on ``device`` in ``dtype``."""

    def __init__(self, sources: dict[str, Path], base: str, device: torch.device, dtype: torch.dtype):
        from evomerge.fitness.scoring import load_tokenizer

        self.paths, self.base, self.device, self.dtype = sources, base, device, dtype
        self.base_ck = open_checkpoint(sources[base])
        self.layers = int(self.base_ck.num_layers or 0)
        self.embed = self.base_ck.get(EMBED)
        self.mlps: dict[str, dict[str, torch.Tensor]] = {}
        for ref, path in sources.items():
            ck = open_checkpoint(path)
            self.mlps[ref] = {n: ck.get(n).to(device, dtype) for n in ck.tensors if ".mlp." in n}
            ck.close()
        self.tokenizer = load_tokenizer(sources[base])
        self.shells: dict[int, Any] = {}
        self.dense: dict[str, tuple[Any, Any]] = {}
        self.memo: dict[Any, Any] = {}  # the gates' tokenizer, base model and rows per prompt set

    def assemble(self, recipe: dict[str, Any], seed: int) -> tuple[Any, Any]:
        """The model and tokenizer of a candidate: a mixture, or a source model alone."""
        if is_moe(recipe):
            return self._mixture(MoEConfig.from_dict(recipe, "mixture of experts"), seed), self.tokenizer
        from evomerge.search.stack import stack_of

        stack = stack_of(Recipe.from_dict(recipe))
        models = {m for m, _, _ in stack or []}
        if stack is None or len(models) != 1 or [i for _, i, _ in stack] != list(range(self.layers)):
            raise EvomergeError("a mixture-of-experts worker scores mixtures and whole source models only")
        return self._dense(models.pop())

    def _dense(self, ref: str) -> tuple[Any, Any]:
        from evomerge.fitness.scoring import load_model

        if ref not in self.dense:
            self.dense[ref] = load_model(self.paths[ref], self.device, self.dtype)
        return self.dense[ref]

    @torch.no_grad()
    def _mixture(self, cfg: MoEConfig, seed: int) -> Any:
        unknown = [e.source_model for e in cfg.experts if e.source_model not in self.mlps]
        if unknown or cfg.base_model != self.base:
            raise EvomergeError(f"the mixture names models that are not resident: {unknown or [cfg.base_model]}")
        if any(e.noise_scale for e in cfg.experts):
            raise EvomergeError("a search candidate carries no expert noise (noise_scale)")
        shell = self._shell(cfg)
        gen = torch.Generator().manual_seed(seed)
        routers = gate_vectors(cfg, self.paths[self.base], self.embed, self.layers, gen, str(self.device), self.memo)
        for i, layer in enumerate(shell.model.layers):
            parts = {
                p: [self.mlps[e.source_model][f"model.layers.{i}.mlp.{p}.weight"] for e in cfg.experts] for p in MLP
            }
            scales = [e.residual_scale for e in cfg.experts]
            if any(s is not None for s in scales):
                parts["down_proj"] = [t if s is None else t * s for t, s in zip(parts["down_proj"], scales)]
            gate_up, down = fuse_experts(parts["gate_proj"], parts["up_proj"], parts["down_proj"])
            moe = layer.mlp
            moe.experts.gate_up_proj.copy_(gate_up)
            moe.experts.down_proj.copy_(down)
            moe.gate.weight.copy_(routers[i].to(self.dtype))
            moe.top_k = moe.gate.top_k = cfg.experts_per_token
        shell.config.num_experts_per_tok = cfg.experts_per_token
        return shell

    def _shell(self, cfg: MoEConfig) -> Any:
        """The Mixtral of this many experts, the base's other tensors in place."""
        count = len(cfg.experts)
        if count not in self.shells:
            from transformers import AutoModelForCausalLM, MixtralConfig

            config = MixtralConfig(**mixtral_config(cfg, self.paths[self.base], self.dtype))
            shell = AutoModelForCausalLM.from_config(config, dtype=self.dtype).to(self.device).eval()
            params = shell.state_dict()
            kept = MoESources(self.base_ck, []).kept()
            for name in kept:
                params[name].copy_(self.base_ck.get(name))
            self.shells[count] = shell
        return self.shells[count]
