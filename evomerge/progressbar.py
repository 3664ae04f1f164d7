"""A progress bar for long steps (rich), silent when asked or not on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def bar(label: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """Yield ``tick(done, total)``; draws a rich progress bar on a terminal."""
    import sys

    if quiet or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(label, total=None)

        def tick(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield tick
