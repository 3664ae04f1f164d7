"""How many workers, on which device, with how many threads or GPUs each: from the
resources of the machines that run them (a Ray cluster's nodes, or this machine),
never from the process that plans the search.

* ``device: auto`` is ``cuda`` when some node offers a GPU; ``device: cuda`` on
  nodes without one is refused.
* GPU workers: each holds ``gpus_per_worker`` GPUs of one node (a candidate's layers
  split over them); ``workers: auto`` is as many as the nodes hold, a number is
  capped there.
* CPU workers: ``threads_per_worker`` threads each, by default a node's cores shared
  by the workers it gets (Ray spreads them over the nodes); ``workers: auto`` is one
  worker per node, with all that node's cores (the smallest node's count).

Nothing here starts Ray: :func:`cluster_nodes` reads a cluster the caller joined.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Node:
    """What one machine offers the workers."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class Placement:
    """The workers of a search: how many, on GPUs or CPUs, and what each holds."""

    gpus: bool
    workers: int
    threads: int | None  # CPU threads of each worker (None on GPUs: torch's default)
    gpus_per_worker: int = 1


def local_nodes() -> list[Node]:
    """This machine, for a local Ray or an in-process worker."""
    import torch

    return [Node(float(os.cpu_count() or 1), float(torch.cuda.device_count() if torch.cuda.is_available() else 0))]


def cluster_nodes(ray_nodes: list[dict[str, Any]]) -> list[Node]:
    """The alive nodes of a Ray cluster, from ``ray.nodes()``."""
    return [
        Node(float(n.get("Resources", {}).get("CPU", 0)), float(n.get("Resources", {}).get("GPU", 0)))
        for n in ray_nodes
        if n.get("Alive")
    ]


def place(
    nodes: list[Node],
    *,
    device: Literal["auto", "cpu", "cuda"],
    workers: int | Literal["auto"],
    threads: int | None = None,
    gpus_per_worker: int = 1,
    where: str = "this machine",
) -> Placement:
    """The placement of ``workers`` on ``nodes`` (``where`` names them in errors)."""
    most_gpus = max((n.gpus for n in nodes), default=0.0)
    gpus = device == "cuda" or (device == "auto" and most_gpus >= 1)
    if device == "cuda" and most_gpus < 1:
        raise EvomergeError(f"device: cuda, but {where} has no GPU")
    if not gpus:
        if gpus_per_worker > 1:
            raise EvomergeError(f"gpus_per_worker: {gpus_per_worker}, but the workers run on CPUs ({where} has no GPU)")
        return _cpu_placement(nodes, workers, threads)
    if gpus_per_worker > most_gpus:
        raise EvomergeError(
            f"gpus_per_worker: {gpus_per_worker}, but no node of {where} has more than {most_gpus:g} GPU(s)"
        )
    fits = sum(math.floor(n.gpus / gpus_per_worker) for n in nodes)
    n = fits if workers == "auto" else min(workers, fits)
    return Placement(True, max(1, n), None, gpus_per_worker)


def _cpu_placement(nodes: list[Node], workers: int | Literal["auto"], threads: int | None) -> Placement:
    cores = [max(1, math.floor(n.cpus)) for n in nodes if n.cpus >= 1] or [1]
    if workers == "auto":
        each = threads or min(cores)
        return Placement(False, max(1, sum(c // each for c in cores)), each)
    per_node = math.ceil(workers / len(cores))  # Ray spreads the workers over the nodes
    return Placement(False, workers, threads or max(1, min(cores) // per_node))
