"""Does the tie policy of magnitude top-k change how good a TIES merge is?

bfloat16 task vectors take few distinct magnitudes, so a tenth of a tensor may tie at
the density threshold. evomerge keeps the ties of lowest tie priority (a hash of the
flat index: spread evenly over the tensor); the policy it replaced kept the lowest
flat indices (the first rows of every matrix). This bench merges the same TIES
candidates of ``configs/smollm2.yaml`` (the untuned merge and random ones, in the
search's dtype, with its union vocabulary) under both policies and scores each on
the test split: the mean test fitness per policy and the largest gap between them.

    python bench/tie_policy.py [--candidates 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def lowest_index_ties():
    """The old policy: ties kept lowest flat index first (the torch path, whose tie
    order is ``sparsify.tie_priority``; the kernels, which hash alike, stood aside)."""
    from evomerge.operators import kernels, sparsify

    saved = sparsify.tie_priority, kernels.supports
    sparsify.tie_priority = lambda index, key: index  # type: ignore[assignment]
    kernels.supports = lambda *a: False  # type: ignore[assignment]
    try:
        yield
    finally:
        sparsify.tie_priority, kernels.supports = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=8, help="random candidates besides the untuned merge")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import optuna
    import torch

    from evomerge.experiments.config import load_config
    from evomerge.experiments.run import prepare
    from evomerge.search.worker import Job, MergeWorker

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(ROOT / "configs" / "smollm2.yaml").resolved()  # builds the SmolLM2 zoo when missing
    prep = prepare(cfg, workers=1, log=lambda _: None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = [prep.space.default_params()] + [prep.space.sample(study.ask()) for _ in range(args.candidates)]
    worker = MergeWorker(type(prep.spec)(**{**prep.spec.__dict__, "threads": args.threads}))
    worker.ready()
    scores: dict[str, list[float]] = {"hash": [], "lowest-index": []}
    for i, params in enumerate(points):
        recipe = prep.space.recipe(params).to_dict()
        row = {}
        for policy in scores:
            start = time.perf_counter()
            if policy == "hash":
                result = worker.run(Job(i, recipe, seed=0, split="test"))
            else:
                with lowest_index_ties():
                    result = worker.run(Job(i, recipe, seed=0, split="test"))
            if result.error:
                raise SystemExit(f"candidate {i} ({policy}): {result.error}")
            scores[policy].append(result.value)
            row[policy] = {"test": round(result.value, 4), "seconds": round(time.perf_counter() - start, 1)}
        print(f"candidate {i}: {json.dumps(row)}", flush=True)
    gaps = [a - b for a, b in zip(scores["hash"], scores["lowest-index"])]
    print(
        json.dumps(
            {
                "candidates": len(points),
                "mean_test": {p: round(statistics.fmean(v), 4) for p, v in scores.items()},
                "mean_gap_hash_minus_lowest": round(statistics.fmean(gaps), 4),
                "largest_gap": round(max(gaps, key=abs), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
