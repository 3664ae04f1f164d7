"""Running an experiment: the zoo if needed, the study, the worker pool, the search,
then the final pick (re-ranked on the validation split to guard against
overfitting the search split) and the test-split scores in ``summary.json``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig
from evomerge.experiments.rundir import (
    RunDir,
    RunLog,
    check_sqlite,
    holds_study,
    study_attr,
    write_atomic,
    write_json,
)
from evomerge.operators.moe_config import candidate
from evomerge.search.dispatch import run_jobs
from evomerge.search.loop import Budget, SearchLoop, SearchStats, TrialRecord, record_from_trial, trial_seed
from evomerge.search.memory import MemoryPlan, default_budget_gib, footprint, plan_memory
from evomerge.search.moe_space import MoESpace
from evomerge.search.placement import Node, Placement, cluster_nodes, local_nodes, place
from evomerge.search.space import SearchSpace, Space
from evomerge.search.stack import RESIDUAL, StackSpace
from evomerge.search.worker import Job, JobResult, WorkerSpec


@dataclass
class RunOptions:
    workers: int | None = None
    ray_address: str | None = None
    quiet: bool = False
    in_process: bool = False  # one worker in this process, no Ray (tests and debugging)
    tracking_uri: str | None = None
    track: bool = True


@dataclass
class Prepared:
    cfg: ExperimentConfig
    paths: dict[str, str]
    space: Space
    spec: WorkerSpec
    gpus: bool
    workers: int
    memory: MemoryPlan | None = None  # None for layer-stack searches (their sources are the models)


def prepare(
    cfg: ExperimentConfig,
    workers: int | None = None,
    log=print,
    *,
    nodes: list[Node] | None = None,
    where: str = "this machine",
    placed: Placement | None = None,
    dtype: str | None = None,
) -> Prepared:
    """Build the zoo when needed, resolve the sources and derive the search space; place
    the workers on ``nodes`` (this machine's resources by default; ``where`` names them in
    errors) unless ``placed`` says where. ``dtype``: the search dtype a run recorded (a
    resume's or an export's), else bfloat16 on GPUs unless the config names one."""
    from evomerge.operators.checkpoint import open_checkpoint

    placed = placed or place(
        local_nodes() if nodes is None else nodes,
        device=cfg.device,
        workers=workers or cfg.workers,
        threads=cfg.threads_per_worker,
        gpus_per_worker=cfg.gpus_per_worker,
        where=where,
    )
    if cfg.uses_zoo():
        from evomerge.fitness.presets import ensure_preset

        zoo = cfg.zoo_dir()
        assert zoo is not None
        if cfg.zoo is None or not (zoo / "zoo.json").is_file():
            # the default zoo follows the shipped recipe; a named one is used as it is
            ensure_preset(cfg.zoo_preset, zoo, log=log)
    refs = list(dict.fromkeys([*([cfg.base_model] if cfg.base_model else []), *cfg.models]))
    paths = {ref: str(cfg.resolve_model(ref)) for ref in refs}
    gpus = placed.gpus
    # a GPU search merges and scores in bfloat16 unless the config names a dtype; the
    # recipes carry it, so the export is what was scored
    if dtype is None:
        dtype = cfg.merge.dtype if "dtype" in cfg.merge.model_fields_set or not gpus else "bfloat16"
    space: SearchSpace | StackSpace | MoESpace
    if cfg.layers is not None:
        space = _stack_space(cfg, paths)
    elif cfg.moe is not None:
        space = _moe_space(cfg, paths, dtype)
    else:
        first = open_checkpoint(paths[refs[0]])
        n_layers = first.num_layers or 1
        first.close()
        space = SearchSpace(cfg.merge.model_copy(update={"dtype": dtype}), cfg.models, cfg.base_model, n_layers)
    device = "cuda" if gpus else "cpu"
    spec = WorkerSpec(
        sources=paths,
        model_ref=refs[0],  # the base, when there is one
        fitness=cfg.fitness.model_dump(mode="json"),
        zoo_root=str(cfg.zoo_dir()) if cfg.uses_zoo() else None,
        base_dir=str(cfg.source_dir),
        seed=cfg.search.seed,
        device=device,
        dtype=dtype,
        threads=placed.threads,
        gpus_per_worker=placed.gpus_per_worker,
        stack=cfg.layers is not None,
        moe=cfg.moe is not None,
    )
    return Prepared(cfg, paths, space, spec, gpus, placed.workers)


def with_memory_plan(prep: Prepared, *, on_cluster: bool = False) -> Prepared:
    """``prep`` with its workers' memory plan (a weight search's; a layer-stack search
    keeps its sources as models): refused here, before anything starts, when even
    streamed sources would not fit the budget. On a cluster the budget is the config's
    (this process does not see the workers' memory)."""
    cfg, spec = prep.cfg, prep.spec
    if cfg.layers is not None or cfg.moe is not None:
        return prep
    from evomerge.operators.recipe import DTYPES

    try:
        fp = footprint(
            [spec.sources[spec.model_ref], *(p for r, p in spec.sources.items() if r != spec.model_ref)],
            DTYPES[spec.dtype].itemsize,
        )
    except (EvomergeError, OSError):
        # a source the driver cannot read: on a cluster the nodes may hold it, and a damaged
        # one is named by the workers that load it; the config's placement stands unplanned
        placement = "resident" if cfg.placement == "auto" else cfg.placement
        return replace(prep, spec=replace(spec, placement=placement))
    shape = _scoring_batch(prep)
    if shape is not None:
        fp = fp.scoring(*shape)
    budget = cfg.device_memory_gib
    if budget is None and not on_cluster:
        budget = default_budget_gib(spec.device, 1 if prep.gpus else prep.workers)
    memory = plan_memory(fp, cfg.placement, spec.device, budget, gpus=spec.gpus_per_worker)
    return replace(prep, memory=memory, spec=replace(spec, placement=memory.placement, read_ahead=memory.read_ahead))


def _scoring_batch(prep: Prepared) -> tuple[int, int, int] | None:
    """The largest native scoring batch of the search (its samples encoded as the workers
    encode them, on every split the workers score), for the memory plan; None when the
    planner cannot tell (lm-eval, data it cannot read)."""
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.scoring import load_tokenizer

    spec = prep.spec
    if prep.cfg.fitness.backend != "native":
        return None
    try:
        tokenizer = load_tokenizer(Path(spec.sources[spec.model_ref]))
    except (EvomergeError, OSError):
        return None
    shapes = []
    for split in dict.fromkeys([prep.cfg.fitness.split, "validation", "test"]):
        try:
            evaluator = Evaluator(
                prep.cfg.fitness,
                zoo_root=Path(spec.zoo_root) if spec.zoo_root else None,
                base_dir=Path(spec.base_dir),
                seed=spec.seed,
                split=split,
            )
            shape = evaluator.batch_shape(tokenizer)
        except (EvomergeError, OSError):
            continue  # a split this fitness does not have, or data the workers will name
        if shape is not None:
            shapes.append(shape)
    return tuple(max(dim) for dim in zip(*shapes)) if shapes else None  # type: ignore[return-value]


def _moe_space(cfg: ExperimentConfig, paths: dict[str, str], dtype: str) -> MoESpace:
    """The mixture-of-experts space; models that cannot become a Mixtral are refused here
    (one line naming the model or tensor), before any work starts."""
    from evomerge.operators.moe import open_moe_sources

    assert cfg.moe is not None and cfg.base_model is not None
    space = MoESpace(
        cfg.models,
        cfg.base_model,
        0,
        gate_mode=cfg.moe.gate_mode,
        prompts=cfg.moe.prompts,
        negative_prompts=cfg.moe.negative_prompts,
        min_experts=cfg.moe.min_experts,
        gate_scale=(float(cfg.moe.gate_scale.low or 0.25), float(cfg.moe.gate_scale.high or 4.0)),
        dtype=dtype,
    )
    src = open_moe_sources(space.recipe(space.default_params()), lambda ref: Path(paths[ref]))
    space.n_layers = src.layers
    return space


STACK_KEYS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def _stack_space(cfg: ExperimentConfig, paths: dict[str, str]) -> StackSpace:
    """The layer-stack space; models whose layers cannot be stacked are refused here,
    before any work starts."""
    from evomerge.operators.checkpoint import open_checkpoint

    assert cfg.layers is not None
    depth: dict[str, int] = {}
    configs: dict[str, dict[str, Any]] = {}
    for ref in cfg.models:
        ck = open_checkpoint(paths[ref])
        depth[ref], configs[ref] = ck.num_layers or 0, ck.config
        residual = cfg.layers.scale is None or any(name in t for t in ck.tensors for name in RESIDUAL)
        ck.close()
        if not depth[ref]:
            raise EvomergeError(f"models: '{ref}' has no numbered layers to stack")
        if not residual:
            raise EvomergeError(
                f"layers.scale: model '{ref}' has no {' or '.join(RESIDUAL)} tensors, whose scale it would search"
            )
    first = cfg.models[0]
    for ref in cfg.models[1:]:
        for key in STACK_KEYS:
            a, b = configs[first].get(key), configs[ref].get(key)
            if a != b:
                raise EvomergeError(
                    f"layers: models '{first}' and '{ref}' differ in {key} ({a} vs {b}); their layers cannot be stacked"
                )
    low = cfg.layers.min_layers or max(1, depth[first] // 2)
    high = cfg.layers.max_layers or max(low, 2 * depth[first])
    scale = cfg.layers.scale
    bounds = (scale.low, scale.high) if scale is not None and scale.low is not None and scale.high is not None else None
    return StackSpace(
        cfg.models, depth, repeats=cfg.layers.repeats, depth=(low, high), dtype=cfg.merge.dtype, scale=bounds
    )


def _check_study_storage(cfg: ExperimentConfig, run: RunDir, resume: bool) -> None:
    """Refuse a corrupt study storage, and on resume one that does not hold the study."""
    if run.study_db.exists():
        check_sqlite(run.study_db, "Optuna study storage")
        if resume and not holds_study(run.study_db, cfg.name):
            raise EvomergeError(f"{run.study_db}: holds no study '{cfg.name}' (emptied or replaced?); left untouched")


def open_study(cfg: ExperimentConfig, run: RunDir, prep: Prepared):
    """The run's study, created on the first run (``run_experiment`` has refused a
    damaged storage, or on resume one that does not hold the study, before this)."""
    import optuna

    from evomerge.search.samplers import make_pruner, make_sampler, population_size

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = len(cfg.fitness.objectives)
    n_dims = max(len(d) for d in prep.space.dims.values())
    population = population_size(n_dims, prep.workers, cfg.search.population)
    sampler = make_sampler(cfg.search.sampler, cfg.search.seed, population=population, objectives=objectives)
    pruning = cfg.search.pruning
    if pruning.enabled and objectives > 1:
        raise EvomergeError("search.pruning works with one objective; turn it off for Pareto search")
    pruner = make_pruner(pruning.pruner, pruning.enabled, pruning.fractions, pruning.reduction_factor)
    study = optuna.create_study(
        storage=run.storage,
        study_name=cfg.name,
        sampler=sampler,
        pruner=pruner,
        directions=["maximize"] * objectives,
        load_if_exists=True,
    )
    if not study.trials:
        study.enqueue_trial(prep.space.default_params())  # CMA-ES starts from a sensible point
    if "dtype" not in study.user_attrs:  # what a resume and an export merge in, wherever they run
        study.set_user_attr("dtype", prep.spec.dtype)
    return study


def _cluster_address(options: RunOptions) -> str | None:
    """The Ray cluster the workers run on, when not this machine."""
    if options.in_process:
        return None
    return options.ray_address or os.environ.get("RAY_ADDRESS") or None


def worker_nodes(options: RunOptions) -> tuple[list[Node] | None, str]:
    """The machines the workers will run on, and their name for errors: a cluster's alive
    nodes (joined here), else this machine (None: :func:`prepare` reads it)."""
    address = _cluster_address(options)
    if address is None:
        return None, "this machine"
    import ray

    from evomerge.search.ray_pool import init_ray

    init_ray(address, None, env_vars=_worker_env())
    return cluster_nodes(ray.nodes()), f"the Ray cluster at {address}"


def _worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)}


