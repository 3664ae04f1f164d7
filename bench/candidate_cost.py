"""What one in-memory candidate costs a search worker, under each memory placement.

For the demo zoo and for a ~1B-parameter bfloat16 Llama built from a config (random
weights; two fine-tunes are the base plus seeded noise; nothing downloaded), each in
a fresh process per placement (``resident``, ``streamed``):

* seconds per candidate merge into the resident model (median of ``--repeats``), for
  linear, task arithmetic, TIES and DARE-TIES, against a plain weighted add of the
  same input tensors into the same parameters (the floor any merge pays);
* host-to-device bytes per candidate (none on the CPU: the device is host memory);
* the process's peak memory above its start against the memory plan's estimate.

    python bench/candidate_cost.py [--repeats 3] [--threads 2] [--skip-large] [--zoo DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGE = dict(hidden=2048, intermediate=5632, layers=16, heads=16, vocab=32000)  # ~0.95B parameters
METHODS = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
}


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's
    peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_large(root: Path, tokenizer_from: Path, shape: dict | None = None) -> list[str]:
    """The ~1B Llama (or ``shape``) and two fine-tunes, with the demo zoo's tokenizer
    copied in (a worker loads one with its model)."""
    import shutil

    import torch

    from evomerge.testing import make_family

    if not (root / "ft2" / "config.json").exists():
        make_family(root, 2, seed=0, dtype=torch.bfloat16, **(shape or LARGE))
    names = ("base", "ft1", "ft2")
    for f in tokenizer_from.glob("*token*"):
        for n in names:
            shutil.copy(f, root / n / f.name)
    return [str(root / n) for n in names]


def one(
    paths: list[str], placement: str, dtype: str, repeats: int, threads: int, methods: list[str], device: str = "cpu"
) -> dict:
    """In this process: a worker over ``paths`` (base first), each method's merges timed."""
    import torch

    from evomerge.operators.engine import load_inputs
    from evomerge.operators.plan import build_plan
    from evomerge.operators.recipe import DTYPES, Recipe
    from evomerge.search.memory import GIB, footprint, plan_memory
    from evomerge.search.worker import MergeWorker, WorkerSpec

    torch.set_num_threads(threads)
    start_rss = _rss_mib()
    fp = footprint(paths, DTYPES[dtype].itemsize)
    plan = plan_memory(fp, placement, device, 1e6)  # the estimate, whatever the machine's budget
    spec = WorkerSpec(
        sources={p: p for p in paths},
        model_ref=paths[0],
        fitness={"tasks": ["cp"]},
        zoo_root=None,
        base_dir=str(ROOT),
        seed=0,
        device=device,
        dtype=dtype,
        threads=threads,
        placement=placement,
        read_ahead=plan.read_ahead,
    )
    worker = MergeWorker(spec)
    out: dict = {"placement": placement, "methods": {}}
    for method in methods:
        params = METHODS[method]
        recipe_dict = {
            "merge_method": method,
            "dtype": dtype,
            "models": [{"model": p, "parameters": params} for p in paths[1:]],
        }
        if method != "linear":
            recipe_dict["base_model"] = paths[0]
        recipe = Recipe.from_dict(recipe_dict)
        merges, bytes_in = [], []
        for r in range(repeats + 1):  # the first warms the kernels and caches
            t = time.perf_counter()
            worker.merge(recipe, seed=r)
            _sync(worker.device)
            if r:
                merges.append(time.perf_counter() - t)
                bytes_in.append(worker.copied_bytes)
        mplan = build_plan(recipe, worker.sources)
        adds = []
        for _ in range(repeats):
            t = time.perf_counter()
            for pt in mplan.tensors:
                tensors, base = load_inputs(pt, worker.sources, worker.device, check_finite=False)
                acc = torch.zeros(pt.shape, dtype=torch.float32, device=worker.device)
                for w, x in zip([0.5] * len(tensors), tensors):
                    acc.add_(x, alpha=w)
                worker.params[pt.name].copy_(acc)
            _sync(worker.device)
            adds.append(time.perf_counter() - t)
        merge_s, add_s = statistics.median(merges), statistics.median(adds)
        out["methods"][method] = {
            "merge_s": round(merge_s, 5),
            "weighted_add_s": round(add_s, 5),
            "x_add": round(merge_s / add_s, 2),
            "h2d_bytes": int(statistics.median(bytes_in)),
        }
    out["peak_above_start_gib"] = round((_peak_mib() - start_rss) / 1024, 3)
    if worker.device.type == "cuda":  # the device's own peak (tensors), comparable with the plan
        out["peak_device_gib"] = round(torch.cuda.max_memory_allocated(worker.device) / GIB, 3)
    out["plan_gib"] = round(plan.device_gib + plan.host_gib, 3)
    out["plan_sources_and_model_gib"] = round((fp.sources + fp.model) / GIB, 3)
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-large", action="store_true", help="the demo zoo only")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--zoo", type=Path, default=None, help="a demo zoo directory (default: the demo preset's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--one", nargs=3, metavar=("PATHS", "PLACEMENT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        paths, placement, dtype = args.one
        methods = args.methods.split(",")
        print(json.dumps(one(paths.split(","), placement, dtype, args.repeats, args.threads, methods, args.device)))
        return
    from evomerge.fitness.presets import ensure_preset
    from evomerge.fitness.zoo import load_zoo

    zoo = args.zoo or ensure_preset("demo")
    models = load_zoo(zoo)["models"]
    cases = {"demo zoo (float32)": ([str(zoo / models[n]["path"]) for n in ("base", "add", "rev")], "float32")}
    with tempfile.TemporaryDirectory(prefix="evomerge-candidate-cost-") as work:
        if not args.skip_large:
            t = time.perf_counter()
            cases["~1B Llama (bfloat16)"] = (make_large(Path(work) / "large", zoo / models["base"]["path"]), "bfloat16")
            print(f"~1B Llama written in {time.perf_counter() - t:.0f} s", flush=True)
        for name, (paths, dtype) in cases.items():
            for placement in ("resident", "streamed"):
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads)]
                cmd += ["--methods", args.methods, "--device", args.device]
                cmd += ["--one", ",".join(paths), placement, dtype]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                print(name, res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
