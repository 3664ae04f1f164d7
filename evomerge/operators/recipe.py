"""The merge recipe: mergekit's YAML format as pydantic models.

A recipe holds ``merge_method``, ``base_model``, ``dtype``/``out_dtype``, global
``parameters``, ``tokenizer_source``, ``chat_template`` and exactly one of
``models:`` (one slice over all layers of every model) or ``slices:``.
Parameter values are a number or bool, a list of numbers (a gradient over the
layers of a slice), or a list of ``{filter, value}`` entries (the first whose
filter is a substring of the tensor name wins; no filter is the fallback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import RecipeError

M = TypeVar("M", bound=BaseModel)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class FilterValue(BaseModel):
    """One ``{filter, value}`` entry of a conditional parameter."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[bool, float, list[float]]


ParamValue = Union[bool, float, list[float], list[FilterValue]]
Params = dict[str, ParamValue]


class InputModel(BaseModel):
    """An entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Params | None = None


class SliceSource(BaseModel):
    """One source of a slice: a model and a half-open layer range."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Params | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class Slice(BaseModel):
    """An entry of ``slices:``; all its sources span the same number of layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Params | None = None

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"sources of one slice span different layer counts {sorted(lengths)}")
        return self

    @property
    def length(self) -> int:
        first = self.sources[0].layer_range
        return first[1] - first[0]


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary's source, per-token
    embedding sources (a model name, ``{kind: zero}``, or ``{kind: model_token, model,
    token | token_id}``, each with an optional ``force``), and row padding."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, dict[str, Any]] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(BaseModel):
    """A mergekit-compatible merge recipe."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    parameters: Params | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype '{value}'; use one of {', '.join(DTYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and value not in ("auto", "chatml") and "{{" not in value and "{%" not in value:
            raise ValueError(f"'{value}' is neither 'auto', 'chatml' nor a Jinja template")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("a recipe needs exactly one of 'models:' or 'slices:'")
        if self.models is not None and not self.models:
            raise ValueError("'models:' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices:' is empty")
        return self

    # ---- derived facts -------------------------------------------------
    @property
    def out_torch_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        names: list[str] = [self.base_model] if self.base_model else []
        if self.models is not None:
            names += [m.model for m in self.models]
        for sl in self.slices or []:
            names += [s.model for s in sl.sources]
        if self.vocab_source not in (None, "base", "union"):
            names.append(self.vocab_source)
        return list(dict.fromkeys(names))

    @property
    def vocab_source(self) -> str | None:
        """Whose vocabulary the output has (``tokenizer.source`` wins over ``tokenizer_source``,
        as in mergekit); None: the sources must share one."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def with_models(self, names: dict[str, str]) -> Recipe:
        """A copy whose model references (``base_model``, ``tokenizer_source``, every
        ``models:`` and ``slices:`` source) are renamed by ``names``; nothing else changes,
        even a parameter or filter that happens to equal a model's name."""

        def rename(ref: str) -> str:
            return names.get(ref, ref)

        out = self.model_copy(deep=True)
        if out.base_model is not None:
            out.base_model = rename(out.base_model)
        if out.tokenizer_source is not None and out.tokenizer_source not in ("base", "union"):
            out.tokenizer_source = rename(out.tokenizer_source)
        if out.tokenizer is not None:
            if out.tokenizer.source not in ("base", "union"):
                out.tokenizer.source = rename(out.tokenizer.source)
            for spec in (out.tokenizer.tokens or {}).values():
                src = spec.get("source")
                if isinstance(src, str):
                    spec["source"] = rename(src)
                elif isinstance(src, dict) and isinstance(src.get("model"), str):
                    src["model"] = rename(src["model"])
        for m in out.models or []:
            m.model = rename(m.model)
        for sl in out.slices or []:
            for src in sl.sources:
                src.model = rename(src.model)
        return out

    # ---- YAML ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        return validated(cls, data, source, "a recipe")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return cls.from_dict(load_yaml(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning every failure into a one-line :class:`RecipeError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{p}: cannot read: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{p}: invalid YAML{where}: {problem}") from None


def validated(model: type[M], data: Any, source: str, what: str) -> M:
    """``data`` (parsed YAML) as ``model``; a non-mapping or an invalid field is one
    :class:`RecipeError` line naming ``source`` and the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {what} must be a YAML mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {_one_line(err)}") from None


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"] if not str(x).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def resolve_value(value: ParamValue, tensor_name: str, layer: int | None, n_layers: int) -> float | bool | None:
    """The value of one parameter for one tensor.

    Filters pick the first entry whose filter is a substring of ``tensor_name``
    (an entry without one is the fallback; ``None`` when nothing matches).
    A gradient is interpolated at x = layer/(n_layers-1)*(len-1) (len-1 when
    n_layers is 1); tensors outside the layers take its first entry.
    """
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for entry in value:
            assert isinstance(entry, FilterValue)
            if entry.filter is None or entry.filter in tensor_name:
                return resolve_value(entry.value, tensor_name, layer, n_layers)
        return None
    if isinstance(value, list):
        points = [float(v) for v in value]  # type: ignore[arg-type]
        if not points:
            return None
        if layer is None or len(points) == 1:
            return points[0]
        x = (layer / (n_layers - 1) if n_layers > 1 else 1.0) * (len(points) - 1)
        lo = min(int(x), len(points) - 2)
        frac = x - lo
        return points[lo] * (1 - frac) + points[lo + 1] * frac
    return value
