"""A pool of Ray actors, each a :class:`MergeWorker` with the sources resident.

Steady state, no generation barrier: a worker that frees up gets the next job at
once; each actor holds one job queued behind the running one, so it never idles
while the driver tells Optuna a result and asks for the next trial. An actor that
dies is replaced and its job retried once; a job that runs past its timeout (from
its real start) has its actor killed and replaced, and comes back failed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.worker import Job, JobResult, MergeWorker, WorkerSpec
from evomerge.shipping import Files

START_TIMEOUT_S = 900.0  # how long the pool waits for its actors to start (loading the sources included)


def init_ray(address: str | None, num_cpus: int | None, *, env_vars: dict[str, str] | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one bound to 127.0.0.1.

    An address where nothing answers is refused at once: Ray itself retries for many
    minutes before it gives up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env: dict[str, Any] | None = {"env_vars": env_vars} if env_vars else None
    if address:
        probe_address(address)
        # evomerge itself travels with the job to nodes that lack it (its dependencies,
        # torch and transformers, must be installed there)
        runtime_env = {**(runtime_env or {}), "py_modules": [_package_dir()]}
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError ... here
            raise EvomergeError(f"--ray-address {address}: cannot join the Ray cluster ({_last_line(err)})") from None
    else:
        _start_local(num_cpus, runtime_env)


STARTUP_TRIES = 3


def _start_local(num_cpus: int | None, runtime_env: dict[str, Any] | None) -> None:
    """A local Ray instance of this process. Ray gives a new node a fixed 30 s to register,
    which a loaded machine can miss ("The current node timed out during startup"): the
    processes of the failed start are stopped and it is started again."""
    import psutil
    import ray

    for attempt in range(STARTUP_TRIES):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(
                address="local",  # a fresh instance, never a cluster that `ray start` left on this machine
                num_cpus=num_cpus,
                include_dashboard=False,
                runtime_env=runtime_env,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
                configure_logging=False,
            )
            return
        except Exception as err:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(err):
                raise
            _stop_children(before)
            if attempt == STARTUP_TRIES - 1:
                raise EvomergeError(
                    f"ray: the local Ray instance did not start in {STARTUP_TRIES} tries ({_last_line(err)}); "
                    "the machine is overloaded"
                ) from None


def _stop_children(before: set[int], wait: float = 10.0) -> None:
    """Stop what a failed Ray start left running: the processes this one started since
    (Ray's GCS, raylet and agents), not those in ``before``."""
    import psutil

    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=wait)


