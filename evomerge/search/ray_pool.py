"""A pool of Ray actors, each a :class:`MergeWorker` with the sources resident.

Steady state, no generation barrier: a worker that frees up gets the next job at
once; each actor holds one job queued behind the running one, so it never idles
while the driver tells Optuna a result and asks for the next trial. An actor that
dies is replaced and its job retried once; a job that runs past its timeout (from
its real start) has its actor killed and replaced, and comes back failed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

from evomerge.search.worker import Job, JobResult, MergeWorker, WorkerSpec


def init_ray(address: str | None, num_cpus: int | None, *, env_vars: dict[str, str] | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )


@dataclass
class _Running:
    job: Job
    actor: Any
    slot: int
    started: float


class RayDispatcher:
    """Jobs on a pool of ``workers`` actors (one GPU each when ``gpus``, else CPU threads)."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        *,
        gpus: bool,
        job_timeout: float,
        max_retries: int = 1,
        worker_cls: type = MergeWorker,
        queue_depth: int = 2,
    ):
        import ray

        self.ray = ray
        self.spec = spec
        self.workers = workers
        self.job_timeout = job_timeout
        self.max_retries = max_retries
        cpus = spec.threads or 1
        self._actor_cls: Any = ray.remote(num_cpus=0 if gpus else cpus, num_gpus=1 if gpus else 0, max_restarts=0)(
            worker_cls
        )
        self.actors: list[Any] = [self._start() for _ in range(workers)]
        ray.get([a.ready.remote() for a in self.actors])  # the search clock starts with the pool ready
        self.free: list[int] = [slot for _ in range(queue_depth) for slot in range(workers)]
        self.running: dict[Any, _Running] = {}
        self.retry: list[Job] = []
        self.replaced = 0

    def _start(self):
        return self._actor_cls.remote(self.spec)

    def idle(self) -> int:
        return len(self.free) - len(self.retry)

    def submit(self, job: Job) -> None:
        slot = self.free.pop(0)
        actor = self.actors[slot]
        ref = actor.run.remote(job)
        self.running[ref] = _Running(job, actor, slot, time.monotonic())

    def _replace(self, actor) -> None:
        """Kill ``actor`` and start a fresh one in its slot (once, whoever notices first)."""
        if actor not in self.actors:
            return
        slot = self.actors.index(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass
        self.actors[slot] = self._start()
        self.replaced += 1

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        while self.retry and self.free:
            self.submit(self.retry.pop(0))
        if not self.running:
            return []
        step = 1.0 if timeout is None else min(timeout, 1.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=step)
            results = [self._collect(ref) for ref in done]
            results += self._expire()
            finished = [r for r in results if r is not None]
            while self.retry and self.free:
                self.submit(self.retry.pop(0))
            if finished or (deadline is not None and time.monotonic() >= deadline) or not self.running:
                return finished

    def _collect(self, ref) -> JobResult | None:
        run = self.running.pop(ref)
        self.free.append(run.slot)
        self._restart_clock(run.actor)
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            self._replace(run.actor)
            if run.job.attempt < self.max_retries:
                self.retry.append(replace(run.job, attempt=run.job.attempt + 1))
                return None
            return JobResult(run.job.key, error="worker died twice", fraction=run.job.fraction, split=run.job.split)
        except self.ray.exceptions.RayTaskError as err:
            return JobResult(run.job.key, error=str(err).strip().splitlines()[-1], fraction=run.job.fraction)

    def _restart_clock(self, actor) -> None:
        """The job queued next on ``actor`` starts now: its timeout counts from here."""
        queued = [r for r in self.running.values() if r.actor is actor]
        if queued:
            nxt = min(queued, key=lambda r: r.started)
            nxt.started = max(nxt.started, time.monotonic())

    def _expire(self) -> list[JobResult]:
        now = time.monotonic()
        out = []
        executing: dict[int, Any] = {}
        for ref, run in self.running.items():  # an actor runs its oldest job; the others wait
            key = id(run.actor)
            if key not in executing or run.started < self.running[executing[key]].started:
                executing[key] = ref
        for ref in list(executing.values()):
            run = self.running[ref]
            if now - run.started > self.job_timeout:
                self.running.pop(ref)
                self._replace(run.actor)
                self.free.append(run.slot)
                msg = f"timed out after {self.job_timeout:.0f} s"
                out.append(JobResult(run.job.key, error=msg, fraction=run.job.fraction, split=run.job.split))
        return out

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
