"""Scoring speed: the native batched scorer against lm-eval on the same items.

Scores the demo zoo's base model on every zoo task's search split (the same
documents for both backends), checks that the accuracies agree sample by sample,
and reports the seconds each backend took (model loading excluded; lm-eval's
task loading included, as a search pays it for every candidate scored that way).

    python bench/scoring_speed.py [--samples 300] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

from evomerge.fitness.evaluate import Evaluator, FitnessConfig
from evomerge.fitness.scoring import load_model
from evomerge.fitness.zoo import default_zoo_dir, ensure_zoo, load_zoo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    import torch

    zoo = ensure_zoo(default_zoo_dir())
    tasks = list(load_zoo(zoo)["tasks"])
    cfg = FitnessConfig(tasks=tasks, samples=args.samples)
    model, tok = load_model(zoo / "base", torch.device("cpu"), getattr(torch, args.dtype))
    evals = {b: Evaluator(cfg, zoo_root=zoo, backend=b) for b in ("native", "lm-eval")}
    best: dict[str, float] = {}
    results = {}
    for _ in range(args.repeats):
        for backend, ev in evals.items():  # side by side in each repeat
            start = time.perf_counter()
            results[backend] = ev.evaluate(model, tok)
            best[backend] = min(best.get(backend, 1e9), time.perf_counter() - start)
    agree = all(results["native"].per_sample[t] == results["lm-eval"].per_sample[t] for t in tasks)
    n = len(tasks) * args.samples
    print(
        json.dumps(
            {
                "items": n,
                "dtype": args.dtype,
                "native_seconds": round(best["native"], 3),
                "lm_eval_seconds": round(best["lm-eval"], 3),
                "speedup": round(best["lm-eval"] / best["native"], 1),
                "per_sample_agreement": agree,
                "accuracy": {b: r.tasks for b, r in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
