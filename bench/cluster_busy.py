"""How busy the workers are on a multi-node Ray cluster: the demo search (configs/demo.yaml)
on a cluster started on this machine with `ray start` (a head and ``--nodes - 1`` worker
nodes, one CPU each), `workers: auto` (one worker per node), run with `evomerge run
--ray-address`. Prints summary.json's busy fraction of the workers and of each node.

    python bench/cluster_busy.py --zoo DIR [--nodes 3] [--trials 48]

``DIR`` is a built demo zoo (`evomerge zoo --out DIR`). The nodes share this machine's
cores: the figure measures what dispatch and the driver cost the workers, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from evomerge.testing import RayCluster

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--trials", type=int, default=48)
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(zoo=str(args.zoo.resolve()), workers="auto", device="cpu")
    cfg["search"]["trials"] = args.trials
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="evomerge-cluster-busy-") as work:
        path = Path(work) / "demo.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cluster = RayCluster(cpus=1, env=env)
        try:
            cluster.start_head()
            for _ in range(args.nodes - 1):
                cluster.add_worker()
            run = Path(work) / "run"
            cmd = [sys.executable, "-m", "evomerge.cli", "run", str(path), "--out", str(run)]
            cmd += ["--ray-address", cluster.address, "--quiet", "--tracking-uri", f"sqlite:///{work}/mlflow.db"]
            subprocess.run(cmd, env=env, check=True)
        finally:
            cluster.stop()
        s = json.loads((run / "summary.json").read_text())
    print(f"{args.nodes} nodes, {s['workers']} workers, {s['trials']['complete']} trials, {s['wall_seconds']:.1f} s")
    print(f"worker busy fraction: {s['worker_busy_fraction']:.3f}")
    for node, busy in s["node_busy_fraction"].items():
        print(f"  node {node}: {busy:.3f} worker-seconds per second")


if __name__ == "__main__":
    main()
