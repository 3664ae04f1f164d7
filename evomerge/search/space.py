"""The search space, derived from the operator registry's parameter declarations.

Each searched parameter becomes one Optuna distribution per model (for per-model
parameters) and per group (whole model, a filter such as ``self_attn``, or a
group of k layers); a point of the space becomes a mergekit-compatible recipe.
Bounds are real distribution bounds: nothing is clamped or folded afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from evomerge.errors import EvomergeError
from evomerge.operators.moe_config import MoEConfig
from evomerge.operators.recipe import Recipe
from evomerge.operators.registry import Operator, Param, get_operator
from evomerge.search.merge_space import Bounds, MergeSpace

OTHER = "other"  # the group of tensors that match none of the filters


@dataclass(frozen=True)
class Dim:
    """One searched number: a parameter of a method, for a model and a group."""

    name: str
    method: str
    param: str
    low: float
    high: float
    log: bool
    model: str | None = None
    group: str | None = None

    def distribution(self):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log)


class Space(Protocol):
    """What the loop and the run need of a search space."""

    dims: dict[str, list[Dim]]

    def sample(self, trial) -> dict[str, Any]: ...

    def default_params(self, method: str | None = None) -> dict[str, Any]: ...

    def recipe(self, params: dict[str, Any], paths: dict[str, str] | None = None) -> Recipe | MoEConfig: ...

    def complete(self, params: dict[str, Any]) -> bool: ...


class SearchSpace:
    """Searched dimensions and fixed values for each candidate method."""

    def __init__(self, merge: MergeSpace, models: list[str], base: str | None, n_layers: int):
        self.merge = merge
        self.models = models
        self.base = base
        self.n_layers = n_layers
        self.groups = self._groups()
        self.ops = {m: get_operator(m) for m in merge.methods}
        self.dims: dict[str, list[Dim]] = {}
        self.fixed: dict[str, dict[str, Any]] = {}
        for name, op in self.ops.items():
            self._check_models(op)
            self.dims[name], self.fixed[name] = self._derive(op)

    # ---- derivation -------------------------------------------------------
    def _groups(self) -> list[str | None]:
        g = self.merge.granularity
        if g == "model":
            return [None]
        if g == "filters":
            return [*self.merge.filters, OTHER]
        size = int(g)
        return [f"L{start}" for start in range(0, self.n_layers, size)]

    def merged_models(self, op: Operator) -> list[str]:
        return [m for m in self.models if not (op.base != "none" and m == self.base)]

    def _check_models(self, op: Operator) -> None:
        if op.base == "required" and not self.base:
            raise EvomergeError(f"merge.method '{op.name}' needs a base_model")
        n = len(self.merged_models(op))
        if n < op.min_models or (op.max_models is not None and n > op.max_models):
            raise EvomergeError(f"merge.method '{op.name}' cannot merge {n} model(s)")

    def _searched(self, op: Operator) -> list[Param]:
        unknown = set(self.merge.parameters) - {p.name for o in self.ops.values() for p in o.params}
        if unknown:
            raise EvomergeError(f"merge.parameters: {sorted(unknown)} are not parameters of {self.merge.methods}")
        if self.merge.parameters:
            return [p for p in op.params if p.name in self.merge.parameters]
        return [p for p in op.params if p.per_model and p.search is not None and p.kind is float]

    def _derive(self, op: Operator) -> tuple[list[Dim], dict[str, Any]]:
        dims: list[Dim] = []
        fixed: dict[str, Any] = {}
        for p in self._searched(op):
            spec = self.merge.parameters.get(p.name)
            if isinstance(spec, (bool, int, float)) or (isinstance(spec, Bounds) and spec.value is not None):
                value = spec.value if isinstance(spec, Bounds) else spec
                fixed[p.name] = p.check(value, f"merge.parameters.{p.name}")
                continue
            low, high, log = self._bounds(p, spec)
            owners = self.merged_models(op) if p.per_model else [None]
            groups = self.groups if p.per_model else [None]
            for model in owners:
                for group in groups:
                    dims.append(
                        Dim(
                            _dim_name(op.name, p.name, model, group, len(self.ops) > 1),
                            op.name,
                            p.name,
                            low,
                            high,
                            log,
                            model,
                            group,
                        )
                    )
        return dims, fixed

    @staticmethod
    def _bounds(p: Param, spec: Bounds | None) -> tuple[float, float, bool]:
        if p.kind is bool:
            raise EvomergeError(f"merge.parameters.{p.name}: a true/false parameter takes a fixed value, not a range")
        if spec is not None and spec.low is not None and spec.high is not None:
            low, high, log = spec.low, spec.high, spec.log
        elif p.search is not None:
            (low, high), log = p.search, p.log
        else:
            raise EvomergeError(f"merge.parameters.{p.name}: no declared search range; give low and high")
        for v in (low, high):
            p.check(v, f"merge.parameters.{p.name} bound")
        return low, high, log

    # ---- Optuna ------------------------------------------------------------
    def sample(self, trial) -> dict[str, Any]:
        """Suggest one point through an Optuna trial (define-by-run: methods are conditional)."""
        params: dict[str, Any] = {}
        method = self.merge.methods[0]
        if len(self.ops) > 1:
            method = params["method"] = trial.suggest_categorical("method", self.merge.methods)
        for d in self.dims[method]:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log)
        return params

    def complete(self, params: dict[str, Any]) -> bool:
        """Whether ``params`` holds every value of a point (a trial killed while its
        parameters were drawn holds only some)."""
        if len(self.ops) > 1 and params.get("method") not in self.ops:
            return False
        return all(d.name in params for d in self.dims[self.method_of(params)])

    def method_of(self, params: dict[str, Any]) -> str:
        return params.get("method", self.merge.methods[0])

    def default_params(self, method: str | None = None) -> dict[str, Any]:
        """The untuned default: declared defaults, and every weight 1/N, clipped into the bounds."""
        method = method or self.merge.methods[0]
        op = self.ops[method]
        n = len(self.merged_models(op))
        params: dict[str, Any] = {"method": method} if len(self.ops) > 1 else {}
        for d in self.dims[method]:
            p = op.param(d.param)
            assert p is not None
            value = 1.0 / n if d.param == "weight" else p.default
            if value is None:
                value = (d.low * d.high) ** 0.5 if d.log else (d.low + d.high) / 2
            params[d.name] = min(max(float(value), d.low), d.high)
        return params

    # ---- recipes -------------------------------------------------------------
    def recipe(self, params: dict[str, Any], paths: dict[str, str] | None = None) -> Recipe:
        """The mergekit-compatible recipe of a point; ``paths`` maps model refs to what the recipe names."""
        method = self.method_of(params)
        op = self.ops[method]
        name = (paths or {}).get
        per_model: dict[str, dict[str, dict[str | None, float]]] = {}
        global_params: dict[str, Any] = dict(self.fixed[method])
        for d in self.dims[method]:
            value = float(params[d.name])
            if d.model is None:
                global_params[d.param] = value
            else:
                per_model.setdefault(d.model, {}).setdefault(d.param, {})[d.group] = value
        data: dict[str, Any] = {"merge_method": method, "dtype": self.merge.dtype}
        if self.base and op.base != "none":
            data["base_model"] = name(self.base, self.base)
        if global_params:
            data["parameters"] = global_params
        source = self.merge.tokenizer_source
        if source is not None:
            data["tokenizer_source"] = source if source in ("base", "union") else name(source, source)
        merged = self.merged_models(op)
        if isinstance(self.merge.granularity, int):
            data["slices"] = self._slices(merged, per_model, name)
        else:
            data["models"] = [
                {"model": name(m, m), **({"parameters": self._values(per_model[m])} if m in per_model else {})}
                for m in merged
            ]
        return Recipe.from_dict(data, "search space")

    def _values(self, by_param: dict[str, dict[str | None, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for param, by_group in by_param.items():
            if None in by_group:
                out[param] = by_group[None]
            else:  # filters: the first matching filter wins, 'other' is the fallback
                entries: list[dict[str, Any]] = [{"filter": g, "value": v} for g, v in by_group.items() if g != OTHER]
                entries.append({"value": by_group[OTHER]})
                out[param] = entries
        return out

    def _slices(self, merged: list[str], per_model, name) -> list[dict[str, Any]]:
        size = int(self.merge.granularity)
        slices = []
        for start in range(0, self.n_layers, size):
            group = f"L{start}"
            end = min(start + size, self.n_layers)
            sources = []
            for m in merged:
                src: dict[str, Any] = {"model": name(m, m), "layer_range": [start, end]}
                if m in per_model:
                    src["parameters"] = {p: v[group] for p, v in per_model[m].items()}
                sources.append(src)
            slices.append({"sources": sources})
        return slices


def _dim_name(method: str, param: str, model: str | None, group: str | None, prefix: bool) -> str:
    name = param if model is None else f"{param}[{model}]"
    if group is not None:
        name += f"@{group}"
    return f"{method}.{name}" if prefix else name
