"""The layer-stack search space: which layers of which models are stacked, in order
(data-flow merging, the "frankenmerge" of mergekit's passthrough).

Encoding (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes",
Sec. 3.2, the data-flow space): the sources' layers are laid out in order (model 1's
layers 0..L-1, then model 2's, ...), the whole sequence repeated ``r`` times; one gene
per slot says whether that slot is in the stack. A stack is the slots that are on, in
slot order, so every stack keeps the layers' order within a pass and may revisit
layers on a later pass. Why this encoding: it is a fixed-length vector of reals, which
CMA-ES and TPE search as they are; every vector decodes to a valid stack (the depth
bounds are met by a deterministic repair: the highest scores win); and each source
itself, and any contiguous slice stack, is a point of the space.

A gene g lies in [-1, 1] and its slot is on when g + b > 0, where the bias b is
+BIAS for the slots of the starting stack (the first model's first pass) and -BIAS
for the others. The centre of the cube, where CMA-ES starts, is therefore the first
model itself, and Optuna's default step (a sixth of the range, 1/3) flips a gene with
probability P(|N(0, 1/3)| > 0.7) ~ 3.6 %: about one gene per sample on the demo zoo.
Without the bias (a gene on at 0.5 in [0, 1]) the centre makes every gene a coin flip
and nearly every stack is broken: on the demo zoo 49 of 64 such samples scored under
0.33 against 0.54 for the start. The paper's per-slot input scaling is left out: it cannot be
written as mergekit ``slices:``, and an exported model must be exactly what was scored.

Instead, with ``layers.scale`` set, each slot outside the starting stack has a second
gene: the scale of that layer's residual branch when the slot is on (its attention
``o_proj`` and MLP ``down_proj`` weights times s; s = 0 makes the layer the identity),
the trick frankenmerges use for repeated layers, and mergekit's passthrough ``scale``
with filters, so the export is the scored model. The starting stack's own layers keep
s = 1, so the centre of the cube is still the start. On the demo zoo, the start plus
one extra layer at s = 0.25 (add's last layer, or the merge's last layer again)
scores above the start, which no unscaled stack does (BENCHMARKS.md). Against a slot
list (K slots of model, first layer, length; ``bench/stack_encodings.py``) this
encoding beat the start in 2 of 3 seeds at 128 trials, the slot list in 1 of 3.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvomergeError
from evomerge.operators.recipe import FilterValue, Recipe
from evomerge.search.space import Dim

METHOD = "passthrough"
BIAS = 0.7
RESIDUAL = ("o_proj", "down_proj")  # the projections that write a layer's output into the residual stream

Layer = tuple[str, int, float]  # model, layer index, residual scale


class LayerGenes:
    """The Space interface of a stack encoding whose genes are plain floats within
    their Dim bounds and whose points decode to ``layers()`` (what the loop and the
    run use); subclasses give ``dims``, ``dtype`` and ``layers``."""

    dims: dict[str, list[Dim]]
    dtype: str

    def layers(self, params: dict[str, Any]) -> list[Layer]:
        raise NotImplementedError

    def sample(self, trial) -> dict[str, Any]:
        return {d.name: trial.suggest_float(d.name, d.low, d.high) for d in self.dims[METHOD]}

    def complete(self, params: dict[str, Any]) -> bool:
        return all(d.name in params for d in self.dims[METHOD])

    def default_params(self, method: str | None = None) -> dict[str, Any]:
        """The centre of the cube (each encoding decodes it to its start)."""
        return {d.name: (d.low + d.high) / 2 for d in self.dims[METHOD]}

    def recipe(self, params: dict[str, Any], paths: dict[str, str] | None = None) -> Recipe:
        return stack_recipe(self.layers(params), self.dtype, paths)


class StackSpace(LayerGenes):
    """Genes over the slots; a point becomes a passthrough recipe of ``slices:``.
    The centre of the cube is the first model as it is."""

    def __init__(
        self,
        models: list[str],
        n_layers: dict[str, int],
        *,
        repeats: int,
        depth: tuple[int, int],
        dtype: str,
        scale: tuple[float, float] | None = None,
    ):
        self.models = models
        self.n_layers = n_layers
        self.dtype = dtype
        self.slots = [(m, i) for _ in range(repeats) for m in models for i in range(n_layers[m])]
        low, high = depth
        if not 1 <= low <= high:
            raise EvomergeError(f"layers: the depth range [{low}, {high}] is impossible (need 1 <= min <= max)")
        if high > len(self.slots):
            raise EvomergeError(
                f"layers: max_layers {high} exceeds the {len(self.slots)} slots "
                f"({repeats} repeats of {sum(n_layers[m] for m in models)} layers); raise repeats or lower max_layers"
            )
        self.depth = (low, high)
        on = [Dim(f"slot[{k}]:{m}:{i}", METHOD, "on", -1.0, 1.0, False, m) for k, (m, i) in enumerate(self.slots)]
        self.scaled = [k for k, (m, _) in enumerate(self.slots) if scale is not None and not self._in_start(k)]
        scales = [
            Dim(f"slot[{k}]:{m}:{i}:scale", METHOD, "scale", scale[0], scale[1], False, m)
            for k, (m, i) in enumerate(self.slots)
            if k in self.scaled and scale is not None
        ]
        self.dims = {METHOD: on + scales}

    def label(self, model: str) -> str:
        """A short name for a model: ``zoo:add`` as it is, a path by its last component
        (with its position when two share one)."""
        short = model.rstrip("/").rsplit("/", 1)[-1]
        clash = sum(m.rstrip("/").rsplit("/", 1)[-1] == short for m in self.models) > 1
        return f"{short}#{self.models.index(model)}" if clash else short

    def _in_start(self, k: int) -> bool:
        first = self.models[0]
        return self.slots[k][0] == first and k < self.n_layers[first]

    def _bias(self) -> list[float]:
        return [BIAS if self._in_start(k) else -BIAS for k in range(len(self.slots))]

    def stack(self, params: dict[str, Any]) -> list[tuple[str, int]]:
        """The (model, layer) stack of a point, its depth repaired into the bounds."""
        return [(m, i) for m, i, _ in self.layers(params)]

    def layers(self, params: dict[str, Any]) -> list[Layer]:
        """The stack of a point with each layer's residual scale (1 unless searched)."""
        on_dims = self.dims[METHOD][: len(self.slots)]
        genes = [float(params[d.name]) + b for d, b in zip(on_dims, self._bias())]
        on = {k for k, g in enumerate(genes) if g > 0}
        low, high = self.depth
        ranked = sorted(range(len(genes)), key=lambda k: (-genes[k], k))  # highest genes first, then slot order
        if len(on) > high:
            on = set(sorted(on, key=lambda k: (-genes[k], k))[:high])
        for k in ranked:
            if len(on) >= low:
                break
            on.add(k)
        scale = {k: float(params[d.name]) for k, d in zip(self.scaled, self.dims[METHOD][len(self.slots) :])}
        return [(*self.slots[k], scale.get(k, 1.0)) for k in sorted(on)]

    def source_recipe(self, ref: str) -> dict[str, Any]:
        """A source model alone, as a stack (what a stack worker can evaluate)."""
        return stack_recipe([(ref, i) for i in range(self.n_layers[ref])], self.dtype).to_dict()


