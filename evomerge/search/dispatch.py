"""Dispatchers run jobs on workers; the search loop only submits and waits.

``InProcessDispatcher`` runs one worker in this process (tests, debugging);
``evomerge.search.ray_pool.RayDispatcher`` runs a pool of Ray actors.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from evomerge.search.worker import Job, JobResult, MergeWorker, WorkerSpec


class Dispatcher(Protocol):
    workers: int

    def idle(self) -> int:
        """How many more jobs can start now."""

    def submit(self, job: Job) -> None:
        """Start ``job`` on an idle worker."""

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        """Block until at least one job finishes (or ``timeout``); return the finished ones."""

    def close(self) -> None: ...


def run_jobs(dispatcher: Dispatcher, jobs: list[Job]) -> dict[int, JobResult]:
    """Run independent jobs on the pool (final scoring, calibration); results by job key."""
    queue: list[Job] = list(jobs)
    out: dict[int, JobResult] = {}
    while queue or len(out) < len(jobs):
        while queue and dispatcher.idle() > 0:
            dispatcher.submit(queue.pop(0))
        for result in dispatcher.wait(timeout=5.0):
            out[result.key] = result
    return out


class InProcessDispatcher:
    """One worker in this process; a job runs when ``wait`` is called."""

    workers = 1

    def __init__(self, spec: WorkerSpec | None = None, worker: MergeWorker | None = None):
        self.worker = worker or MergeWorker(spec)  # type: ignore[arg-type]
        self.queue: deque[Job] = deque()

    def idle(self) -> int:
        return 0 if self.queue else 1

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        return [self.worker.run(self.queue.popleft())] if self.queue else []

    def close(self) -> None:
        self.queue.clear()
        self.worker.stop()
