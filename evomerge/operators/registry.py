"""One registry of merge operators, each declared once with its parameters.

An operator is a pure function over tensors::

    fn(tensors, base, gen, **params) -> Tensor

``tensors`` holds one tensor per merged model (the base model excluded when the
operator uses a base), ``base`` the base model's tensor or ``None``, ``gen`` a
seeded :class:`torch.Generator` (only random operators use it). Parameters
declared ``per_model`` arrive as one value per tensor, the others as scalars.

The declarations are the single source of truth: recipe validation, defaults
and the search space (``evomerge.search``) are all derived from them.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from evomerge.errors import RecipeError

Scalar = float | int | bool
BaseUse = Literal["none", "optional", "required"]
OperatorFn = Callable[..., Tensor]

# Modules whose import registers operators. The registry imports them on first
# lookup, so importing ``evomerge.operators`` registers nothing by side effect.
_PROVIDERS = ("evomerge.operators.methods",)


@dataclass(frozen=True)
class Param:
    """A declared operator parameter.

    ``low``/``high`` bound the values that are valid at all (inclusive; ``None``
    is unbounded); ``search`` is the default range a search explores, or
    ``None`` when the parameter is not searched by default. ``default=None``
    means the parameter is required.
    """

    name: str
    default: Scalar | None
    kind: type = float
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    search: tuple[float, float] | None = None
    log: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: object, where: str) -> Scalar:
        """Return ``value`` converted to this parameter's kind, or raise."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise RecipeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise RecipeError(f"{where}: parameter '{self.name}' must be finite, got {value!r}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise RecipeError(f"{where}: parameter '{self.name}' = {value!r} is outside [{lo}, {hi}]")
        if self.kind is int:
            if number != int(number):
                raise RecipeError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}")
            return int(number)
        return number


@dataclass(frozen=True)
class Operator:
    """A registered merge operator and its contract."""

    name: str
    fn: OperatorFn
    params: tuple[Param, ...]
    base: BaseUse = "none"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    doc: str = ""
    # True when ``fn`` accepts the merged tensors and the base in any float dtype and
    # computes in float32 itself (the engine need not make float32 copies of them),
    # and takes an ``out_dtype`` keyword: the dtype the engine stores, which ``fn`` may
    # return directly instead of float32 (saving a copy and a conversion pass).
    mixed_precision: bool = False
    aliases: tuple[str, ...] = field(default=())
    # True when ``fn`` runs numba kernels on the CPU (evomerge.operators.kernels): the
    # engine starts loading them beside the first reads.
    cpu_kernels: bool = False
    # True when a NaN or Inf in any input (a merged tensor or the base) always makes the
    # result non-finite, whatever the parameters (a contract test injects them): the
    # engine then checks only the result, and the inputs only to name the culprit.
    nonfinite_propagates: bool = False
    # True when each output element depends only on the same element of the inputs (and
    # the parameters): merging a concatenation of tensors gives the concatenation of their
    # merges, bit for bit (a contract test checks it), so a caller may merge a run of
    # tensors that share parameters as one.
    elementwise: bool = False
    # True when ``fn`` (mixed precision) also takes an ``out`` keyword: a contiguous tensor
    # of the result's shape in ``out_dtype``, overlapping no input, that the result is
    # written into and that ``fn`` returns (the engine merges straight into a resident
    # model's parameters; a contract test checks the bits and the storage).
    writes_out: bool = False
    # True when ``fn`` raises ``finite.NonFiniteResult`` whenever the result it returns
    # holds a NaN or Inf (a fused kernel sees each value as it stores it): the engine then
    # does not read the result again to check it (a contract test injects them).
    checks_finite: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __call__(self, tensors: Sequence[Tensor], base: Tensor | None = None, gen=None, **params) -> Tensor:
        return self.fn(list(tensors), base, gen, **params)


_REGISTRY: dict[str, Operator] = {}
_loaded = False


def register(
    name: str,
    *,
    params: Sequence[Param] = (),
    base: BaseUse = "none",
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    mixed_precision: bool = False,
    cpu_kernels: bool = False,
    nonfinite_propagates: bool = False,
    elementwise: bool = False,
    writes_out: bool = False,
    checks_finite: bool = False,
) -> Callable[[OperatorFn], OperatorFn]:
    """Decorator: register ``fn`` under ``name`` with its declared parameters."""

    def decorate(fn: OperatorFn) -> OperatorFn:
        doc = (fn.__doc__ or "").strip()
        add(
            Operator(
                name, fn, tuple(params), base, min_models, max_models, random, doc, mixed_precision,
                cpu_kernels=cpu_kernels, nonfinite_propagates=nonfinite_propagates, elementwise=elementwise,
                writes_out=writes_out, checks_finite=checks_finite,
            )
        )  # fmt: skip
        return fn

    return decorate


def add(op: Operator) -> Operator:
    """Register a ready-made :class:`Operator`; a name may be registered once."""
    if op.name in _REGISTRY:
        raise ValueError(f"merge operator '{op.name}' is registered twice")
    if op.writes_out and not op.mixed_precision:
        raise ValueError(f"merge operator '{op.name}': writes_out needs mixed_precision (out is in out_dtype)")
    _REGISTRY[op.name] = op
    return op


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _PROVIDERS:
            importlib.import_module(module)


def get_operator(name: str) -> Operator:
    """The operator registered as ``name``; unknown names suggest the closest."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown merge_method '{name}'{hint}; known: {', '.join(sorted(_REGISTRY))}") from None


def operators() -> dict[str, Operator]:
    """Every registered operator by name."""
    _ensure_loaded()
    return dict(_REGISTRY)


def all_param_names() -> set[str]:
    """Names declared by any operator (to tell a typo from a parameter of another method)."""
    return {p.name for op in operators().values() for p in op.params}