def _layer(entry: tuple) -> Layer:
    return (entry[0], entry[1], float(entry[2]) if len(entry) > 2 else 1.0)


def runs_of(stack: list[tuple]) -> list[tuple[str, int, int, float]]:
    """Runs of consecutive layers of one model at one scale: (model, start, end, scale)."""
    runs: list[list[Any]] = []
    for model, layer, scale in map(_layer, stack):
        if runs and runs[-1][0] == model and runs[-1][2] == layer and runs[-1][3] == scale:
            runs[-1][2] = layer + 1
        else:
            runs.append([model, layer, layer + 1, scale])
    return [(m, a, b, s) for m, a, b, s in runs]


def _scale_param(scale: float) -> list[dict[str, Any]]:
    """mergekit's passthrough ``scale``: the residual projections times ``scale``, the rest as they are."""
    return [*({"filter": name, "value": scale} for name in RESIDUAL), {"value": 1.0}]


def stack_recipe(stack: list[tuple], dtype: str, paths: dict[str, str] | None = None) -> Recipe:
    """mergekit ``slices:`` for a stack of (model, layer) or (model, layer, scale):
    each run of consecutive layers of one model at one scale is one slice."""
    name = (paths or {}).get
    slices = []
    for m, a, b, scale in runs_of(stack):
        source: dict[str, Any] = {"model": name(m, m), "layer_range": [a, b]}
        if scale != 1.0:
            source["parameters"] = {"scale": _scale_param(scale)}
        slices.append({"sources": [source]})
    return Recipe.from_dict({"merge_method": METHOD, "dtype": dtype, "slices": slices}, "layer stack")


def stack_of(recipe: Recipe) -> list[Layer] | None:
    """The (model, layer, scale) stack of a pure passthrough ``slices:`` recipe (a source
    may carry only the residual ``scale`` that :func:`stack_recipe` writes), else None."""
    if recipe.merge_method != METHOD or not recipe.slices or recipe.parameters:
        return None
    out: list[Layer] = []
    for piece in recipe.slices:
        if len(piece.sources) != 1 or piece.parameters:
            return None
        src = piece.sources[0]
        scale = _residual_scale(src.parameters or {})
        if scale is None:
            return None
        out += [(src.model, i, scale) for i in range(src.layer_range[0], src.layer_range[1])]
    return out


def _residual_scale(params: dict[str, Any]) -> float | None:
    """The scale of a source whose parameters are nothing but :func:`stack_recipe`'s
    residual scale (1.0 without parameters), else None."""
    if not params:
        return 1.0
    value = params.get("scale")
    if set(params) != {"scale"} or not isinstance(value, list) or not value:
        return None
    entries = [(v.filter, v.value) if isinstance(v, FilterValue) else (None, v) for v in value]
    scale = entries[0][1]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return None
    return float(scale) if entries == [*((name, scale) for name in RESIDUAL), (None, 1.0)] else None
