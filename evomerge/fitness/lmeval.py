"""Scoring a resident model on lm-evaluation-harness tasks, fully offline.

The model object is wrapped in ``HFLM(pretrained=model, tokenizer=tok)``; tasks
are names of lm-eval tasks or YAML files (their folders go on ``include_path``,
and the built-in tasks are not indexed unless a task needs them). Documents
are picked by explicit indices (lm-eval's ``samples``), never ``limit``, which
takes the first N; bootstrap is off. Returns per-document results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class LmEvalTask:
    """An lm-eval task: a YAML file or a registered task name, and the metric to read."""

    task: str
    metric: str = "acc"
    # where the driver's files were shipped to on this machine (evomerge.shipping): the
    # YAML's absolute local data_files are read there
    files_root: Path | None = None

    @property
    def yaml_path(self) -> Path | None:
        return Path(self.task) if self.task.endswith((".yaml", ".yml")) else None


def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task_config(spec: LmEvalTask, split: str) -> dict | str:
    """A YAML task as a config dict with ``test_split`` set to ``split``; a name as is."""
    path = spec.yaml_path
    if path is None:
        return spec.task
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EvomergeError(f"{path}: cannot read lm-eval task YAML: {err}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise EvomergeError(f"{path}: an lm-eval task YAML needs a 'task' field")
    cfg = dict(cfg)
    cfg["test_split"] = split
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:  # local files: relative to the YAML, not the cwd
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _beside(path.parent, kwargs["data_files"], spec.files_root)}
    return cfg


def _beside(folder: Path, files, root: Path | None = None):
    """``data_files`` (a path, a list, or a mapping of splits to either) with relative
    local paths made absolute against ``folder``; absolute ones mirrored under ``root``
    when given (shipped from the driver), else unchanged; URLs unchanged."""
    if isinstance(files, dict):
        return {k: _beside(folder, v, root) for k, v in files.items()}
    if isinstance(files, list):
        return [_beside(folder, v, root) for v in files]
    if isinstance(files, str) and "://" not in files:
        path = Path(files).expanduser()
        if not path.is_absolute():
            return str((folder / files).resolve())
        if root is not None:
            from evomerge.shipping import mirrored

            return str(mirrored(root, path))
    return files


def local_files(path: Path) -> list[Path]:
    """The files a task YAML at ``path`` reads on this machine: the YAML files of its folder
    (lm-eval indexes the folder, for ``include``) and the local ``data_files`` of each
    (relative ones beside the YAML); URLs and Hub data sets are not files."""
    import yaml

    out: list[Path] = []
    folder = path.parent
    yamls = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml")) if folder.is_dir() else []
    for file in dict.fromkeys([path, *yamls]):
        out.append(file)
        try:
            cfg = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError):
            continue  # named by whoever loads it
        kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            out += [Path(f) for f in _flatten(_beside(file.parent, kwargs["data_files"])) if "://" not in f]
    return out


def _flatten(files) -> list[str]:
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flatten(v)]
    if isinstance(files, list):
        return [f for v in files for f in _flatten(v)]
    return [files] if isinstance(files, str) else []


def document_count(spec: LmEvalTask, split: str) -> int:
    """How many documents ``split`` of a task holds: the lines of a local JSON(L) data
    file when the YAML names one for that split, else what lm-eval loads."""
    config = _task_config(spec, split)
    if isinstance(config, dict) and config.get("dataset_path") == "json":
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        file = files.get(split) if isinstance(files, dict) else None
        if isinstance(file, str) and "://" not in file:
            try:
                with open(file, encoding="utf-8") as fh:
                    return sum(1 for line in fh if line.strip())
            except OSError as err:
                raise EvomergeError(f"{spec.task}: data file for split '{split}': {err.strerror}: {file}") from None
    _offline()
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = str(spec.yaml_path.parent) if spec.yaml_path is not None else None
    manager = TaskManager(include_path=folder, include_defaults=spec.yaml_path is None)
    try:
        task = next(iter(get_task_dict([config], manager).values()))
        return len(list(task.eval_docs))
    except Exception as err:  # lm-eval raises many kinds for unknown or broken tasks
        raise EvomergeError(f"lm-eval task '{spec.task}': cannot count its '{split}' documents: {err}") from None


class LmEvalScorer:
    """Per-document scores of a resident model on lm-eval tasks."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        _offline()
        from lm_eval.models.huggingface import HFLM

        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def score(
        self, specs: dict[str, LmEvalTask], split: str, indices: dict[str, Sequence[int]]
    ) -> dict[str, list[float]]:
        """For each named task, the metric of each document in ``indices[name]`` (in that order)."""
        from lm_eval.evaluator import evaluate
        from lm_eval.tasks import TaskManager, get_task_dict

        needs_builtin = any(s.yaml_path is None for s in specs.values())
        includes = sorted({str(s.yaml_path.parent) for s in specs.values() if s.yaml_path is not None})
        manager = TaskManager(include_path=includes or None, include_defaults=needs_builtin)
        configs = [_task_config(s, split) for s in specs.values()]
        try:
            task_dict = get_task_dict(configs, manager)
        except Exception as err:  # lm-eval raises many kinds for unknown or broken tasks
            raise EvomergeError(f"lm-eval could not load tasks {list(specs)}: {str(err).splitlines()[0]}") from None
        lm_names = {name: self._task_name(cfg) for name, cfg in zip(specs, configs)}
        # lm-eval 0.4.13 walks the selected documents in index order but labels them with
        # doc_ids in the order given: pass sorted indices so that the labels are right.
        samples = {lm_names[n]: sorted(set(map(int, idx))) for n, idx in indices.items()}
        results = evaluate(self.lm, task_dict, samples=samples, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        if results is None:
            raise EvomergeError("lm-eval returned no results")
        out: dict[str, list[float]] = {}
        for name, spec in specs.items():
            rows = {int(r["doc_id"]): float(r[spec.metric]) for r in results["samples"][lm_names[name]]}
            out[name] = [rows[int(i)] for i in indices[name]]
        return out

    @staticmethod
    def _task_name(cfg: dict | str) -> str:
        return cfg["task"] if isinstance(cfg, dict) else cfg
