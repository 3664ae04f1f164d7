"""Where the workers go: counts, threads and GPUs from the nodes that run them."""

from __future__ import annotations

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.placement import Node, Placement, cluster_nodes, place


def test_cpu_workers_share_a_nodes_cores_and_auto_is_one_per_node():
    two_cores = [Node(2, 0)]
    assert place(two_cores, device="auto", workers=2) == Placement(False, 2, 1)
    assert place(two_cores, device="cpu", workers=1) == Placement(False, 1, 2)
    assert place(two_cores, device="cpu", workers=1, threads=1) == Placement(False, 1, 1)
    cluster = [Node(8, 0), Node(4, 0), Node(4, 0)]
    # auto: one worker per node with the smallest node's cores; a number is spread over the nodes
    assert place(cluster, device="auto", workers="auto") == Placement(False, 4, 4)
    assert place(cluster, device="auto", workers=6) == Placement(False, 6, 2)
    assert place(cluster, device="cpu", workers="auto", threads=2) == Placement(False, 8, 2)


def test_gpu_workers_come_from_the_nodes_gpus():
    cluster = [Node(16, 4), Node(16, 2), Node(8, 0)]
    assert place(cluster, device="auto", workers="auto") == Placement(True, 6, None, 1)
    assert place(cluster, device="cuda", workers="auto", gpus_per_worker=2) == Placement(True, 3, None, 2)
    assert place(cluster, device="auto", workers=10) == Placement(True, 6, None, 1)  # capped at the GPUs
    assert place(cluster, device="auto", workers=2, gpus_per_worker=4) == Placement(True, 1, None, 4)
    assert place(cluster, device="cpu", workers=2) == Placement(False, 2, 8)  # GPUs there, CPUs asked for


@pytest.mark.parametrize(
    "nodes, kwargs, message",
    [
        ([Node(4, 0)], {"device": "cuda"}, "device: cuda, but the Ray cluster at x:1 has no GPU"),
        (
            [Node(4, 2), Node(4, 2)],
            {"device": "cuda", "gpus_per_worker": 4},
            "gpus_per_worker: 4, but no node of the Ray cluster at x:1 has more than 2 GPU(s)",
        ),
        (
            [Node(4, 0)],
            {"device": "auto", "gpus_per_worker": 2},
            "gpus_per_worker: 2, but the workers run on CPUs (the Ray cluster at x:1 has no GPU)",
        ),
    ],
)
def test_impossible_placements_are_one_line(nodes, kwargs, message):
    with pytest.raises(EvomergeError) as err:
        place(nodes, workers="auto", where="the Ray cluster at x:1", **kwargs)
    assert str(err.value) == message


def test_the_cluster_is_its_alive_nodes():
    raw = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 1e10}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},
    ]
    assert cluster_nodes(raw) == [Node(8, 2), Node(4, 0)]
