"""Export a trial of a run as a Hugging Face model directory.

The merge goes through the streaming engine with the trial's own random stream, so
the exported tensors are the ones that were scored. Before the directory takes its
final name, its test fitness is known (from the run's final scoring, or measured on
the directory itself), the model card gains the search and test figures, and
``evomerge.json`` records the lineage: the parents with paths, content hashes and
licences, the method, the experiment and the trial. Then a version of the registered
model named after the experiment is created in the MLflow model registry, tagged with
that lineage and those figures (``evomerge leaderboard`` reads them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig, load_config
from evomerge.experiments.lineage import LINEAGE_FILE
from evomerge.experiments.rundir import RunDir, write_json
from evomerge.operators.engine import MergeResult
from evomerge.operators.hub import hub_fields, portable_ref
from evomerge.operators.outputs import license_of


@dataclass
class Exported:
    merge: MergeResult
    trial: int
    record: dict[str, Any]  # the contents of evomerge.json
    registered: tuple[str, str] | None = None  # (registered model, version)


def export_trial(
    path: Path,
    out: Path,
    *,
    trial: int | None = None,
    device: str = "cpu",
    force: bool = False,
    register: bool = True,
    tracking_uri: str | None = None,
) -> Exported:
    """Materialise the best (or the given) trial of a run as a Hugging Face model directory."""
    import optuna

    from evomerge.experiments.run import prepare, recipe_with_paths
    from evomerge.experiments.tracking import model_hash
    from evomerge.operators.engine import run_merge, tensor_seed
    from evomerge.operators.moe import run_moe
    from evomerge.operators.moe_config import MoEConfig, candidate
    from evomerge.search.loop import origin_of, trial_seed
    from evomerge.search.placement import Placement

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = RunDir(path)
    if not run.config.is_file():
        raise EvomergeError(f"{path}: not a run directory (no config.yaml)")
    cfg = load_config(run.config)
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    number = trial if trial is not None else summary.get("best_trial")
    if number is None:
        raise EvomergeError(f"{path}: no finished search (no summary.json); name a trial with --trial")
    study = optuna.load_study(study_name=cfg.name, storage=run.storage)
    if not 0 <= number < len(study.trials) or study.trials[number].state.name != "COMPLETE":
        raise EvomergeError(f"{path}: trial {number} is not a complete trial of this run")
    frozen = study.trials[number]
    if register:  # a store that cannot take the registration is refused before anything is written
        from evomerge.experiments.tracking import open_client
        from evomerge.experiments.tracking import tracking_uri as resolve_uri

        open_client(resolve_uri(tracking_uri))
    # the dtype the search scored in (recorded by the run), wherever this export runs;
    # the export merges alone, so no workers are placed
    dtype = study.user_attrs.get("dtype")
    prep = prepare(cfg, log=lambda _: None, placed=Placement(False, 1, None), dtype=dtype)
    named = recipe_with_paths(prep.space.recipe(frozen.params).to_dict(), prep.paths)
    recipe = candidate(named, f"trial {number}")
    used = set(recipe.referenced_models())
    named_as = {ref: portable_ref(p) for ref, p in prep.paths.items()}
    record: dict[str, Any] = {
        "experiment": cfg.name,
        "run_dir": str(run.path.resolve()),
        "trial": number,
        "method": recipe.merge_method,
        "parents": [
            {
                "name": Path(p).name,
                "ref": ref,
                "path": str(Path(p).resolve()),
                "hash": model_hash(p),
                "license": license_of(Path(p)),
                "role": "base" if ref == cfg.base_model else "source",
                **hub_fields(Path(p)),
            }
            for ref, p in prep.paths.items()
            if named_as[ref] in used  # a stack may leave a model out
        ],
        "tasks": list(cfg.fitness.tasks),
        "search_split": cfg.fitness.split,
        "search_fitness": frozen.values[0],
    }
    if summary.get("best_trial") == number and summary.get("best_test_fitness") is not None:
        record["test_fitness"], record["test_tasks"] = summary["best_test_fitness"], summary["best_test_tasks"]

    def finish(tmp: Path) -> list[str]:
        if "test_fitness" not in record:
            from evomerge.fitness.scoring import evaluate_model_dir

            result = evaluate_model_dir(tmp, cfg, split="test")
            record["test_fitness"], record["test_tasks"] = result.fitness, result.tasks
        with (tmp / "README.md").open("a") as card:
            card.write(_evaluation_section(record))
        write_json(tmp / LINEAGE_FILE, record)
        return [LINEAGE_FILE]

    build = run_moe if isinstance(recipe, MoEConfig) else run_merge
    merged = build(
        recipe,  # type: ignore[arg-type]
        out,
        device=device,
        seed=tensor_seed(trial_seed(cfg.search.seed, origin_of(frozen)), "trial"),
        overwrite=force,
        card_extra=_search_section(cfg, number, frozen.values),
        before_commit=finish,
    )
    exported = Exported(merged, number, record)
    if register:
        exported.registered = register_export(cfg, run, out, record, tracking_uri)
        record["registered"] = {"name": exported.registered[0], "version": exported.registered[1]}
        write_json(out / LINEAGE_FILE, record)
    return exported


def _search_section(cfg: ExperimentConfig, number: int, values: list[float]) -> str:
    return "\n".join(
        [
            "## Search",
            "",
            f"Found by evomerge experiment `{cfg.name}`, trial {number}, with the "
            f"{cfg.search.sampler} sampler (seed {cfg.search.seed}) on the tasks {', '.join(cfg.fitness.tasks)}.",
            "",
            f"- search fitness ({cfg.fitness.split} split): {values[0]:.4f}",
        ]
    )


def _evaluation_section(record: dict[str, Any]) -> str:
    rows = [f"| {task} | {acc:.4f} |" for task, acc in record["test_tasks"].items()]
    return "\n".join(
        [
            "",
            "## Evaluation (test split)",
            "",
            f"Test fitness: **{record['test_fitness']:.4f}** (held-out items, never seen by the search).",
            "",
            "| task | accuracy |",
            "|---|---|",
            *rows,
            "",
            "The lineage (parents, content hashes, licences) is in `evomerge.json`; "
            "`evomerge lineage` draws the family tree.",
            "",
        ]
    )


def register_export(
    cfg: ExperimentConfig, run: RunDir, out: Path, record: dict[str, Any], uri: str | None
) -> tuple[str, str]:
    """A new version of the registered model ``cfg.name``, its source the exported
    directory, linked to the trial's child run when the run was tracked in this store."""
    from mlflow.exceptions import MlflowException

    from evomerge.experiments.dashboard import NOTE, with_export
    from evomerge.experiments.tracking import open_client, parent_run_id, tracking_uri, trial_run_id

    uri = tracking_uri(uri)
    client = open_client(uri)
    try:
        client.get_registered_model(cfg.name)
    except MlflowException:
        client.create_registered_model(cfg.name, description=f"Merges exported from evomerge experiment {cfg.name}")
    tags = {
        "evomerge.kind": "merge",
        "experiment": cfg.name,
        "trial": str(record["trial"]),
        "method": record["method"],
        "run_dir": record["run_dir"],
        "tasks": ",".join(record["tasks"]),
        "test_fitness": repr(record["test_fitness"]),
        "lineage": json.dumps([{k: p[k] for k in ("name", "hash", "license", "role")} for p in record["parents"]]),
        **{f"test.acc.{t}": repr(v) for t, v in record["test_tasks"].items()},
    }
    version = client.create_model_version(
        cfg.name,
        str(out.resolve()),
        run_id=trial_run_id(client, run, record["trial"], uri),
        tags=tags,
        description=f"trial {record['trial']} of {record['run_dir']}",
    )
    parent = parent_run_id(run, uri)
    if parent is not None:  # the search's description says where its export is
        text = client.get_run(parent).data.tags.get(NOTE, "")
        client.set_tag(parent, NOTE, with_export(text, out, cfg.name, version))
    return cfg.name, str(version.version)
