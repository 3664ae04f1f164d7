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
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvomergeError
from evomerge.operators.recipe import Recipe
from evomerge.search.space import Dim

METHOD = "passthrough"
BIAS = 0.7


class StackSpace:
    """Genes over the slots; a point becomes a passthrough recipe of ``slices:``."""

    def __init__(
        self, models: list[str], n_layers: dict[str, int], *, repeats: int, depth: tuple[int, int], dtype: str
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
        self.dims = {
            METHOD: [Dim(f"slot[{k}]:{m}:{i}", METHOD, "on", 0.0, 1.0, False, m) for k, (m, i) in enumerate(self.slots)]
        }

    def label(self, model: str) -> str:
        """A short name for a model: ``zoo:add`` as it is, a path by its last component
        (with its position when two share one)."""
        short = model.rstrip("/").rsplit("/", 1)[-1]
        clash = sum(m.rstrip("/").rsplit("/", 1)[-1] == short for m in self.models) > 1
        return f"{short}#{self.models.index(model)}" if clash else short

    # ---- the interface the loop and the run use ------------------------------
    def sample(self, trial) -> dict[str, Any]:
        return {d.name: trial.suggest_float(d.name, -1.0, 1.0) for d in self.dims[METHOD]}

    def complete(self, params: dict[str, Any]) -> bool:
        return all(d.name in params for d in self.dims[METHOD])

    def default_params(self, method: str | None = None) -> dict[str, Any]:
        """The centre of the cube: the first model as it is."""
        return {d.name: 0.0 for d in self.dims[METHOD]}

    def _bias(self) -> list[float]:
        first = self.models[0]
        return [BIAS if m == first and k < self.n_layers[first] else -BIAS for k, (m, _) in enumerate(self.slots)]

    def stack(self, params: dict[str, Any]) -> list[tuple[str, int]]:
        """The (model, layer) stack of a point, its depth repaired into the bounds."""
        genes = [float(params[d.name]) + b for d, b in zip(self.dims[METHOD], self._bias())]
        on = {k for k, g in enumerate(genes) if g > 0}
        low, high = self.depth
        ranked = sorted(range(len(genes)), key=lambda k: (-genes[k], k))  # highest genes first, then slot order
        if len(on) > high:
            on = set(sorted(on, key=lambda k: (-genes[k], k))[:high])
        for k in ranked:
            if len(on) >= low:
                break
            on.add(k)
        return [self.slots[k] for k in sorted(on)]

    def recipe(self, params: dict[str, Any], paths: dict[str, str] | None = None) -> Recipe:
        return stack_recipe(self.stack(params), self.dtype, paths)

    def source_recipe(self, ref: str) -> dict[str, Any]:
        """A source model alone, as a stack (what a stack worker can evaluate)."""
        return stack_recipe([(ref, i) for i in range(self.n_layers[ref])], self.dtype).to_dict()


def runs_of(stack: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers of one model: (model, start, end)."""
    runs: list[list[Any]] = []
    for model, layer in stack:
        if runs and runs[-1][0] == model and runs[-1][2] == layer:
            runs[-1][2] = layer + 1
        else:
            runs.append([model, layer, layer + 1])
    return [(m, a, b) for m, a, b in runs]


def stack_recipe(stack: list[tuple[str, int]], dtype: str, paths: dict[str, str] | None = None) -> Recipe:
    """mergekit ``slices:`` for a stack: each run of consecutive layers of one model is one slice."""
    name = (paths or {}).get
    slices = [{"sources": [{"model": name(m, m), "layer_range": [a, b]}]} for m, a, b in runs_of(stack)]
    return Recipe.from_dict({"merge_method": METHOD, "dtype": dtype, "slices": slices}, "layer stack")


def stack_of(recipe: Recipe) -> list[tuple[str, int]] | None:
    """The (model, layer) stack of a pure passthrough ``slices:`` recipe, else None."""
    if recipe.merge_method != METHOD or not recipe.slices:
        return None
    out: list[tuple[str, int]] = []
    for piece in recipe.slices:
        if len(piece.sources) != 1:
            return None
        src = piece.sources[0]
        out += [(src.model, i) for i in range(src.layer_range[0], src.layer_range[1])]
    return out