def make_dispatcher(prep: Prepared, options: RunOptions):
    if options.in_process:
        from evomerge.search.dispatch import InProcessDispatcher

        return InProcessDispatcher(prep.spec)
    from evomerge.search.ray_pool import RayDispatcher, init_ray

    cpus = None if options.ray_address else max(os.cpu_count() or 1, prep.workers * (prep.spec.threads or 1))
    init_ray(options.ray_address, cpus, env_vars=_worker_env())
    return RayDispatcher(
        for_nodes(prep),
        prep.workers,
        gpus=prep.gpus,
        gpus_per_worker=prep.spec.gpus_per_worker,
        job_timeout=prep.cfg.search.trial_timeout_s,
        start_timeout=prep.cfg.worker_start_timeout_s,
        grow=prep.cfg.workers == "auto" and _cluster_address(options) is not None,
    )


def for_nodes(prep: Prepared) -> WorkerSpec:
    """The workers' spec as Ray workers on any node take it: the fitness's files shipped with
    it (a node need not see the driver's paths), the Hub id of each source from the Hub cache
    (resolved again on a node that lacks the driver's snapshot) and, with ``models_from:
    driver``, every source's files."""
    from evomerge.fitness.evaluate import fitness_files
    from evomerge.operators.hub import portable_ref
    from evomerge.shipping import Files

    spec = prep.spec
    data = fitness_files(
        prep.cfg.fitness, zoo_root=Path(spec.zoo_root) if spec.zoo_root else None, base_dir=Path(spec.base_dir)
    )
    models = None
    if prep.cfg.models_from == "driver":
        models = {ref: Files.read([Path(path)]) for ref, path in spec.sources.items()}
    portable = {ref: portable_ref(path) for ref, path in spec.sources.items()}
    hub = {ref: name for ref, name in portable.items() if name != spec.sources[ref]}
    return replace(spec, fitness_files=Files.read(data), shipped_models=models, hub_ids=hub)


