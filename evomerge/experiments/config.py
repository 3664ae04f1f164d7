"""The experiment config: one YAML file, read into pydantic models.

Sections: ``name``, ``zoo`` (where the demo zoo lives, when a model is named
``zoo:<name>``), ``models`` and ``base_model``, ``merge`` (the method(s) and
which operator parameters to search), ``fitness``, ``search`` (sampler, seed,
budget, pruning) and the execution (``workers``, ``device``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import FitnessConfig
from evomerge.operators.hub import parse_hub_id, resolve_hub_id
from evomerge.operators.moe_config import PROMPTLESS, GateMode
from evomerge.operators.recipe import load_yaml
from evomerge.search.merge_space import Bounds, MergeSpace

ZOO_PREFIX = "zoo:"


class LayerStack(BaseModel):
    """Search which layers of which models are stacked, in order (data-flow merging):
    the models' layers laid out in order, ``repeats`` times, one on/off gene per slot.
    The stack's depth stays within [min_layers, max_layers] (default: the first
    model's depth up to twice it)."""

    model_config = ConfigDict(extra="forbid")
    repeats: int = Field(2, ge=1, le=8)
    min_layers: int | None = Field(None, ge=1)
    max_layers: int | None = Field(None, ge=1)
    # The residual scale of each layer added to the starting stack, searched in this
    # range (its o_proj and down_proj times s; mergekit's passthrough scale). None: 1.
    scale: Bounds | None = None

    @model_validator(mode="after")
    def _depth(self) -> LayerStack:
        if self.min_layers is not None and self.max_layers is not None and self.min_layers > self.max_layers:
            raise ValueError(f"min_layers ({self.min_layers}) is above max_layers ({self.max_layers})")
        if self.scale is not None and (self.scale.low is None or self.scale.high is None or self.scale.low < 0):
            raise ValueError("scale: give a range {low, high} with 0 <= low < high")
        return self


class MoESearch(BaseModel):
    """Search a Mixtral mixture of experts on ``base_model`` (mergekit-moe): which of the
    ``models`` become experts (at least ``min_experts``), how many experts each token
    takes, and each expert's router scale within ``gate_scale`` (log scale). The routers
    start from each model's ``prompts`` (and ``negative_prompts``) by ``gate_mode``."""

    model_config = ConfigDict(extra="forbid")
    gate_mode: GateMode = "cheap_embed"
    prompts: dict[str, list[str]] = Field(default_factory=dict)
    negative_prompts: dict[str, list[str]] = Field(default_factory=dict)
    min_experts: int = Field(2, ge=1)
    gate_scale: Bounds = Field(default_factory=lambda: Bounds(low=0.25, high=4.0))

    @model_validator(mode="after")
    def _scale(self) -> MoESearch:
        if self.gate_scale.low is None or self.gate_scale.high is None or self.gate_scale.low <= 0:
            raise ValueError("gate_scale: give a range {low, high} with 0 < low < high")
        return self


class Pruning(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    # defaults measured in BENCHMARKS.md ("Multi-fidelity pruning"): 3-5x fewer samples
    fractions: list[float] = Field(default_factory=lambda: [0.0625, 0.25, 1.0])
    pruner: Literal["median", "successive_halving"] = "successive_halving"
    reduction_factor: int = Field(4, ge=2)  # successive halving: the top 1/r goes on at each rung

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value) or value != sorted(value) or value[-1] != 1.0:
            raise ValueError("fractions must rise within (0, 1] and end at 1.0")
        return value


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["cmaes", "tpe", "nsgaii", "random"] = "cmaes"
    seed: int = 0
    trials: int | None = Field(60, ge=1)
    timeout_minutes: float | None = Field(None, gt=0)
    population: int | None = Field(None, ge=2)
    trial_timeout_s: float = Field(600.0, gt=0)
    rerank_top: int = Field(5, ge=1)
    pruning: Pruning = Field(default_factory=Pruning)

    @model_validator(mode="after")
    def _budget(self) -> SearchConfig:
        if self.trials is None and self.timeout_minutes is None:
            raise ValueError("give a budget: trials, timeout_minutes, or both")
        return self


class TrackingConfig(BaseModel):
    """What MLflow records beyond the trials."""

    model_config = ConfigDict(extra="forbid")
    # each worker's CPU, memory, disk, network and (with pynvml) GPU use, through MLflow's own
    # system-metrics monitor, into a child run of the search per worker
    system_metrics: bool = False
    interval_s: float = Field(10.0, gt=0)  # seconds between samples


