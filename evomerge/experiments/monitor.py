"""Live progress of a search: trials done, best so far, worker utilisation."""

from __future__ import annotations

import sys
import time
from typing import Any

from evomerge.search.loop import SearchStats, TrialRecord


class ProgressObserver:
    """A search-loop observer: a rich live line on a terminal, a line per new best otherwise."""

    def __init__(self, total: int | None, workers: int, *, quiet: bool = False):
        self.total = total
        self.workers = workers
        self.quiet = quiet
        self.best: float | None = None
        self.best_trial: int | None = None
        self.start = time.monotonic()
        self._live: Any = None
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> ProgressObserver:
        self.start = time.monotonic()
        if not self.quiet and self.tty:
            from rich.live import Live

            self._live = Live(self._render(SearchStats()), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _line(self, stats: SearchStats) -> str:
        elapsed = time.monotonic() - self.start
        util = stats.busy_seconds / max(1e-9, self.workers * elapsed)
        total = f"/{self.total}" if self.total else ""
        best = f"{self.best:.4f} (trial {self.best_trial})" if self.best is not None else "-"
        return (
            f"trials {stats.earlier + stats.finished}{total} (complete {stats.complete}, pruned {stats.pruned}, "
            f"failed {stats.failed})  best {best}  workers busy {util:.0%}  {elapsed:.0f} s"
        )

    def _render(self, stats: SearchStats):
        from rich.text import Text

        return Text(self._line(stats))

    def __call__(self, record: TrialRecord, stats: SearchStats) -> None:
        improved = (
            record.state == "COMPLETE" and record.value is not None and (self.best is None or record.value > self.best)
        )
        if improved:
            self.best, self.best_trial = record.value, record.number
        if self.quiet:
            return
        if self._live is not None:
            self._live.update(self._render(stats))
        elif improved or record.state == "FAIL" or stats.earlier + stats.finished == self.total:
            extra = f"  [trial {record.number} failed: {record.error}]" if record.state == "FAIL" else ""
            print(self._line(stats) + extra, file=sys.stderr, flush=True)