def _source_recipe(space: Space, ref: str, dtype: str) -> dict[str, Any]:
    """A source model alone, as the workers can evaluate it (a stack worker merges no weights)."""
    if isinstance(space, (StackSpace, MoESpace)):
        return space.source_recipe(ref)
    return {"merge_method": "linear", "dtype": dtype, "models": [{"model": ref, "parameters": {"weight": 1.0}}]}


def recipe_with_paths(recipe: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """A recipe with model refs replaced by their directories (what mergekit needs); a model
    from the Hub cache by its id at the resolved commit (``org/name@<commit>``), which
    mergekit and evomerge resolve again, on any machine."""
    from evomerge.operators.hub import portable_ref

    return candidate(recipe).with_models({r: portable_ref(p) for r, p in paths.items()}).to_dict()


def finalize(
    prep: Prepared,
    run: RunDir,
    study,
    stats: SearchStats,
    dispatcher,
    log: Callable[[str], None] = print,
    estimator: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Re-rank the top candidates on validation, score the pick, sources and default on test.
    With an ``estimator`` (the search's fitness estimated from anchor items), the pick is
    scored on every sample of the search split too, beside its estimate."""
    cfg, space = prep.cfg, prep.space
    complete = _complete_from_study(study, space)  # every session's trials: a resumed run has earlier ones
    if not complete:
        raise EvomergeError("no trial completed; see the failed trials' errors in the study")
    top = sorted(complete, key=lambda r: r.value or 0.0, reverse=True)[: cfg.search.rerank_top]
    seed = cfg.search.seed
    jobs = [Job(i, r.recipe, seed=trial_seed(seed, r.seed_number), split="validation") for i, r in enumerate(top)]
    validation = run_jobs(dispatcher, jobs)
    ranked = sorted(range(len(top)), key=lambda i: (validation[i].value if validation[i].ok else -1, top[i].value))
    best = top[ranked[-1]]
    default_recipe = space.recipe(space.default_params()).to_dict()
    # (candidate, split) -> its score; split None is the search split
    candidates: dict[tuple[str, str], tuple[dict[str, Any], int]] = {
        ("best", ""): (best.recipe, trial_seed(seed, best.seed_number)),
        # the search's starting point: the untuned merge (weights 1/N), or a stack search's first model
        ("baseline", _baseline_name(cfg)): (default_recipe, trial_seed(seed, -1)),
        **{("source", ref): (_source_recipe(space, ref, prep.spec.dtype), 0) for ref in _scored_sources(cfg)},
    }
    best_splits: tuple[str | None, ...] = ("test", None) if estimator else ("test",)
    wanted = [(c, split) for c in candidates for split in (best_splits if c[0] == "best" else (None, "test"))]
    jobs = [Job(k, candidates[c][0], seed=candidates[c][1], split=split) for k, (c, split) in enumerate(wanted)]
    scored = {wanted[k]: result for k, result in run_jobs(dispatcher, jobs).items()}
    best_named = recipe_with_paths(best.recipe, prep.paths)
    write_atomic(run.best_recipe, candidate(best_named).to_yaml())

    def pair(search: JobResult, test: JobResult) -> dict[str, Any]:
        return {
            "fitness": search.value if search.ok else None,
            "test_fitness": test.value if test.ok else None,
            "tasks": search.tasks,
            "test_tasks": test.tasks,
        }

    summary = {
        "experiment": cfg.name,
        "best_trial": best.number,
        "best_fitness": best.value,
        **({"best_fitness_full": scored[("best", ""), None].value, "estimator": estimator} if estimator else {}),
        "best_validation_fitness": validation[ranked[-1]].value,
        "best_test_fitness": scored[("best", ""), "test"].value,
        "best_test_tasks": scored[("best", ""), "test"].tasks,
        "best_params": best.params,
        "best_recipe": str(run.best_recipe.resolve()),
        "sources": {c[1]: pair(scored[c, None], scored[c, "test"]) for c in candidates if c[0] == "source"},
        "baselines": {c[1]: pair(scored[c, None], scored[c, "test"]) for c in candidates if c[0] == "baseline"},
        "trials": _trial_counts(study),
        # the pool's size at the end (it grows as nodes join a cluster, with workers: auto)
        **_session_figures(run, stats, max(prep.workers, getattr(dispatcher, "workers", 0))),
    }
    if prep.memory is not None:
        # beside the plan, the most a worker held on its device (the final scoring included)
        peaks = [r.peak_gib for r in [*validation.values(), *scored.values()] if r.peak_gib is not None]
        peak = max([*peaks, *([stats.peak_gib] if stats.peak_gib is not None else [])], default=None)
        summary["memory"] = {**prep.memory.summary(), "peak_gib": None if peak is None else round(peak, 3)}
    if len(cfg.fitness.objectives) > 1:
        summary["pareto_front"] = [
            {"trial": t.number, "values": dict(zip(cfg.fitness.objectives, t.values))} for t in study.best_trials
        ]
    from evomerge.experiments.plots import REPORTS, write_reports

    summary["reports"] = [
        p.name for p in write_reports(study, cfg.fitness.objectives, run.path / REPORTS, log, _references(summary))
    ]
    write_json(run.summary, summary)
    return summary


IRT_FILE = "irt.json"


def _irt_estimator(prep: Prepared, run: RunDir, dispatcher, log: Callable[[str], None]):
    """The run's IRT estimator: calibrated once (the sources, the base and random merges
    scored on every search sample) and kept in the run directory, which a resumed run
    reads back, so that every trial of a study is estimated alike."""
    from evomerge.fitness.irt import IrtEstimator
    from evomerge.search.estimate import Calibrated, calibrate_on, random_recipes

    cfg, space = prep.cfg, prep.space
    path = run.path / IRT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        estimator = IrtEstimator.from_json(saved)
        kept = {len(t.anchors) for t in estimator.tasks.values()}
        if kept != {cfg.fitness.anchors} or set(estimator.tasks) != set(cfg.fitness.tasks):
            raise EvomergeError(
                f"fitness.anchors: {path} was calibrated for {sorted(kept)} anchors on tasks {sorted(estimator.tasks)};"
                " a run keeps its estimator (start a new run to change it)"
            )
        return Calibrated(estimator, 0)
    seed = cfg.search.seed
    models = {ref: (_source_recipe(space, ref, prep.spec.dtype), 0) for ref in _scored_sources(cfg)}
    for i, recipe in enumerate(random_recipes(space, cfg.fitness.calibration_merges, seed)):
        models[f"random merge {i + 1}"] = (recipe, trial_seed(seed, -2 - i))
    log(f"irt: calibrating on {len(models)} models scored on every search sample")
    calibrated = calibrate_on(dispatcher, models, cfg.fitness, seed)
    write_json(path, {**calibrated.estimator.to_json(), "samples": calibrated.samples})
    errors = ", ".join(f"{n} {t.loo_error:.3f}" for n, t in calibrated.estimator.tasks.items())
    log(f"irt: {cfg.fitness.anchors} anchors per task, {calibrated.samples} samples; error left out: {errors}")
    return calibrated


def _estimator_info(cfg: ExperimentConfig, run: RunDir) -> dict[str, Any]:
    """What summary.json says of the run's estimator."""
    saved = json.loads((run.path / IRT_FILE).read_text())
    return {
        "name": "irt",
        "anchors": cfg.fitness.anchors,
        "calibration": saved["calibration"],
        "calibration_samples": saved["samples"],
        "tasks": {n: {"lambda": t["lam"], "loo_error": t["loo_error"]} for n, t in saved["tasks"].items()},
    }


def _references(summary: dict[str, Any]) -> dict[str, float]:
    """What the search must beat, on its own split: the best source model and the start."""
    out: dict[str, float] = {}
    sources = {k: v["fitness"] for k, v in summary["sources"].items() if v.get("fitness") is not None}
    if sources:
        name = max(sources, key=lambda k: sources[k])
        out[f"best source: {name}"] = sources[name]
    for name, row in summary["baselines"].items():
        if row.get("fitness") is not None:
            out["untuned merge" if name == "default_merge" else name] = row["fitness"]
    return out


def _baseline_name(cfg: ExperimentConfig) -> str:
    """The search's starting point: the untuned merge (weights 1/N), a stack search's
    first model, or the mixture of every model at gate scale 1."""
    return "start" if cfg.layers else "all_experts" if cfg.moe else "default_merge"


def _scored_sources(cfg: ExperimentConfig) -> list[str]:
    """The models merged, and the base model too (users compare a merge with every model it came from)."""
    return list(cfg.models) + ([cfg.base_model] if cfg.base_model and cfg.base_model not in cfg.models else [])


def _trial_counts(study) -> dict[str, int]:
    """Finished trials of the whole study (earlier sessions of a resumed run included);
    ``interrupted``: cut short by a crash, retried, not counted in the budget."""
    from evomerge.search.loop import is_interrupted

    counts = {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0}
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    for t in study.get_trials(deepcopy=False):
        if is_interrupted(t):
            counts["interrupted"] += 1
        elif t.state.name in names:
            counts[names[t.state.name]] += 1
    return counts


def _session_figures(run: RunDir, stats: SearchStats, workers: int) -> dict[str, Any]:
    """Samples, busy fraction and wall time of the search; a session that ran no trial
    (the budget was already met) keeps the figures of the session that did."""
    keys = ("samples_scored", "worker_busy_fraction", "workers", "wall_seconds", "nodes", "node_busy_fraction")
    if stats.finished == 0 and run.summary.is_file():
        old = json.loads(run.summary.read_text())
        if all(k in old for k in keys[:4]):
            return {k: old[k] for k in keys if k in old}
    wall = max(1e-9, stats.wall_seconds)
    return {
        "samples_scored": stats.samples_scored,
        "worker_busy_fraction": round(stats.busy_seconds / (workers * wall), 4),
        "workers": workers,
        "wall_seconds": round(stats.wall_seconds, 2),
        # the Ray nodes that ran trials, and each one's worker seconds per second of search
        "nodes": len(stats.busy_by_node) or 1,
        "node_busy_fraction": {node[:12]: round(busy / wall, 4) for node, busy in sorted(stats.busy_by_node.items())},
    }


def _complete_from_study(study, space: Space) -> list[TrialRecord]:
    from optuna.trial import TrialState

    return [record_from_trial(t, space) for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])]


