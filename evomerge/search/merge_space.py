"""What a weight-merge search may propose, as the experiment config writes it: the
method(s), and for each operator parameter a searched range or a fixed value.
The search space (:mod:`evomerge.search.space`) derives its dimensions from these
and from the operators' own declarations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.operators.recipe import DTYPES


class Bounds(BaseModel):
    """A searched parameter's range (``low`` to ``high``), or a fixed ``value``."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = None
    high: float | None = None
    value: float | bool | None = None
    log: bool = False

    @model_validator(mode="after")
    def _either(self) -> Bounds:
        if self.value is None and (self.low is None) != (self.high is None):
            raise ValueError("give both low and high, or a fixed value")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class MergeSpace(BaseModel):
    """Which merges the search may propose."""

    model_config = ConfigDict(extra="forbid")
    method: str | list[str] = "task_arithmetic"
    parameters: dict[str, Bounds | float | bool] = Field(default_factory=dict)
    granularity: Literal["model", "filters"] | int = "model"
    filters: list[str] = Field(default_factory=lambda: ["self_attn", "mlp"])
    dtype: str = "float32"
    # whose vocabulary the merge keeps when the models' differ: base, union, or one of the models
    tokenizer_source: str | None = None

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype '{value}'; use one of {', '.join(DTYPES)}")
        return value

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("a layer-group granularity must be at least 1 layer")
        return value
