"""The Ray dispatcher on a real local cluster: steady-state pool, actor death, timeouts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from evomerge.experiments.run import RunOptions, prepare, run_experiment, run_jobs
from evomerge.search.worker import Job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    from evomerge.search.ray_pool import init_ray

    marker = tmp_path_factory.mktemp("faults") / "slow-start"
    faults = {"EVOMERGE_TEST_FAULTS": "101=die,102=hang,103=raise", "EVOMERGE_TEST_SLOW_START": str(marker)}
    os.environ.update(faults)
    init_ray(None, 2, env_vars={"PYTHONPATH": str(ROOT), **faults})
    yield ray
    ray.shutdown()
    for key in faults:
        os.environ.pop(key, None)


def test_dead_actor_is_replaced_and_its_job_retried_and_timeouts_fail(ray_cluster, tiny_cfg):
    from evomerge.search.ray_pool import RayDispatcher

    from .faulty import FaultyWorker

    prep = prepare(tiny_cfg(workers=2), log=lambda _: None)
    recipe = prep.space.recipe(prep.space.default_params()).to_dict()
    pool = RayDispatcher(prep.spec, 2, gpus=False, job_timeout=10, worker_cls=FaultyWorker)
    Path(os.environ["EVOMERGE_TEST_SLOW_START"]).touch()  # replacements now start slower than a job may run
    try:
        start = time.monotonic()
        results = run_jobs(pool, [Job(k, recipe, seed=0) for k in (100, 101, 102, 103, 104)])
    finally:
        pool.close()
    assert results[100].ok and results[104].ok
    assert results[101].ok, results[101].error  # died once, retried on a fresh (slow-starting) actor
    assert "timed out" in (results[102].error or "")
    assert results[103].error == "injected merge failure"
    assert results[101].value == results[100].value  # the same recipe gives the same score
    # one for the death, one for the timeout (a loaded machine may also find a live actor
    # unreachable for a moment: Ray's ActorUnavailableError, replaced like a death)
    assert pool.replaced >= 2
    assert time.monotonic() - start < 75


def test_run_experiment_on_ray_writes_summary(ray_cluster, tiny_cfg, tmp_path):
    cfg = tiny_cfg(workers=2)
    summary = run_experiment(cfg, tmp_path / "run", RunOptions(quiet=True))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["trials"] == {"complete": 6, "pruned": 0, "failed": 0, "interrupted": 0}
    assert saved["nodes"] == 1 and len(saved["node_busy_fraction"]) == 1  # a local Ray: one node
    for key in (
        "best_trial",
        "best_fitness",
        "best_test_fitness",
        "best_recipe",
        "sources",
        "baselines",
        "samples_scored",
        "worker_busy_fraction",
        "wall_seconds",
    ):
        assert key in saved
    assert set(saved["sources"]) == {*cfg.models, cfg.base_model} and "default_merge" in saved["baselines"]
    assert 0 < saved["worker_busy_fraction"] <= 1.0
    from evomerge.operators.recipe import Recipe

    recipe = Recipe.from_yaml(saved["best_recipe"])
    assert recipe.merge_method == "task_arithmetic" and Path(recipe.base_model).is_dir()
    import optuna

    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert study.trials[summary["best_trial"]].value == pytest.approx(summary["best_fitness"])


@pytest.mark.parametrize("first", [0, 1])
def test_the_job_a_dead_actor_was_running_is_the_culprit_whichever_result_comes_in_first(first):
    """Both results of a dead actor (the job it ran, the one queued behind it) fail at once,
    in either order; only the job it ran counts the death as an attempt. Collecting the
    queued one first restarts the other's clock, which must not make the queued one look older."""
    from evomerge.search.ray_pool import RayDispatcher, _Running

    pool = RayDispatcher.__new__(RayDispatcher)
    actor = object()
    runs = [_Running(Job(k, {}, seed=0), actor, 0, started=100.0 + k, seq=k) for k in (1, 2)]
    pool.running = {f"ref{k}": run for k, run in enumerate(runs)}
    pool.culprits = {}
    verdicts = {}
    for k in (first, 1 - first):  # what _collect does for each failed result, in arrival order
        run = pool.running.pop(f"ref{k}")
        pool._restart_clock(run.actor)
        verdicts[run.job.key] = pool._culprit(run) == run.job.key
    assert verdicts == {1: True, 2: False}


def test_a_local_ray_start_that_misses_the_registration_window_is_started_again(monkeypatch):
    """Ray gives a new node a fixed 30 s to register; on a loaded machine the first start
    can miss it. What that start left running is stopped (and nothing older), then Ray is
    started again; a start that keeps failing is one line."""
    import subprocess
    import sys

    import ray

    from evomerge.errors import EvomergeError
    from evomerge.search import ray_pool

    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    left: list[subprocess.Popen] = []
    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:  # a start that left its processes behind
            left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    try:
        ray_pool._start_local(1, None)
        assert calls == ["local", "local"]
        assert left[0].wait(timeout=10) is not None and older.poll() is None
        calls.clear()
        monkeypatch.setattr(ray_pool, "STARTUP_TRIES", 1)
        with pytest.raises(EvomergeError, match="did not start in 1 tries"):
            ray_pool._start_local(1, None)
    finally:
        older.kill()
        older.wait()