def run_experiment(
    cfg: ExperimentConfig, out: Path, options: RunOptions | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Run (or continue) the experiment in ``out``; return the summary."""
    options = options or RunOptions()
    log = (lambda _msg: None) if options.quiet else print
    run = RunDir(out)
    nodes, where = worker_nodes(options)
    # a resumed search keeps the dtype it started in, even on other hardware
    dtype = study_attr(run.study_db, cfg.name, "dtype") if resume else None
    prep = prepare(cfg, options.workers, log=log, nodes=nodes, where=where, dtype=dtype)
    prep = with_memory_plan(prep, on_cluster=nodes is not None)
    if options.track:  # a bad tracking store is refused before the run directory is touched
        from evomerge.experiments.tracking import open_client, tracking_uri

        open_client(tracking_uri(options.tracking_uri))
    _check_study_storage(cfg, run, resume)  # a damaged storage is refused before anything is written
    run.create(cfg, accept_change=resume)
    with run.session():  # one process at a time drives a run directory
        runlog = RunLog(run.path / "run.log")
        try:
            return _run_session(cfg, run, prep, options, resume, log, runlog)
        except BaseException as err:
            try:
                runlog(f"session failed: {type(err).__name__}: {err}")
            except EvomergeError:
                pass  # the log itself cannot be written: the error below says why the session stopped
            raise
        finally:
            runlog.close()


def _run_session(cfg, run: RunDir, prep: Prepared, options: RunOptions, resume: bool, log, runlog: RunLog):
    from evomerge.experiments.monitor import ProgressObserver

    runlog(f"session start ({'resume' if resume else 'run'}; {prep.workers} worker(s), budget {cfg.search.trials})")

    def both(message: str) -> None:
        log(message)
        runlog(message)

    if prep.memory is not None:
        both(prep.memory.line())

    study = open_study(cfg, run, prep)
    budget = Budget(cfg.search.trials, cfg.search.timeout_minutes * 60 if cfg.search.timeout_minutes else None)
    started = time.monotonic()
    observer = ProgressObserver(budget.trials, prep.workers, quiet=options.quiet)
    observers: list[Any] = [observer, runlog.trial]
    tracker = None
    if options.track:
        from evomerge.experiments.tracking import MlflowTracker

        tracker = MlflowTracker(cfg, run, prep.paths, options.tracking_uri)
        observers.append(tracker)
        prep = replace(prep, spec=replace(prep.spec, monitor=tracker.system_metrics()))
    summary: dict[str, Any] | None = None
    try:
        dispatcher = make_dispatcher(prep, options)
    except BaseException:
        if tracker is not None:
            tracker.finish(None, "FAILED")
        raise
    try:
        searcher, calibrated = dispatcher, None
        if cfg.fitness.estimator == "irt":
            from evomerge.search.estimate import EstimatingDispatcher

            calibrated = _irt_estimator(prep, run, dispatcher, both)
            searcher = EstimatingDispatcher(dispatcher, calibrated.estimator, cfg.fitness)
        loop = SearchLoop(
            study,
            prep.space,
            searcher,
            budget=budget,
            seed=cfg.search.seed,
            fractions=cfg.search.pruning.fractions if cfg.search.pruning.enabled else None,
            observers=observers,
        )
        with observer:
            stats = loop.run()
        info = None
        if calibrated is not None:
            stats.samples_scored += calibrated.samples  # the calibration's, when this session calibrated
            info = _estimator_info(cfg, run)
        if tracker is not None:
            tracker.backfill(study, prep.space)  # trials a crash left unlogged, and the interrupted ones
        summary = finalize(prep, run, study, stats, dispatcher, both, info)
        summary["total_seconds"] = round(time.monotonic() - started, 2)
        if tracker is not None:
            summary["tracking_uri"] = tracker.uri
            summary["mlflow_experiment_id"] = tracker.experiment_id
        write_json(run.summary, summary)
        runlog(f"session end: best trial {summary['best_trial']}, test fitness {summary['best_test_fitness']}")
    finally:
        dispatcher.close()
        if tracker is not None:
            tracker.finish(summary, "FINISHED" if summary else "FAILED")
    return summary
