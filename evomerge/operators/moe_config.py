"""mergekit-moe's YAML as pydantic models: a base model whose attention, norms and
embeddings a mixture of experts keeps, and experts whose MLPs become its experts.

``gate_mode`` sets the routers' initial weights: ``hidden`` (also ``hidden_last``) the
base's hidden state at each layer's input for the last token of the expert's prompts,
``hidden_avg`` the same averaged over the positions, ``cheap_embed`` the normalised sum
of the prompts' token embeddings (one vector for every layer), ``random`` and
``uniform_random`` seeded noise (standard normal; ``nn.Linear``'s uniform range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from evomerge.operators.recipe import DTYPES, Recipe, load_yaml, validated

ARCHITECTURES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe"}  # mergekit-moe's names -> model_type
GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
PROMPTLESS = ("random", "uniform_random")


class Expert(BaseModel):
    """One expert: the model whose MLPs it is, the prompts that route to it, and
    optional noise (std ``noise_scale``) and a factor on its down projection (``residual_scale``).
    ``gate_scale`` (evomerge's, searched; mergekit-moe ignores it) multiplies the expert's
    router row: its logit, so how often and how strongly the expert is chosen."""

    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None
    gate_scale: float | None = None

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    """A ``mergekit-moe`` config. The output is a Mixtral (``MixtralForCausalLM``), or with
    one shared expert (an MLP every token goes through, behind a gate of its own) a
    Qwen2-MoE (``Qwen2MoeForCausalLM``), as mergekit-moe 0.1.5 chooses."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[Expert]
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}' (one of {', '.join(DTYPES)})")
        return v

    @field_validator("architecture")
    @classmethod
    def _written(cls, v: str | None) -> str | None:
        if v is not None and not any(name.startswith(v.lower()) for name in ARCHITECTURES):
            raise ValueError(f"'{v}': evomerge writes Mixtral or Qwen2-MoE mixtures (architecture: mixtral or qwen)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        if not 1 <= self.experts_per_token <= len(self.experts):
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is not between 1 and the {len(self.experts)} expert(s)"
            )
        if self.shared_experts and len(self.shared_experts) > 1:
            raise ValueError("shared_experts: one shared expert at most (a Qwen2-MoE has one)")
        if self.shared_experts and self.gate_mode not in PROMPTLESS and not self.shared_experts[0].positive_prompts:
            raise ValueError(
                f"shared_experts.0.positive_prompts: gate_mode {self.gate_mode} needs prompts for the shared "
                "expert's gate (without them mergekit-moe writes a DeepSeek-MoE, which evomerge does not)"
            )
        if self.gate_mode not in PROMPTLESS:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"experts.{i}.positive_prompts: gate_mode {self.gate_mode} needs prompts")
            if len(self.experts) > 1 and len({e.prompts() for e in self.experts}) == 1:
                raise ValueError("experts: every expert has the same prompts; the router could not tell them apart")
        if len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            raise ValueError("experts: every expert is the same model (the mixture would equal it, at more cost)")
        return self

    def models(self) -> list[str]:
        """The base model, then every expert's source, then the shared expert's (in order, once each)."""
        shared = [e.source_model for e in self.shared_experts or []]
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in self.experts), *shared]))

    def gated(self) -> list[Expert]:
        """The experts whose router rows the gates compute: every expert, then the shared
        one (when it has prompts, or the gates are random)."""
        shared = self.shared_experts or []
        if shared and (shared[0].positive_prompts or self.gate_mode in PROMPTLESS):
            return [*self.experts, *shared]
        return list(self.experts)

    # what a search candidate and its export ask of a recipe (as :class:`Recipe` has it)
    merge_method: ClassVar[str] = "moe"

    def referenced_models(self) -> list[str]:
        return self.models()

    def with_models(self, mapping: dict[str, str]) -> MoEConfig:
        """A copy with model references renamed through ``mapping`` (others kept)."""
        out = self.model_copy(deep=True)
        out.base_model = mapping.get(out.base_model, out.base_model)
        for e in [*out.experts, *(out.shared_experts or [])]:
            e.source_model = mapping.get(e.source_model, e.source_model)
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "moe config") -> MoEConfig:
        return validated(cls, data, source, "a mergekit-moe config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> MoEConfig:
        return cls.from_dict(load_yaml(path), str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def is_moe(recipe: dict[str, Any]) -> bool:
    """Whether a recipe dict is a mixture of experts (mergekit-moe's ``experts:``)."""
    return "experts" in recipe


def candidate(recipe: dict[str, Any], source: str = "recipe") -> Recipe | MoEConfig:
    """A recipe dict as what it is: a mergekit recipe or a mergekit-moe config."""
    return MoEConfig.from_dict(recipe, source) if is_moe(recipe) else Recipe.from_dict(recipe, source)
