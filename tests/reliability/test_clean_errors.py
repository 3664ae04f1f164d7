"""Faults of the machinery around a search, as the user meets them through the real CLI
in a subprocess: one line naming what is wrong, exit status 2, no traceback, no hang,
and the run directory left as it was or resumable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.testing import free_port

from ..cli import one_line_error, run_cli
from .common import cli_env, ray_cluster, write_experiment

pytestmark = pytest.mark.slow

MERGE = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}}}


def _config(zoo: Path, tmp_path: Path, **extra) -> Path:
    path = write_experiment(
        zoo, tmp_path / "exp.yaml", name="errors", merge=MERGE, search={"trials": 3, "seed": 0}, samples=20
    )
    if extra:
        data = yaml.safe_load(path.read_text())
        data.update(extra)
        path.write_text(yaml.safe_dump(data))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path / "mlflow.db")


def _no_trial_left_running(run: Path) -> None:
    """The run directory can be resumed: its config is there, no trial was left RUNNING."""
    import optuna

    assert (run / "config.yaml").is_file()
    if (run / "study.db").exists():
        study = optuna.load_study(study_name="errors", storage=f"sqlite:///{run / 'study.db'}")
        assert not [t for t in study.trials if t.state.name == "RUNNING"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"device": "cuda"}, "device: cuda, but this machine has no GPU"),
        ({"gpus_per_worker": 2}, "gpus_per_worker: 2, but the workers run on CPUs (this machine has no GPU)"),
        ({"workers": 0}, "workers: 0; a number of workers is at least 1, or auto"),
    ],
)
def test_workers_this_machine_cannot_hold_are_one_line_and_write_nothing(tiny_zoo, tmp_path, extra, message):
    path = _config(tiny_zoo, tmp_path, **extra)
    err = one_line_error(run_cli("run", str(path), "--out", str(tmp_path / "run"), env=_env(tmp_path)))
    assert message in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def ray_head():
    """A Ray cluster of its own (one node, 1 CPU, no GPU) started with `ray start`; torn down after."""
    with ray_cluster(workers=0) as cluster:
        yield cluster.address


def test_an_unreachable_ray_address_is_one_line_at_once(tiny_zoo, tmp_path):
    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    res = run_cli("run", str(_config(tiny_zoo, tmp_path)), "--out", str(run), "--ray-address", address, "--quiet",
                  env=_env(tmp_path), timeout=120)  # fmt: skip
    err = one_line_error(res)
    assert f"--ray-address {address}" in err and "no Ray cluster answers" in err
    assert time.monotonic() - start < 60  # Ray alone retries for many minutes
    assert not run.exists()  # the cluster is joined (to place the workers) before anything is written


def test_a_worker_that_cannot_load_its_sources_is_one_line(tiny_zoo, tmp_path):
    """A source the driver never reads (only the first model is opened before the pool
    starts) is truncated: each actor's constructor fails, and the user reads why."""
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    weights = next((zoo / "sort").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    run = tmp_path / "run"
    res = run_cli("run", str(_config(zoo, tmp_path)), "--out", str(run), "--quiet", env=_env(tmp_path))
    err = one_line_error(res)
    assert err.startswith("evomerge run: error: workers: a worker could not start:") and "sort" in err
    _no_trial_left_running(run)


def test_a_cluster_without_the_resources_is_one_line_never_a_wait(tiny_zoo, tmp_path, ray_head):
    """On a real cluster (`ray start`, one node of 1 CPU, no GPU): `device: cuda` (before the
    run directory is written) and a worker wider than any node are refused before any actor
    waits; workers that could run but find no free node stop at the start timeout (the
    second of two 1-CPU workers here)."""
    env = _env(tmp_path)
    cuda = _config(tiny_zoo, tmp_path, device="cuda")
    err = one_line_error(run_cli("run", str(cuda), "--out", str(tmp_path / "a"), "--ray-address", ray_head, env=env))
    assert "device: cuda, but the Ray cluster at " in err and err.endswith("has no GPU")
    assert not (tmp_path / "a").exists()  # placed from the cluster's nodes before anything is written
    wide = _config(tiny_zoo, tmp_path, threads_per_worker=4)
    err = one_line_error(run_cli("run", str(wide), "--out", str(tmp_path / "b"), "--ray-address", ray_head, env=env))
    assert "a worker needs 4 CPUs, but the largest of the Ray cluster's 1 node(s) has 1" in err
    two = _config(tiny_zoo, tmp_path, workers=2, threads_per_worker=1, worker_start_timeout_s=10)
    start = time.monotonic()
    res = run_cli("run", str(two), "--out", str(tmp_path / "c"), "--ray-address", ray_head, env=env, timeout=240)
    err = one_line_error(res)
    assert "did not start within 10 s" in err and time.monotonic() - start < 200
    _no_trial_left_running(tmp_path / "c")


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:3", "no CUDA device is available"),
        ("meta", "evomerge merges on cpu, cuda or cuda:N"),
        ("tpu", "not a device"),
    ],
)
def test_a_merge_device_that_does_not_exist_is_one_line(family, tmp_path, device, message):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {family[1]}\n  - model: {family[2]}\n")
    err = one_line_error(run_cli("merge", str(recipe), str(tmp_path / "out"), "--device", device))
    assert f"--device {device}: {message}" in err and not (tmp_path / "out").exists()