def _package_dir() -> str:
    import evomerge

    return str(Path(evomerge.__file__).parent)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a cluster address (``HOST:PORT`` or ``ray://HOST:PORT``) where no server
    accepts a connection; ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EvomergeError(f"--ray-address {address}: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise EvomergeError(f"--ray-address {address}: no Ray cluster answers there ({reason})") from None


def _last_line(err: BaseException) -> str:
    """The line of an error (often a remote traceback) that says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (causes or lines or [type(err).__name__])[-1]


@dataclass
class _Running:
    job: Job
    actor: Any
    slot: int
    started: float  # when its clock started: submitted, or (queued behind another) when that one ended
    seq: int  # submission order: an actor runs its calls in this order


class RayDispatcher:
    """Jobs on a pool of ``workers`` actors (``gpus_per_worker`` GPUs each when ``gpus``, else CPU threads)."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        *,
        gpus: bool,
        job_timeout: float,
        gpus_per_worker: int = 1,
        max_retries: int = 1,
        worker_cls: type = MergeWorker,
        queue_depth: int = 2,
        start_timeout: float = START_TIMEOUT_S,
        grow: bool = False,
    ):
        """``grow``: add workers while the search runs, as nodes join the cluster (``workers: auto``)."""
        import ray

        self.ray = ray
        self.spec = spec = _stored(ray, spec)
        self.workers = workers
        self.job_timeout = job_timeout
        self.start_timeout = start_timeout
        self.max_retries = max_retries
        # slots whose replacement actor is still starting (placed by Ray, loading its sources):
        # slot -> (its ready ref, asked at). A starting actor gets no job: where the cluster
        # lost the node, it waits for room (a node that joins) while the others work on
        self.pending: dict[int, tuple[Any, float]] = {}
        self.start_failures = 0
        # id(an actor that died) -> (the actor, kept so that its id is not reused; the job it was running)
        self.culprits: dict[int, tuple[Any, int]] = {}
        cpus = spec.threads or 1
        self.nodes: dict[int, str | None] = {}
        self.node_refs: dict[int, Any] = {}
        need = {"GPU": float(gpus_per_worker)} if gpus else {"CPU": float(cpus)}
        _check_offered(ray.nodes(), need)
        # SPREAD: on a cluster the workers go to different nodes while there are nodes to spare
        self._actor_cls: Any = ray.remote(
            num_cpus=0 if gpus else cpus,
            num_gpus=gpus_per_worker if gpus else 0,
            max_restarts=0,
            scheduling_strategy="SPREAD",
        )(worker_cls)
        self.actors: list[Any] = [self._start() for _ in range(workers)]
        self._await_ready(need, start_timeout)  # the search clock starts with the pool ready
        self.free: list[int] = [slot for _ in range(queue_depth) for slot in range(workers)]
        self.queue_depth, self.grow, self.need = queue_depth, grow, need
        self._grown_at = time.monotonic()
        self.running: dict[Any, _Running] = {}
        self.retry: list[Job] = []
        self.replaced = 0
        self.submitted = 0

    def _start(self):
        actor = self._actor_cls.remote(self.spec)
        # asked before any job: an actor runs its calls in order, so the answer is in before its first result
        self.node_refs[id(actor)] = actor.__ray_call__.remote(_node_id)
        return actor

    def _await_ready(self, need: dict[str, float], timeout: float) -> None:
        """Wait for every actor to hold its sources; an actor that fails to start, or a
        pool that cannot be placed within ``timeout``, is one clear error."""
        refs = [a.ready.remote() for a in self.actors]
        try:
            self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            self.close()
            wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
            raise EvomergeError(
                f"workers: {self.workers} worker(s) of {wanted} each did not start within {timeout:.0f} s "
                "(the Ray cluster has no free node for them; free resources or ask for fewer workers)"
            ) from None
        except self.ray.exceptions.RayError as err:
            self.close()
            raise EvomergeError(f"workers: a worker could not start: {_last_line(err)}") from None

    def idle(self) -> int:
        return len(self._usable()) - len(self.retry)

    def _usable(self) -> list[int]:
        """Free slots whose actor is up (not a replacement still starting)."""
        return [slot for slot in self.free if slot not in self.pending]

    def submit(self, job: Job) -> None:
        slot = self._usable()[0]
        self.free.remove(slot)
        actor = self.actors[slot]
        ref = actor.run.remote(job)
        self.submitted += 1
        self.running[ref] = _Running(job, actor, slot, time.monotonic(), self.submitted)

    def _replace(self, actor) -> None:
        """Kill ``actor`` and start a fresh one in its slot (once, whoever notices first)."""
        if actor not in self.actors:
            return
        slot = self.actors.index(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass
        self._launch(slot)
        self.replaced += 1

    def _launch(self, slot: int) -> None:
        """Start an actor in ``slot`` (a new one at the end), pending until it is up."""
        fresh = self._start()
        if slot == len(self.actors):
            self.actors.append(fresh)
        else:
            self.actors[slot] = fresh
        self.pending[slot] = (fresh.ready.remote(), time.monotonic())

    def _resubmit(self) -> None:
        while self.retry and self._usable():
            self.submit(self.retry.pop(0))

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        """Results that came in within ``timeout`` (at least one, unless the time ran out,
        nothing is running, or a replacement worker came up and can take a job)."""
        self._grow()
        self._started()
        self._resubmit()
        if not self.running and not self.pending:
            return []
        step = 1.0 if timeout is None else min(timeout, 1.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            readying = [ref for ref, _ in self.pending.values()]
            done, _ = self.ray.wait([*self.running, *readying], num_returns=1, timeout=step)
            results = [self._collect(ref) for ref in done if ref in self.running]
            results += self._expire()
            came_up = self._started()
            finished = [r for r in results if r is not None]
            self._resubmit()
            if finished or came_up or (deadline is not None and time.monotonic() >= deadline):
                return finished
            if not self.running and not self.pending:
                return finished

    def _grow(self, every: float = 5.0) -> None:
        """With ``grow``, start a worker for each one that the cluster's free resources hold
        (a node that joined); it takes jobs once it is up. Not while a worker is starting:
        its room is not taken yet, and a lost node may still be counted as alive."""
        if not self.grow or self.pending or time.monotonic() - self._grown_at < every:
            return
        self._grown_at = time.monotonic()
        key = "GPU" if "GPU" in self.need else "CPU"
        free = self.ray.available_resources().get(key, 0.0)
        for _ in range(math.floor(free / self.need[key])):
            slot = len(self.actors)
            self._launch(slot)
            self.free += [slot] * self.queue_depth
            self.workers += 1

    def _started(self) -> bool:
        """Take in the replacement actors that came up (True if any did). One that failed to
        start is replaced again, a bounded number of times; a pool left with no worker up
        for longer than the start timeout is one clear error, never an endless wait."""
        came_up = False
        for slot, (ref, asked) in list(self.pending.items()):
            done, _ = self.ray.wait([ref], num_returns=1, timeout=0)
            if not done:
                if len(self.pending) == self.workers and time.monotonic() - asked > self.start_timeout:
                    self.close()
                    raise EvomergeError(
                        f"workers: no worker could be started again within {self.start_timeout:.0f} s after the "
                        "workers were lost (the Ray cluster has no node left for them)"
                    )
                continue
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as err:
                self.start_failures += 1
                if self.start_failures > 2 * self.workers:
                    self.close()
                    raise EvomergeError(f"workers: a replacement worker could not start: {_last_line(err)}") from None
                del self.pending[slot]
                self._replace(self.actors[slot])
                continue
            del self.pending[slot]
            came_up = True
        return came_up

    def _collect(self, ref) -> JobResult | None:
        run = self.running.pop(ref)
        self.free.append(run.slot)
        self._restart_clock(run.actor)
        try:
            result = self.ray.get(ref)
            result.node = self._node(run.actor)
            return result
        except self.ray.exceptions.RayActorError:
            # only the job the actor was running counts the death as its own attempt: the
            # jobs queued behind it run again as they were
            culprit = self._culprit(run) == run.job.key
            self._replace(run.actor)
            if not culprit or run.job.attempt < self.max_retries:
                self.retry.append(replace(run.job, attempt=run.job.attempt + int(culprit)))
                return None
            return JobResult(run.job.key, error="worker died twice", fraction=run.job.fraction, split=run.job.split)
        except self.ray.exceptions.RayTaskError as err:
            return JobResult(run.job.key, error=str(err).strip().splitlines()[-1], fraction=run.job.fraction)

    def _culprit(self, run: _Running) -> int:
        """The key of the job that ``run``'s actor was running when it died (its oldest)."""
        key = id(run.actor)
        if key not in self.culprits or self.culprits[key][0] is not run.actor:
            same = [r for r in self.running.values() if r.actor is run.actor] + [run]
            self.culprits[key] = (run.actor, min(same, key=lambda r: r.seq).job.key)
        return self.culprits[key][1]

    def _node(self, actor) -> str | None:
        """The Ray node an actor lives on (its answer to the question asked at its start)."""
        key = id(actor)
        if key not in self.nodes:
            try:
                self.nodes[key] = self.ray.get(self.node_refs[key], timeout=5)
            except Exception:  # an actor that went away: its results count, its node is unknown
                self.nodes[key] = None
        return self.nodes[key]

    def _restart_clock(self, actor) -> None:
        """The job queued next on ``actor`` starts now: its timeout counts from here."""
        queued = [r for r in self.running.values() if r.actor is actor]
        if queued:
            nxt = min(queued, key=lambda r: r.seq)
            nxt.started = max(nxt.started, time.monotonic())

    def _expire(self) -> list[JobResult]:
        now = time.monotonic()
        out = []
        executing: dict[int, Any] = {}
        for ref, run in self.running.items():  # an actor runs its oldest job; the others wait
            key = id(run.actor)
            if key not in executing or run.seq < self.running[executing[key]].seq:
                executing[key] = ref
        for ref in list(executing.values()):
            run = self.running[ref]
            if now - run.started > self.job_timeout:
                self.running.pop(ref)
                self.culprits[id(run.actor)] = (run.actor, run.job.key)  # the jobs queued behind it are not at fault
                self._replace(run.actor)
                self.free.append(run.slot)
                msg = f"timed out after {self.job_timeout:.0f} s"
                out.append(JobResult(run.job.key, error=msg, fraction=run.job.fraction, split=run.job.split))
        return out

    def close(self) -> None:
        actors = getattr(self, "actors", [])
        if actors and self.spec.monitor is not None:  # each actor stops what it started, briefly, then goes
            try:
                self.ray.wait([a.stop.remote() for a in actors], num_returns=len(actors), timeout=15)
            except Exception:
                pass
        for actor in actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass


@dataclass(frozen=True)
class _Stored:
    """Files kept once in Ray's object store; each worker loads them on its node."""

    ref: Any

    def load(self) -> Files:
        import ray

        return ray.get(self.ref)


def _stored(ray, spec: WorkerSpec) -> WorkerSpec:
    """``spec`` with its shipped files put in the object store once, not copied into every
    actor's arguments."""
    files = _Stored(ray.put(spec.fitness_files)) if isinstance(spec.fitness_files, Files) else spec.fitness_files
    models = spec.shipped_models
    if models:
        models = {ref: _Stored(ray.put(f)) if isinstance(f, Files) else f for ref, f in models.items()}
    return replace(spec, fitness_files=files, shipped_models=models)


def _node_id(_worker) -> str:
    """Run inside an actor: the id of its Ray node."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _check_offered(nodes: list[dict[str, Any]], need: dict[str, float]) -> None:
    """Refuse, before any actor is placed, a worker that no live node of the cluster could
    ever hold (Ray would keep it pending for ever)."""
    alive = [n for n in nodes if n.get("Alive")]
    if any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items()) for n in alive):
        return
    if "GPU" in need:
        most = max((n.get("Resources", {}).get("GPU", 0.0) for n in alive), default=0.0)
        raise EvomergeError(
            f"gpus_per_worker: a worker needs {need['GPU']:g} GPU(s), but none of the Ray cluster's "
            f"{len(alive)} node(s) has more than {most:g}"
        )
    most = max((n.get("Resources", {}).get("CPU", 0.0) for n in alive), default=0.0)
    raise EvomergeError(
        f"threads_per_worker: a worker needs {need['CPU']:g} CPUs, but the largest of the Ray cluster's "
        f"{len(alive)} node(s) has {most:g}"
    )
