"""Test-only: run the evomerge CLI and SIGKILL its whole process group at a chosen
moment of a chosen trial, from inside the real code path.

    EVOMERGE_TEST_KILL=merge:N   while a worker merges trial N (inside the Ray actor)
    EVOMERGE_TEST_KILL=score:N   while a worker scores trial N (inside the Ray actor)
    EVOMERGE_TEST_KILL=log:N     after trial N was told to Optuna, before its MLflow log (driver)
    EVOMERGE_TEST_KILL=enqueue:N after the N-th trial queued in this process (on resume: a retry queued,
                                 its interrupted original not yet told FAIL)

The process group is the one the test started the driver in (``start_new_session``);
``EVOMERGE_TEST_PGID`` names it, so an actor can take the driver and every Ray process down.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

from evomerge.search import worker as worker_module
from evomerge.search.worker import Job, JobResult, MergeWorker


def _kill_at(moment: str, number: int) -> None:
    raw = os.environ.get("EVOMERGE_TEST_KILL", "")
    if raw and raw.split(":")[0] == moment and int(raw.split(":")[1]) == number:
        os.killpg(int(os.environ["EVOMERGE_TEST_PGID"]), signal.SIGKILL)


class KillingWorker(MergeWorker):
    """A real worker that kills the process group in the middle of one trial's merge
    (after its second merged tensor) or scoring (at its second forward pass)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.key, self.calls = -1, 0
        self.model.get_input_embeddings().register_forward_pre_hook(lambda *_: self._tick("score"))
        merge_planned = worker_module.merge_planned

        def counting(*args, **kwargs):
            self._tick("merge")
            return merge_planned(*args, **kwargs)

        worker_module.merge_planned = counting  # this actor's process only

    def _tick(self, moment: str) -> None:
        self.calls += 1
        if self.calls == 2:
            _kill_at(moment, self.key)

    def run(self, job: Job) -> JobResult:
        self.key = job.key if job.split is None else -1  # final scoring jobs reuse small keys
        self.calls = 0
        return super().run(job)

    def merge(self, recipe, seed):
        super().merge(recipe, seed)
        self.calls = 0  # count the forward passes from here


def main(argv: list[str]) -> int:
    os.environ["EVOMERGE_TEST_PGID"] = str(os.getpgid(0))  # before Ray starts: its processes inherit it
    from evomerge import cli
    from evomerge.experiments import tracking
    from evomerge.search import ray_pool

    ray_pool.RayDispatcher = functools.partial(ray_pool.RayDispatcher, worker_cls=KillingWorker)  # type: ignore
    log = tracking.MlflowTracker.__call__

    def logging_then_kill(self, record, stats):
        _kill_at("log", record.number)
        return log(self, record, stats)

    tracking.MlflowTracker.__call__ = logging_then_kill  # type: ignore[method-assign]
    import optuna

    enqueue = optuna.Study.enqueue_trial
    queued = [0]

    def enqueue_then_kill(self, *args, **kwargs):
        enqueue(self, *args, **kwargs)
        queued[0] += 1
        _kill_at("enqueue", queued[0])

    optuna.Study.enqueue_trial = enqueue_then_kill  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
