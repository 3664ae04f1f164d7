"""Merge speed and memory against the I/O floor (and mergekit 0.1.5 when installed).

Makes a base and three fine-tunes of a ~170M-parameter bf16 Llama (random weights
from a transformers config), then, side by side in one run and each in its own
process: the I/O floor (read every input tensor once, write the output), evomerge
linear and TIES, and mergekit's on the same YAML. Reports the best of N repeats
and each run's peak RSS.

    python bench/merge_speed.py [--repeats 2] [--work DIR] [--mergekit PATH_TO_mergekit-yaml]

Without ``--work`` the models go to a fresh temporary directory, removed at the end.
A ``--work`` directory must be new, empty, or one this script made before (its models
are then reused); nothing else in it is touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = ".evomerge-bench"  # marks a work directory as this script's
SIZE = dict(hidden=768, intermediate=3072, layers=12, vocab=32000, heads=12)

TIES = """merge_method: ties
base_model: {w}/base
dtype: bfloat16
parameters: {{normalize: true}}
models:
  - {{model: {w}/ft1, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {w}/ft2, parameters: {{weight: 0.3, density: 0.4}}}}
  - {{model: {w}/ft3, parameters: {{weight: 0.2, density: 0.6}}}}
"""
LINEAR = """merge_method: linear
dtype: bfloat16
models:
  - {{model: {w}/ft1, parameters: {{weight: 0.5}}}}
  - {{model: {w}/ft2, parameters: {{weight: 0.3}}}}
  - {{model: {w}/ft3, parameters: {{weight: 0.2}}}}
"""


def make_models(work: Path) -> None:
    import torch

    from evomerge.testing import llama_config, perturbed, random_llama_state, save_model

    if (work / "ft3" / "model.safetensors").exists():
        return
    cfg = llama_config(**SIZE)
    base = random_llama_state(cfg, 0)
    save_model(base, cfg, work / "base", torch.bfloat16)
    for i in range(3):
        save_model(perturbed(base, i + 1, scale=0.002), cfg, work / f"ft{i + 1}", torch.bfloat16)
    n = sum(v.numel() for v in base.values())
    print(f"made base + 3 fine-tunes: {n / 1e6:.0f}M parameters each, bf16", flush=True)


def timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command in its own process."""
    shutil.rmtree(out, ignore_errors=True)
    wrapper = [sys.executable, str(HERE / "_peak_rss.py"), *cmd]
    start = time.perf_counter()
    res = subprocess.run(wrapper, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    rss = float(res.stderr.strip().splitlines()[-1].split()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss


def work_dir(given: Path | None) -> tuple[Path, bool]:
    """The work directory and whether to remove it at the end (only a temporary one)."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="evomerge-bench-")), True
    work = given.resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARK).exists():
        raise SystemExit(f"{work}: not empty and not made by this script; give a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARK).touch()
    return work, False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temporary directory)")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    args = ap.parse_args()
    work, temporary = work_dir(args.work)
    try:
        run(work, args)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    make_models(work)
    for name, text in (("ties", TIES), ("linear", LINEAR)):
        (work / f"{name}.yml").write_text(text.format(w=work))
    out = work / "out"
    em = [sys.executable, "-m", "evomerge.cli", "merge", "--quiet"]
    runs = {
        "io_floor": [sys.executable, str(HERE / "_io_floor.py"), str(work), str(out)],
        "evomerge_linear": [*em, str(work / "linear.yml"), str(out)],
        "evomerge_ties": [*em, str(work / "ties.yml"), str(out)],
    }
    if args.mergekit:
        runs["mergekit_ties"] = [args.mergekit, str(work / "ties.yml"), str(out)]
        runs["mergekit_linear"] = [args.mergekit, str(work / "linear.yml"), str(out)]
    best: dict[str, tuple[float, float]] = {}
    for rep in range(args.repeats):
        for name, cmd in runs.items():
            wall, rss = timed(cmd, out)
            print(f"[{rep}] {name:16s} {wall:7.2f} s  peak {rss:7.0f} MiB", flush=True)
            prev = best.get(name)
            best[name] = (min(wall, prev[0]) if prev else wall, max(rss, prev[1]) if prev else rss)
    floor = best["io_floor"][0]
    report = {
        name: {"seconds": round(w, 2), "peak_rss_mib": round(r), "x_io_floor": round(w / floor, 2)}
        for name, (w, r) in best.items()
    }
    if "mergekit_ties" in best:
        report["ratios"] = {
            "ties_speedup_vs_mergekit": round(best["mergekit_ties"][0] / best["evomerge_ties"][0], 2),
            "ties_peak_rss_vs_mergekit": round(best["evomerge_ties"][1] / best["mergekit_ties"][1], 2),
            "linear_peak_rss_vs_mergekit": round(best["evomerge_linear"][1] / best["mergekit_linear"][1], 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
