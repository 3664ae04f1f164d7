"""The best mixture of experts against the best weight merge on the demo zoo.

Runs the shipped `configs/demo.yaml` (task arithmetic of the three specialists) and
`configs/demo_moe.yaml` (a Mixtral of them on the base, searched: which are experts,
how many per token, each one's gate scale) with the same fitness, budget, sampler and
seeds, one in-process worker each (one thread), side by side; reports per search the
pick's search and test fitness, the baselines, and the mean seconds per candidate
(merge or build, and score).

    python bench/moe.py --zoo DIR [--seeds 0,1,2] [--trials 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import optuna

from evomerge.experiments.config import load_config
from evomerge.experiments.run import RunOptions, run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"weights": ROOT / "configs" / "demo.yaml", "moe": ROOT / "configs" / "demo_moe.yaml"}


def one(kind: str, zoo: Path, seed: int, trials: int, out: Path) -> dict[str, Any]:
    over = {"zoo": str(zoo), "search.seed": seed, "search.trials": trials, "workers": 1, "threads_per_worker": 1}
    cfg = load_config(CONFIGS[kind], over).resolved()
    run = out / f"{kind}-{seed}"
    summary = run_experiment(cfg, run, RunOptions(quiet=True, in_process=True, track=False))
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{run / 'study.db'}")
    results = [t.user_attrs["result"] for t in study.trials if t.state.name == "COMPLETE" and "result" in t.user_attrs]
    best_source = max(summary["sources"].items(), key=lambda kv: kv[1]["test_fitness"] or 0)
    return {
        "kind": kind,
        "seed": seed,
        "pick": summary["best_trial"],
        "search": round(summary["best_fitness"], 4),
        "test": round(summary["best_test_fitness"], 4),
        "baselines": {k: round(v["test_fitness"], 4) for k, v in summary["baselines"].items()},
        "best_source": [best_source[0], round(best_source[1]["test_fitness"], 4)],
        "merge_s": round(statistics.mean(r["merge_seconds"] for r in results), 4),
        "score_s": round(statistics.mean(r["score_seconds"] for r in results), 4),
        "wall_s": summary["wall_seconds"],
        "recipe": (run / "best_recipe.yml").read_text(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True, help="the demo zoo (evomerge zoo --out DIR)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=48)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="evomerge-moe-bench-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for kind in CONFIGS:
                row = one(kind, args.zoo.resolve(), seed, args.trials, Path(tmp))
                print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
                rows.append(row)
    for kind in CONFIGS:
        tests = [r["test"] for r in rows if r["kind"] == kind]
        print(f"{kind}: test mean {statistics.mean(tests):.4f} over {len(tests)} seeds")
    best = max((r for r in rows if r["kind"] == "moe"), key=lambda r: r["test"])
    print(f"best mixture's recipe (seed {best['seed']}):\n{best['recipe']}")


if __name__ == "__main__":
    main()