class ExperimentConfig(BaseModel):
    """A merge-search experiment."""

    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    zoo: str | None = None
    zoo_preset: Literal["demo", "smollm2"] = "demo"  # the zoo that zoo:<name> refers to when zoo is not given
    models: list[str] = Field(min_length=1)
    base_model: str | None = None
    merge: MergeSpace = Field(default_factory=MergeSpace)
    layers: LayerStack | None = None
    moe: MoESearch | None = None
    fitness: FitnessConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # how many workers run at once; auto: as many as the nodes' GPUs hold (one per
    # gpus_per_worker), on CPUs one per node (evomerge.search.placement)
    workers: int | Literal["auto"] = Field(1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_worker: int | None = Field(None, ge=1)
    # GPUs of one node each worker holds: the resident model's layers split over them
    gpus_per_worker: int = Field(1, ge=1)
    # where each worker keeps its sources: on its device, streamed from host memory, or
    # auto (resident when that fits device_memory_gib); see evomerge.search.memory
    placement: Literal["auto", "resident", "streamed"] = "auto"
    device_memory_gib: float | None = Field(None, gt=0)  # per worker; default: free memory at start
    # how long the workers may take to start (placed by Ray, sources loaded) before the run stops
    worker_start_timeout_s: float = Field(900.0, gt=0)
    # where a Ray worker reads the source models: node, the driver's path where the node has
    # it (shared storage) or the model's Hub id through the node's Hub cache; driver, copied
    # from the driver through Ray's object store (small models, nodes without shared storage)
    models_from: Literal["node", "driver"] = "node"

    # set by load(): the directory relative paths are resolved against
    source_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\") or value.startswith("."):
            raise ValueError(f"name '{value}' must be a plain name (no slashes)")
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"workers: {value}; a number of workers is at least 1, or auto")
        return value

    @model_validator(mode="after")
    def _stack_rules(self) -> ExperimentConfig:
        if self.layers is None:
            return self
        if self.base_model:
            raise ValueError("layers: a layer-stack search takes no base_model (list every model under models)")
        if self.merge.parameters or self.merge.methods not in (["task_arithmetic"], ["passthrough"]):
            raise ValueError(
                "layers: a layer-stack search searches no merge method or parameters; for a hybrid, "
                "run the weight search first and list its export under models"
            )
        return self

    @model_validator(mode="after")
    def _moe_rules(self) -> ExperimentConfig:
        moe = self.moe
        if moe is None:
            return self
        if not self.base_model or self.layers is not None:
            raise ValueError("moe: a mixture-of-experts search needs a base_model and no layers section")
        if self.merge.parameters or self.merge.methods != ["task_arithmetic"]:
            raise ValueError("moe: a mixture-of-experts search searches no merge method or parameters")
        if moe.min_experts > len(self.models):
            raise ValueError(f"moe.min_experts: {moe.min_experts} is more than the {len(self.models)} models")
        for field in ("prompts", "negative_prompts"):
            stray = sorted(set(getattr(moe, field)) - set(self.models))
            if stray:
                raise ValueError(f"moe.{field}: '{stray[0]}' is not one of the models")
        if moe.gate_mode not in PROMPTLESS:
            missing = [m for m in self.models if not moe.prompts.get(m)]
            if missing:
                raise ValueError(f"moe.prompts: gate_mode {moe.gate_mode} needs prompts for '{missing[0]}'")
            if len(self.models) > 1 and len({tuple(moe.prompts[m]) for m in self.models}) == 1:
                raise ValueError("moe.prompts: every model has the same prompts; the routers could not tell them apart")
        return self

    @model_validator(mode="after")
    def _tokenizer_source(self) -> ExperimentConfig:
        source = self.merge.tokenizer_source
        if source is not None and source not in ("base", "union", *self.models, self.base_model):
            raise ValueError(f"merge.tokenizer_source '{source}' is not 'base', 'union' or one of the models")
        return self

    def uses_zoo(self) -> bool:
        refs = [*self.models, self.base_model or ""]
        return any(r.startswith(ZOO_PREFIX) for r in refs) or self.zoo is not None

    def zoo_dir(self) -> Path | None:
        if not self.uses_zoo():
            return None
        from evomerge.fitness.presets import preset_dir

        return self.resolve_path(self.zoo) if self.zoo else preset_dir(self.zoo_preset)

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.source_dir / p).resolve()

    def resolve_model(self, ref: str) -> Path:
        """A model reference as a directory: ``zoo:<name>`` or a path (relative to the config)."""
        if ref.startswith(ZOO_PREFIX):
            from evomerge.fitness.zoo import load_zoo

            zoo = self.zoo_dir()
            assert zoo is not None
            name = ref[len(ZOO_PREFIX) :]
            models = load_zoo(zoo)["models"]
            if name not in models:
                raise EvomergeError(f"models: '{ref}' is not in the zoo at {zoo} (it has {', '.join(models)})")
            return zoo / models[name]["path"]
        path = self.resolve_path(ref)
        hub = None if path.exists() else parse_hub_id(ref)
        return resolve_hub_id(hub) if hub is not None else path

    def resolved(self) -> ExperimentConfig:
        """A copy with every relative path made absolute (what a run directory records)."""

        def path(ref: str | None) -> str | None:
            if ref is None or ref.startswith(ZOO_PREFIX):
                return ref
            return str(self.resolve_path(ref))

        def model(ref: str | None) -> str | None:
            if ref is None or ref.startswith(ZOO_PREFIX) or self.resolve_path(ref).exists() or not parse_hub_id(ref):
                return path(ref)
            return ref  # a Hub id stays one

        data = self.model_dump(mode="json")
        data["models"] = [model(m) for m in self.models]
        data["base_model"] = model(self.base_model)
        data["zoo"] = path(self.zoo)
        for spec in data["fitness"]["tasks"].values():
            if spec.get("data"):
                spec["data"] = {k: path(v) for k, v in spec["data"].items()}
            if spec.get("lm_eval", "") and spec["lm_eval"].endswith((".yaml", ".yml")):
                spec["lm_eval"] = path(spec["lm_eval"])
        out = ExperimentConfig.model_validate(data)
        out.source_dir = self.source_dir
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment config; errors name the file and the field."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise EvomergeError(f"{p}: an experiment config must be a YAML mapping")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise EvomergeError(f"{p}: {loc}: {first['msg'].removeprefix('Value error, ')}") from None
    cfg.source_dir = p.resolve().parent
    return cfg
