"""The SmolLM2 zoo and what a candidate costs on it.

1. Builds the SmolLM2 zoo (``evomerge zoo --preset smollm2``) unless it is current,
   reports the build time, every model's accuracy, and whether each specialist leads
   its own task (better than the base there, and its best task).
2. Per-candidate seconds on the search of ``configs/smollm2.yaml``: one in-process
   worker (the resident base, the union vocabulary) merges and scores the untuned
   candidate and a few random ones, with the native scorer and with lm-eval.

    python bench/smollm2.py [--rebuild] [--candidates 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def zoo_report(force: bool) -> Path:
    from evomerge.fitness.presets import ensure_preset
    from evomerge.fitness.zoo import load_zoo

    start = time.perf_counter()
    root = ensure_preset("smollm2", force=force)
    took = time.perf_counter() - start
    manifest = load_zoo(root)
    print(f"zoo at {root}: this call {took:.0f} s; the build took {manifest['build_seconds']} s")
    tasks = list(manifest["tasks"])
    print(f"{'model':8s} " + " ".join(f"{t + '/test':>11s}" for t in tasks))
    for name, entry in manifest["models"].items():
        print(f"{name:8s} " + " ".join(f"{entry['accuracy'][t]['test']:11.3f}" for t in tasks))
    base = manifest["models"]["base"]["accuracy"]
    for task in tasks:
        acc = manifest["models"][task]["accuracy"]
        lead = acc[task]["test"] > base[task]["test"] and acc[task]["test"] == max(acc[t]["test"] for t in tasks)
        print(f"specialist {task}: {'leads' if lead else 'does NOT lead'} its task")
    return root


def candidate_cost(n: int, threads: int) -> dict:
    import torch

    from evomerge.experiments.config import load_config
    from evomerge.experiments.run import prepare
    from evomerge.search.worker import Job, MergeWorker

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "smollm2.yaml").resolved()
    prep = prepare(cfg, workers=1, log=lambda _: None)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = [prep.space.default_params()] + [prep.space.sample(study.ask()) for _ in range(n)]
    out: dict[str, dict] = {}
    for backend in ("native", "lm-eval"):
        spec_fitness = {**prep.spec.fitness, "backend": backend}
        worker = MergeWorker(type(prep.spec)(**{**prep.spec.__dict__, "fitness": spec_fitness, "threads": threads}))
        worker.ready()
        merges, scores, values = [], [], []
        for i, params in enumerate(points):
            recipe = prep.space.recipe(params).to_dict()
            result = worker.run(Job(i, recipe, seed=0))
            if result.error:
                raise SystemExit(f"candidate {i}: {result.error}")
            merges.append(result.merge_seconds)
            scores.append(result.score_seconds)
            values.append(round(result.value, 4))
        out[backend] = {
            "merge_s": round(statistics.median(merges[1:]), 2),
            "score_s": round(statistics.median(scores[1:]), 2),
            "first_merge_s": round(merges[0], 2),
            "values": values,
        }
        print(backend, json.dumps(out[backend]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebuild", action="store_true", help="rebuild the zoo even if current")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    zoo_report(args.rebuild)
    candidate_cost(args.candidates, args.threads)


if __name__ == "__main__":
    main()
