"""A worker with injected faults, importable by Ray actors (tests only)."""

from __future__ import annotations

import os
import time

from evomerge.search.worker import Job, JobResult, MergeWorker


class FaultyWorker(MergeWorker):
    """Fails on chosen job keys: 'raise', 'nan', 'hang', or 'die' (the process exits once)."""

    FAULTS: dict[int, str] = {}

    def __init__(self, spec):
        # a replacement that loads slowly: once the marker file exists, every new actor
        # takes longer to start than a job may run (its job's clock must not count it)
        marker = os.environ.get("EVOMERGE_TEST_SLOW_START", "")
        if marker and os.path.exists(marker):
            time.sleep(12)
        super().__init__(spec)

    def run(self, job: Job) -> JobResult:
        fault = self.faults().get(job.key)
        if fault == "raise":
            return JobResult(job.key, error="injected merge failure")
        if fault == "nan":
            result = super().run(job)
            result.value = float("nan")
            result.error = "the fitness is NaN"
            return result
        if fault == "hang":
            time.sleep(600)
        if fault == "die" and job.attempt == 0:
            os._exit(1)
        return super().run(job)

    def faults(self) -> dict[int, str]:
        raw = os.environ.get("EVOMERGE_TEST_FAULTS", "")
        return {int(k): v for k, v in (x.split("=") for x in raw.split(",") if x)}
