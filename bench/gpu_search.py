"""A short real search on a ~1B-parameter bfloat16 Llama (random weights built from a
config, nothing downloaded) under each memory placement, end to end through the CLI:
``evomerge run`` with ``placement: resident`` and ``placement: streamed``, then
``evomerge export`` of the pick and ``evomerge eval`` of the export on the test split.

For each placement it prints one JSON line: the plan (placement, GiB per worker on the
device and in host memory) beside the worker's measured peak (tensors allocated on the
GPU; host memory above the worker's start on the CPU), the median merge and scoring
seconds per trial, whether the trial values equal the other placement's, and whether
the export's eval reproduces the recorded test fitness. The fitness data are the demo
zoo's (a random model scores near zero: this checks memory, speed and mechanics).

    python bench/gpu_search.py [--device cuda] [--trials 4] [--samples 40] [--zoo DIR] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from candidate_cost import make_large  # bench/ is this script's directory

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden=256, intermediate=704, layers=4, heads=4, vocab=32000)  # a quick dry run of the same path


def _cli(*args: str, env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"evomerge {args[0]} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def search(work: Path, zoo: Path, paths: list[str], placement: str, args: argparse.Namespace) -> dict:
    """One placement's search, export and eval; its figures."""
    import optuna

    tasks = list(json.loads((zoo / "zoo.json").read_text())["tasks"])[:2]
    cfg = {
        "name": f"placement-{placement}",
        "zoo": str(zoo),
        "models": paths[1:],
        "base_model": paths[0],
        "merge": {"method": "ties", "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": 0.5}},
        "fitness": {"tasks": tasks, "samples": args.samples},
        "search": {"sampler": "cmaes", "seed": 0, "trials": args.trials, "rerank_top": 1},
        "workers": 1,
        "device": args.device,
        "placement": placement,
    }
    config = work / f"{placement}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run, export = work / f"run-{placement}", work / f"export-{placement}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    _cli("run", str(config), "--out", str(run), "--quiet", env=env)
    summary = json.loads((run / "summary.json").read_text())
    timings = re.findall(r"\(merge ([\d.]+) s, score ([\d.]+) s\)", (run / "run.log").read_text())
    _cli("export", str(run), str(export), "--no-register", env=env)
    printed = _cli("eval", str(export), "--config", str(config), "--split", "test", env=env)
    evaluated = json.loads(printed.splitlines()[-1])
    study = optuna.load_study(study_name=cfg["name"], storage=f"sqlite:///{run / 'study.db'}")
    return {
        "placement": placement,
        "device": args.device,
        "memory": summary["memory"],
        "merge_s": round(statistics.median(float(m) for m, _ in timings), 3),
        "score_s": round(statistics.median(float(s) for _, s in timings), 3),
        "values": [t.value for t in study.trials],
        "test_fitness": summary["best_test_fitness"],
        "eval_of_export": evaluated["fitness"],
        "eval_reproduces": evaluated["fitness"] == summary["best_test_fitness"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--zoo", type=Path, default=None, help="a demo zoo directory (default: the demo preset's)")
    ap.add_argument("--small", action="store_true", help="a 4-layer model instead of ~1B (a dry run)")
    ap.add_argument("--work", type=Path, default=None, help="keep the models and runs here (default: a temp dir)")
    args = ap.parse_args()
    from evomerge.fitness.presets import ensure_preset
    from evomerge.fitness.zoo import load_zoo

    zoo = args.zoo or ensure_preset("demo")
    base = zoo / load_zoo(zoo)["models"]["base"]["path"]
    with tempfile.TemporaryDirectory(prefix="evomerge-gpu-search-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = make_large(work / "model", base, SMALL if args.small else None)
        results = [search(work, zoo, paths, p, args) for p in ("resident", "streamed")]
    results[1]["same_values_as_resident"] = results[1]["values"] == results[0]["values"]
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