def test_a_cuda_index_out_of_range_is_refused(monkeypatch):
    """On a machine with two GPUs (faked: this one has none), cuda:2 names no device."""
    import torch

    from evomerge.errors import EvomergeError
    from evomerge.operators.engine import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(EvomergeError, match=r"2 CUDA device\(s\): cuda:0 to cuda:1"):
        pick_device("cuda:2")


def test_an_unreachable_tracking_server_is_refused_before_anything_is_written(tiny_zoo, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    start = time.monotonic()
    res = run_cli("run", str(_config(tiny_zoo, tmp_path)), "--out", str(run), "--tracking-uri", uri, "--quiet",
                  env=_env(tmp_path), timeout=120)  # fmt: skip
    err = one_line_error(res)
    assert f"tracking store {uri}: cannot be reached" in err and "Connection refused" in err
    assert not run.exists() and time.monotonic() - start < 60


def test_export_checks_the_tracking_store_before_writing(tiny_zoo, tmp_path):
    from evomerge.experiments.run import RunOptions, run_experiment

    from ..search.conftest import tiny_config

    run = tmp_path / "run"
    run_experiment(tiny_config(tiny_zoo, name="errors").resolved(), run, RunOptions(quiet=True, in_process=True,
                   tracking_uri=f"sqlite:///{tmp_path / 'store.db'}"))  # fmt: skip
    uri = f"http://127.0.0.1:{free_port()}"
    res = run_cli("export", str(run), str(tmp_path / "out"), "--tracking-uri", uri, env=_env(tmp_path))
    assert f"tracking store {uri}: cannot be reached" in one_line_error(res)
    assert not [p for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out")]


def test_a_read_only_run_directory_is_one_line(tiny_zoo, tmp_path):
    """`evomerge resume` of a run directory on a read-only file system (a bind mount in a
    mount namespace of its own): its first write fails, and the user is told so."""
    from evomerge.experiments.run import RunOptions, run_experiment

    from ..search.conftest import tiny_config

    run = tmp_path / "run"
    cfg = tiny_config(tiny_zoo, name="errors").resolved()
    run_experiment(cfg, run, RunOptions(quiet=True, in_process=True, track=False))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for this test"
    script = (
        f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && "
        f"exec {subprocess.list2cmdline([sys.executable, '-m', 'evomerge.cli', 'resume', str(run), '--quiet'])}"
    )
    res = subprocess.run([unshare, "-m", "sh", "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    err = one_line_error(res)
    assert f"{run / '.session.lock'}: cannot write (Read-only file system)" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_summary_that_cannot_be_written_is_one_line_and_the_run_resumes(tiny_zoo, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").mkdir()  # in the way: the rename onto it fails (EISDIR), as a full disk would fail
    env = _env(tmp_path)
    path = _config(tiny_zoo, tmp_path)
    err = one_line_error(run_cli("run", str(path), "--out", str(run), "--quiet", env=env))
    assert f"{run / 'summary.json'}: cannot write" in err
    _no_trial_left_running(run)
    (run / "summary.json").rmdir()
    res = run_cli("resume", str(run), "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "summary.json").is_file()


def test_a_second_driver_of_one_run_directory_is_refused(tiny_zoo, tmp_path):
    """While one process drives a run directory (here: this test holds its session), a
    second `evomerge resume` of it is refused instead of asking and telling the same
    study and logging its trials twice."""
    from evomerge.experiments.run import RunOptions, run_experiment
    from evomerge.experiments.rundir import RunDir

    from ..search.conftest import tiny_config

    run = tmp_path / "run"
    run_experiment(tiny_config(tiny_zoo, name="errors").resolved(), run, RunOptions(quiet=True, in_process=True,
                   track=False))  # fmt: skip
    with RunDir(run).session():
        err = one_line_error(run_cli("resume", str(run), "--quiet", env=_env(tmp_path)))
    assert f"{run}: another evomerge process is running this run directory" in err
    res = run_cli("status", str(run))
    assert res.returncode == 0, res.stderr  # status only reads: never refused
