"""Small deterministic model directories for tests, benchmarks and examples.

Models are made from a transformers config with seeded random weights, and
fine-tunes are the base plus a seeded perturbation, so that task vectors are
small against the weights as in real fine-tunes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def llama_config(hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int | None = None, heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def save_model(state: dict[str, torch.Tensor], config, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``state`` as a Hugging Face model directory (safetensors + config.json)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(path)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def random_llama_state(config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config`` (a LlamaForCausalLM state dict)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = 0.02 * torch.randn(p.shape, generator=gen)
    return state


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.005) -> dict[str, torch.Tensor]:
    """``state`` plus seeded Gaussian noise: a stand-in fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def make_family(
    root: Path, n_finetunes: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg
) -> list[Path]:
    """A base and ``n_finetunes`` fine-tunes under ``root``: [base, ft1, ft2, ...]."""
    config = llama_config(**cfg)
    base = random_llama_state(config, seed)
    paths = [save_model(base, config, root / "base", dtype)]
    for i in range(n_finetunes):
        paths.append(save_model(perturbed(base, seed + 1 + i), config, root / f"ft{i + 1}", dtype))
    return paths


def populate_hub_cache(cache: Path, repo_id: str, model_dir: Path, *, commit: str, branch: str = "main") -> Path:
    """Lay ``model_dir`` out in a Hugging Face Hub cache as ``huggingface_hub`` would after a
    download of ``repo_id`` at ``commit`` (blobs, a snapshot of links, a ref for ``branch``);
    return the snapshot directory."""
    import hashlib
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        if not link.exists():
            link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


class RayCluster:
    """A real Ray cluster on this machine, for tests and benchmarks: a head and worker
    nodes, each its own raylet started with `ray start --block` in a process group of its
    own, ``cpus`` CPUs and no GPU each, in the environment ``env``. A worker node started
    with ``hide`` runs in a mount namespace of its own (`unshare -m`, as root) with an
    empty tmpfs over each of those directories: a machine that cannot see them."""

    def __init__(self, cpus: int = 1, env: dict[str, str] | None = None):
        self.env = env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        local = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment
        self.exe = str(local) if local.is_file() else "ray"
        self.ray_start = [sys.executable, "-c", _PATIENT_RAY_START, "start"]  # `ray start`
        self.common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats", "--block"]
        self.nodes: list[subprocess.Popen] = []
        self.jobs_address: str | None = None
        self.logs = Path(tempfile.mkdtemp(prefix="evomerge-ray-nodes-"))

    def _start(self, cmd: list[str]) -> subprocess.Popen:
        # each node's agent ports named up front: a raylet waits for a dynamic port's file
        # only so long, and on a loaded machine its agent may not write it in time (the
        # raylet then exits: "Timed out waiting for file .../metrics_agent_port_...")
        ports = ["--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
        cmd = [*cmd, *(arg for flag in ports for arg in (flag, str(free_port())))]
        with open(self.logs / f"node{len(self.nodes)}.log", "w") as out:  # `ray start`'s own words, for a failure
            node = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=out, stderr=out)
        self.nodes.append(node)
        return node

    def said(self) -> str:
        return "".join(f"\n--- {f.name}:\n" + f.read_text()[-1500:] for f in sorted(self.logs.glob("node*.log")))

    def start_head(self, *, jobs: bool = False, tries: int = 4) -> None:
        """Start the head node and wait until its raylet has registered (and, with ``jobs``,
        its job server answers: the dashboard that `ray job submit --address`
        :attr:`jobs_address` talks to; it needs ``ray[default]``). Started again, on fresh
        ports, when it does not come up."""
        for _ in range(tries):
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            head = [*self.ray_start, "--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1"]
            self.jobs_address = None
            if jobs:
                port = free_port()
                self.jobs_address = f"http://127.0.0.1:{port}"
                head += ["--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port)]
            else:
                head.append("--include-dashboard=false")
            node = self._start([*head, *self.common])
            if self._came_up(node, lambda: _answers(self.address, self.jobs_address)):
                return
            self.kill(node)
        raise RuntimeError(f"the Ray head did not start in {tries} tries" + self.said())

    def _came_up(
        self, node: subprocess.Popen, answers: Callable[[], bool] = lambda: True, timeout: float = 240
    ) -> bool:
        """Wait until ``node`` says its raylet is known to the GCS ("Ray runtime started",
        printed once it registered) and ``answers()``; False when it exits or the time is up."""
        log = self.logs / f"node{self.nodes.index(node)}.log"
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text() or not answers():
            if node.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def submit(self, entrypoint: Sequence[str], timeout: float = 600, tries: int = 4) -> subprocess.CompletedProcess:
        """`ray job submit` of ``entrypoint`` to the head's job server (:meth:`start_head`
        with ``jobs``), waiting for the job's end. Submitted again when the server says to
        try later: it waits only 10 s for the head's agent, which a loaded machine can miss
        ("No available agent to submit job, please try again later")."""
        cmd = [self.exe, "job", "submit", "--address", str(self.jobs_address), "--", *entrypoint]
        for _ in range(tries):
            res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "try again later" not in res.stdout + res.stderr:
                return res
            time.sleep(5)
        return res

    def add_worker(self, hide: Sequence[Path] = (), cpus: int | None = None, tries: int = 4) -> subprocess.Popen:
        """Start a worker node (``cpus`` CPUs, else the cluster's count) and wait until the
        cluster knows it. One at a time, and started again when it does not come up."""
        common = list(self.common)
        if cpus is not None:
            common[common.index("--num-cpus") + 1] = str(cpus)
        cmd = [*self.ray_start, "--address", self.address, *common]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs evomerge-hidden {shlex.quote(str(d))}" for d in hide)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
        for _ in range(tries):
            node = self._start(cmd)
            if self._came_up(node):
                return node
            self.kill(node)
        raise RuntimeError(f"a Ray node did not start in {tries} tries" + self.said())

    def kill(self, node: subprocess.Popen) -> None:
        """kill -9 of a node: its raylet, its workers and everything else it started."""
        try:
            os.killpg(node.pid, signal.SIGKILL)  # a node's raylet and workers share its process group
        except ProcessLookupError:
            pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        # `ray start` records its cluster for later `ray.init()` calls to join; it is gone now
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()
        shutil.rmtree(self.logs, ignore_errors=True)


# `ray start`, given more time for its raylet to register. Ray allows a fixed 30 s
# (ray/_private/node.py: raylet_start_wait_time_s) and then kills the node it started:
# "The current node timed out during startup". A 2-core machine that runs tests beside it
# can miss that, for a head whose dashboard starts a dozen Python processes at once. Its
# lookup of the node (services.get_node, which raises until the raylet registered) keeps
# trying for 150 s here, and then fails as before: a node that never registers still
# ends its start (the caller's tries start it again).
_PATIENT_RAY_START = """
import sys, time
import ray._private.services as services
from ray.scripts.scripts import main

lookup = services.get_node

def patient(*args, **kwargs):
    deadline = time.monotonic() + 150
    while True:
        try:
            return lookup(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

services.get_node = patient
sys.argv[0] = "ray"
sys.exit(main())
"""


def _answers(address: str, jobs: str | None) -> bool:
    """Whether the head's GCS takes connections, and its job server (when asked) answers."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        if jobs:  # the job module answers (the dashboard starts its modules as processes of their own)
            with urllib.request.urlopen(f"{jobs}/api/jobs/", timeout=5) as reply:
                return reply.status == 200
        return True
    except OSError:  # urllib's URLError is one
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
