"""The evomerge command line as a user meets it: a separate process, its exit status,
its standard output and error. A traceback an in-process ``main()`` would raise is
printed here, as it is for the user, so a test can see it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``evomerge ARGS`` in a subprocess (the repository importable, Ray without auth)."""
    base = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """Assert the user saw exactly one line on standard error, no traceback, exit 2; return it."""
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-3000:]
    assert res.returncode == 2, f"exit {res.returncode}: {res.stderr[-3000:]}"
    assert err and "\n" not in err, err
    return err
