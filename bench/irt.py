"""Fitness from a few items (``fitness.estimator: irt``) against full scoring, on the demo zoo.

1. Rank agreement: the demo's fitness (search split, 300 samples per task; ``--config``
   another experiment's, e.g. configs/smollm2.yaml with its zoo), calibrated on
   the sources, the base and ``--calibration-merges`` random merges; ``--candidates``
   other random merges scored on every sample. For each k in ``--anchors``: Spearman's
   rank correlation and the mean absolute error of the estimate from k anchor items per
   task against the full-split fitness, over all candidates and over the best quarter;
   beside it the same figures for the mean of k random samples per task.
2. Searches: the demo search (CMA-ES, 2 Ray workers, ``--trials`` trials) for each seed,
   with full scoring and with the estimator at each k: samples scored (calibration
   included), the pick's search fitness on every sample, and its test fitness.

    python bench/irt.py --zoo DIR [--config YAML] [--threads 1] [--candidates 200]
                        [--anchors 10,20,50] [--seeds 0,1,2] [--trials 48]
                        [--calibration-merges 4] [--skip-searches]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from evomerge.experiments.config import ExperimentConfig, load_config
from evomerge.experiments.run import IRT_FILE, RunOptions, _scored_sources, _source_recipe, prepare, run_experiment
from evomerge.fitness.evaluate import aggregate
from evomerge.fitness.irt import IrtEstimator, TaskIrt, calibrate
from evomerge.search.dispatch import InProcessDispatcher, run_jobs
from evomerge.search.estimate import random_recipes
from evomerge.search.worker import Job

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


OPTIONS = {"config": CONFIG, "threads": 1}  # --config and --threads


def _config(zoo: Path, **fitness) -> ExperimentConfig:
    data = load_config(OPTIONS["config"]).model_dump(mode="json", exclude_none=True)
    data["zoo"] = str(zoo.resolve())
    data["threads_per_worker"] = OPTIONS["threads"]  # 1 by default: a loaded machine's spare threads only spin
    data["fitness"].update(fitness)
    return ExperimentConfig.model_validate(data)


def _figures(estimates: list[float], truth: list[float]) -> tuple[float, float, float]:
    """Spearman over all, Spearman over the best quarter (by truth), mean absolute error."""
    best = sorted(range(len(truth)), key=lambda i: truth[i])[-len(truth) // 4 :]
    rho = float(spearmanr(estimates, truth)[0])
    rho_top = float(spearmanr([estimates[i] for i in best], [truth[i] for i in best])[0])
    mae = statistics.fmean(abs(e - t) for e, t in zip(estimates, truth))
    return rho, rho_top, mae


def rank_agreement(zoo: Path, candidates: int, ks: list[int], merges: int) -> None:
    cfg = _config(zoo)
    prep = prepare(cfg, 1, log=lambda _: None)
    pool = InProcessDispatcher(prep.spec)
    space = prep.space
    models = [_source_recipe(space, ref, prep.spec.dtype) for ref in _scored_sources(cfg)]
    models += random_recipes(space, merges, seed=0)
    others = random_recipes(space, candidates, seed=1)
    start = time.perf_counter()
    jobs = [Job(k, r, seed=k) for k, r in enumerate(models + others)]
    results = {}
    for i in range(0, len(jobs), 50):  # in parts, saying how far it got
        results.update(run_jobs(pool, jobs[i : i + 50]))
        print(f"scored {len(results)} of {len(jobs)} models ({time.perf_counter() - start:.0f} s)", flush=True)
    pool.close()
    tasks = list(cfg.fitness.tasks)
    print(f"scored {len(models)} calibration models and {candidates} candidates in {time.perf_counter() - start:.0f} s")
    calib = {t: torch.tensor([results[k].per_sample[t] for k in range(len(models))]) for t in tasks}
    scored = [results[len(models) + i].per_sample for i in range(candidates)]
    truth = [aggregate(cfg.fitness, {t: sum(s[t]) / len(s[t]) for t in tasks})[0] for s in scored]
    n = {t: len(scored[0][t]) for t in tasks}
    print(
        "\n| k per task | samples per candidate | estimator "
        f"| Spearman (all {candidates}) | Spearman (best quarter) | mean abs error |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for k in ks:
        est = calibrate(calib, k, seed=0)
        anchors = est.anchors()
        answers = [{t: [s[t][p] for p in anchors[t]] for t in tasks} for s in scored]
        irt = [aggregate(cfg.fitness, est.estimate(a))[0] for a in answers]
        picks = {t: random.Random(f"bench:{t}").sample(range(n[t]), k) for t in tasks}
        rnd = [aggregate(cfg.fitness, {t: sum(s[t][p] for p in picks[t]) / k for t in tasks})[0] for s in scored]
        for name, values in (("irt (gp-IRT)", irt), ("random subset", rnd)):
            rho, top, mae = _figures(values, truth)
            print(f"| {k} | {k * len(tasks)} | {name} | {rho:.3f} | {top:.3f} | {mae:.4f} |")
    print(f"(full: {sum(n.values())} samples per candidate)")


def searches(zoo: Path, seeds: list[int], ks: list[int], trials: int, merges: int, scorings: list[str]) -> None:
    """``scorings``: full; irt (the estimator at each k); random (the mean of k random
    samples per task, no calibration: the estimator's machinery with random anchors, equal
    weights and lambda 1, so that the re-rank and the test stay full-split as irt's do)."""
    rows = []
    settings: list[tuple[str, dict, int | None]] = [("full", {}, None)] if "full" in scorings else []
    for k in ks:
        irt = {"estimator": "irt", "anchors": k, "calibration_merges": merges}
        if "irt" in scorings:
            settings.append((f"irt, k={k}", irt, None))
        if "random" in scorings:
            settings.append((f"{k} random samples", irt, k))
    for seed in seeds:
        for label, fitness, randomly in settings:
            cfg = _config(zoo, **fitness)
            data = cfg.model_dump(mode="json", exclude_none=True)
            data["search"].update(seed=seed, trials=trials)
            cfg = ExperimentConfig.model_validate(data)
            with tempfile.TemporaryDirectory(prefix="evomerge-bench-irt-") as out:
                run = Path(out) / "run"
                if randomly:
                    _random_anchors(cfg, run, randomly, seed)
                s = run_experiment(cfg, run, RunOptions(quiet=True, track=False))
            full = s.get("best_fitness_full", s["best_fitness"])
            rows.append((seed, label, s["samples_scored"], full, s["best_test_fitness"], s["wall_seconds"]))
            print(json.dumps(dict(zip(("seed", "scoring", "samples", "search_full", "test", "seconds"), rows[-1]))))
    print(
        f"\n| scoring | samples scored (mean of {len(seeds)} seeds) | fewer than full "
        "| pick's search fitness | pick's test fitness (mean) | per seed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    base = statistics.fmean(r[2] for r in rows if r[1] == "full") if "full" in scorings else float("nan")
    for label, *_ in settings:
        mine = [r for r in rows if r[1] == label]
        samples = statistics.fmean(r[2] for r in mine)
        per_seed = ", ".join(f"{r[4]:.4f}" for r in mine)
        search = statistics.fmean(r[3] for r in mine)
        test = statistics.fmean(r[4] for r in mine)
        print(f"| {label} | {samples:,.0f} | {base / samples:.1f}x | {search:.4f} | {test:.4f} | {per_seed} |")


def _random_anchors(cfg: ExperimentConfig, run: Path, k: int, seed: int) -> None:
    """A run directory whose estimator is the mean of ``k`` random samples per task."""
    n = cfg.fitness.samples or 0
    rng = random.Random(f"bench:random:{seed}")
    flat = [0.0] * n
    tasks = {t: TaskIrt(sorted(rng.sample(range(n), k)), [1 / k] * k, flat, flat, 1.0) for t in cfg.fitness.tasks}
    run.mkdir(parents=True)
    (run / IRT_FILE).write_text(json.dumps({**IrtEstimator(tasks).to_json(), "samples": 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the experiment (default: configs/demo.yaml)")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--anchors", default="10,20,50")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--calibration-merges", type=int, default=4)
    ap.add_argument("--skip-searches", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--scorings", default="full,irt,random", help="which searches: full, irt, random")
    args = ap.parse_args()
    OPTIONS.update(config=args.config, threads=args.threads)
    ks = [int(k) for k in args.anchors.split(",")]
    if not args.skip_agreement:
        rank_agreement(args.zoo, args.candidates, ks, args.calibration_merges)
    if not args.skip_searches:
        seeds = [int(s) for s in args.seeds.split(",")]
        searches(args.zoo, seeds, ks, args.trials, args.calibration_merges, args.scorings.split(","))


if __name__ == "__main__":
    main()
