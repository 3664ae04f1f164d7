"""A fitness definition and its evaluation on a resident model.

A fitness names tasks with weights, the split, how many samples, the aggregation
(weighted mean, min, or one objective per task for Pareto search) and the backend
(native scorer or lm-eval). Samples are picked once per evaluator from a seeded
permutation, so every candidate is scored on the same items; per-sample results
are kept so that a later stage can prune on a subset.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.fitness.data import read_jsonl
from evomerge.fitness.lmeval import LmEvalTask
from evomerge.fitness.tasks import Item

Split = Literal["search", "validation", "test"]
SPLITS: tuple[str, ...] = ("search", "validation", "test")


class TaskSpec(BaseModel):
    """One task of a fitness: a zoo task by its name, JSONL files per split, or an lm-eval task."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0.0)
    data: dict[str, str] | None = None
    lm_eval: str | None = None
    metric: str = "acc"

    @field_validator("data")
    @classmethod
    def _splits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            unknown = set(value) - set(SPLITS)
            if unknown:
                raise ValueError(f"unknown split(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
        return value


class FitnessConfig(BaseModel):
    """What a candidate is scored on."""

    model_config = ConfigDict(extra="forbid")
    tasks: dict[str, TaskSpec]
    split: Split = "search"
    samples: int | None = Field(None, ge=1)
    aggregate: Literal["mean", "min", "pareto"] = "mean"
    backend: Literal["native", "lm-eval"] = "native"
    batch_size: int = Field(160, ge=1)
    # irt: a search scores each candidate on ``anchors`` items per task and estimates its
    # accuracy over all the samples with item response theory (evomerge.fitness.irt),
    # calibrated on the sources, the base and ``calibration_merges`` random merges
    estimator: Literal["full", "irt"] = "full"
    anchors: int | None = Field(None, ge=1)
    calibration_merges: int = Field(4, ge=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {k: ({"weight": v} if isinstance(v, (int, float)) else (v or {})) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _weights(self) -> FitnessConfig:
        if not self.tasks:
            raise ValueError("fitness.tasks is empty")
        if self.aggregate == "mean" and sum(t.weight for t in self.tasks.values()) <= 0:
            raise ValueError("fitness.tasks weights sum to 0")
        if self.estimator == "irt" and self.anchors is None:
            raise ValueError("fitness.estimator irt needs anchors: the items scored per task (10-50)")
        if self.estimator == "full" and self.anchors is not None:
            raise ValueError("fitness.anchors is set but fitness.estimator is full; set estimator: irt")
        if self.anchors is not None and self.samples is not None and self.anchors >= self.samples:
            raise ValueError(f"fitness.anchors ({self.anchors}) must be fewer than fitness.samples ({self.samples})")
        return self

    @property
    def objectives(self) -> list[str]:
        """Names of the objectives: one per task for Pareto search, else one."""
        return list(self.tasks) if self.aggregate == "pareto" else ["fitness"]


@dataclass
class FitnessResult:
    fitness: float
    tasks: dict[str, float]
    per_sample: dict[str, list[bool]]
    seconds: float
    values: list[float] = field(default_factory=list)  # one per objective
    reused: int = 0  # per-sample results taken from an earlier, lower-fidelity evaluation

    @property
    def samples(self) -> int:
        """Samples scored by this evaluation (not counting reused ones)."""
        return sum(len(v) for v in self.per_sample.values()) - self.reused

    def to_json(self) -> dict[str, Any]:
        return {"fitness": self.fitness, "tasks": self.tasks, "seconds": round(self.seconds, 4)}


def aggregate(cfg: FitnessConfig, accs: dict[str, float]) -> tuple[float, list[float]]:
    """The scalar fitness and the objective values of per-task accuracies."""
    weights = {n: t.weight for n, t in cfg.tasks.items()}
    if cfg.aggregate == "min":
        value = min(accs.values())
    else:
        total = sum(weights.values()) or 1.0
        value = sum(weights[n] * a for n, a in accs.items()) / total
    values = [accs[n] for n in cfg.tasks] if cfg.aggregate == "pareto" else [value]
    return value, values


class Evaluator:
    """Scores resident models on a fitness; items are loaded and encoded once."""

    def __init__(
        self,
        cfg: FitnessConfig,
        *,
        zoo_root: Path | None = None,
        base_dir: Path | None = None,
        seed: int = 0,
        split: str | None = None,
        backend: str | None = None,
        files_root: Path | None = None,
    ):
        """``files_root``: where the files this fitness reads were shipped to on this
        machine (:func:`evomerge.shipping.mirrored` maps each path under it), else read in place."""
        self.cfg = cfg
        self.files_root = files_root
        self.split = split or cfg.split
        self.backend = backend or cfg.backend
        self.zoo_root = zoo_root
        self.base_dir = base_dir or Path.cwd()
        self.seed = seed
        self._zoo: dict | None = None
        self.items: dict[str, list[Item]] = {}
        self.lm_tasks: dict[str, LmEvalTask] = {}
        self.order: dict[str, list[int]] = {}
        for name, spec in cfg.tasks.items():
            self._resolve(name, spec)
        self._encoded: dict[str, Any] = {}
        self._encoded_for: int | None = None

    # ---- task resolution ------------------------------------------------
    def _zoo_manifest(self) -> dict | None:
        if self._zoo is None and self.zoo_root is not None:
            from evomerge.fitness.zoo import load_zoo

            self._zoo = load_zoo(self._local(self.zoo_root))
        return self._zoo

    def _local(self, path: Path) -> Path:
        """Where ``path`` (absolute, as the config resolves it) is read on this machine."""
        if self.files_root is None:
            return path
        from evomerge.shipping import mirrored

        return mirrored(self.files_root, path)

    def _path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return self._local(path if path.is_absolute() else self.base_dir / path)

    def _resolve(self, name: str, spec: TaskSpec) -> None:
        zoo = self._zoo_manifest()
        zoo_task = zoo["tasks"].get(name) if zoo else None
        if self.backend == "lm-eval":
            task = spec.lm_eval or (str(self.zoo_root / zoo_task["lm_eval"]) if zoo_task and self.zoo_root else None)
            if task is None:
                raise EvomergeError(f"fitness.tasks.{name}: no lm_eval task given and '{name}' is not a zoo task")
            local = str(self._path(task)) if task.endswith((".yaml", ".yml")) else task
            lm = LmEvalTask(local, spec.metric, self.files_root)
            self.lm_tasks[name] = lm
            if spec.data or zoo_task:
                n = len(self._native_items(name, spec, zoo_task))
            else:
                n = self._lm_eval_size(lm)
            self.order[name] = self._pick(name, n)
            return
        self.items[name] = self._native_items(name, spec, zoo_task)
        self.order[name] = self._pick(name, len(self.items[name]))

    def _native_items(self, name: str, spec: TaskSpec, zoo_task: dict | None) -> list[Item]:
        if spec.data is not None:
            if self.split not in spec.data:
                raise EvomergeError(f"fitness.tasks.{name}.data has no '{self.split}' split")
            return read_jsonl(self._path(spec.data[self.split]))
        if zoo_task is not None and self.zoo_root is not None:
            return read_jsonl(self._local(self.zoo_root / zoo_task[self.split]))
        raise EvomergeError(
            f"fitness.tasks.{name}: not a zoo task and no data: files given (the native backend needs JSONL data)"
        )

    def _lm_eval_size(self, lm: LmEvalTask) -> int:
        from evomerge.fitness.lmeval import document_count

        return document_count(lm, self.split)

    def _pick(self, name: str, n: int) -> list[int]:
        """A seeded permutation of the split (its first ``samples`` entries when set)."""
        order = list(range(n))
        random.Random(f"{self.seed}:{name}:{self.split}").shuffle(order)
        return order[: self.cfg.samples] if self.cfg.samples else order

    # ---- scoring ----------------------------------------------------------
    def evaluate(
        self,
        model,
        tokenizer,
        *,
        fraction: float = 1.0,
        prior: dict[str, list[bool]] | None = None,
        items: dict[str, list[int]] | None = None,
    ) -> FitnessResult:
        """Score ``model`` on every task (the first ``fraction`` of each task's samples).

        ``prior``: this model's per-sample results on a smaller fraction (an earlier
        fidelity of the same candidate); those samples are not scored again, only the
        ones beyond them, and the fitness is computed over all of them together.
        ``items``: score only these positions of each task's samples (an estimator's
        anchors, in that order; ``fraction`` then takes the first part of them).
        """
        start = time.perf_counter()
        prior = prior or {}
        names = list(self.lm_tasks) if self.backend == "lm-eval" else list(self.items)
        heads = {n: self._head(n, fraction, (items or {}).get(n)) for n in names}
        done = {n: list(prior.get(n, []))[: len(heads[n])] for n in names}
        todo: dict[str, Sequence[int]] = {n: heads[n][len(done[n]) :] for n in names}
        new: dict[str, list[bool]] = {}
        if self.backend == "lm-eval":
            from evomerge.fitness.lmeval import LmEvalScorer

            wanted = {n: t for n, t in self.lm_tasks.items() if todo[n]}
            if wanted:
                docs: dict[str, Sequence[int]] = {n: [self.order[n][p] for p in todo[n]] for n in wanted}
                scores = LmEvalScorer(model, tokenizer, batch_size=self.cfg.batch_size).score(wanted, self.split, docs)
                new = {n: [s >= 0.5 for s in v] for n, v in scores.items()}
        else:
            from evomerge.fitness.native import score

            for name in names:
                enc = self._encode(name, tokenizer).subset(todo[name])
                new[name] = score(model, enc, batch_size=self.cfg.batch_size).tolist() if todo[name] else []
        per_sample = {n: done[n] + new.get(n, []) for n in names}
        accs = {n: (sum(v) / len(v) if v else 0.0) for n, v in per_sample.items()}
        value, values = aggregate(self.cfg, accs)
        reused = sum(len(v) for v in done.values())
        return FitnessResult(value, accs, per_sample, time.perf_counter() - start, values, reused)

    def _head(self, name: str, fraction: float, items: list[int] | None = None) -> list[int]:
        """The positions (in the task's sample order) that ``fraction`` of its samples, or
        of ``items`` when given, takes."""
        positions = list(range(len(self.order[name]))) if items is None else items
        if any(not 0 <= p < len(self.order[name]) for p in positions):
            raise EvomergeError(f"fitness.tasks.{name}: an item position beyond its {len(self.order[name])} samples")
        return positions[: max(1, round(len(positions) * fraction))]

    def batch_shape(self, tokenizer) -> tuple[int, int, int] | None:
        """The largest native scoring batch: (items, tokens of the longest item, answer
        tokens of the longest answer), each the most over the tasks; None for lm-eval."""
        if self.backend != "native":
            return None
        shapes = []
        for name in self.items:
            enc = self._encode(name, tokenizer)
            answers = int((enc.target >= 0).sum(dim=1).max()) if len(enc) else 0
            shapes.append((min(self.cfg.batch_size, len(enc)), int(enc.ids.shape[1]), answers))
        return tuple(max(dim) for dim in zip(*shapes)) if shapes else None  # type: ignore[return-value]

    def prepare(self, tokenizer) -> None:
        """Encode every task's samples now (otherwise the first evaluation does it)."""
        if self.backend == "native":
            for name in self.items:
                self._encode(name, tokenizer)

    def _encode(self, name: str, tokenizer):
        from evomerge.fitness.native import encode

        if self._encoded_for != id(tokenizer):
            self._encoded, self._encoded_for = {}, id(tokenizer)
        if name not in self._encoded:
            self._encoded[name] = encode(tokenizer, [self.items[name][i] for i in self.order[name]])
        return self._encoded[name]


def fitness_files(cfg: FitnessConfig, *, zoo_root: Path | None, base_dir: Path) -> list[Path]:
    """Every file an :class:`Evaluator` of ``cfg`` may read, on any split (absolute paths,
    as the config resolves them): what a worker on another machine needs shipped. Data
    files, and for an lm-eval task YAML its folder's YAML files (lm-eval indexes them for
    ``include``) and the local ``data_files`` it names; a zoo's manifest and task files.
    An lm-eval task given by name is lm-eval's own (installed with it) and ships nothing."""
    from evomerge.fitness.lmeval import local_files

    def path(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    zoo = None
    if zoo_root is not None and (zoo_root / "zoo.json").is_file():
        from evomerge.fitness.zoo import load_zoo

        zoo = load_zoo(zoo_root)
    out: list[Path] = [zoo_root / "zoo.json"] if zoo is not None and zoo_root is not None else []
    for name, spec in cfg.tasks.items():
        out += [path(p) for p in (spec.data or {}).values()]
        zoo_task = zoo["tasks"].get(name) if zoo is not None else None
        yaml_task = spec.lm_eval if spec.lm_eval and spec.lm_eval.endswith((".yaml", ".yml")) else None
        if zoo_task is not None and zoo_root is not None:
            out += [zoo_root / zoo_task[s] for s in SPLITS if s in zoo_task]
            if yaml_task is None and "lm_eval" in zoo_task:
                yaml_task = str(zoo_root / zoo_task["lm_eval"])
        if yaml_task is not None:
            out += local_files(path(yaml_task))
    return list(dict.fromkeys(out))
