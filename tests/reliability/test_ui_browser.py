"""`evomerge ui` looked at in a real headless browser (Debian's Chromium): on first load,
with no click, the runs table's first rows are the best merge, the untuned merge and the
source models side by side with their fitness; the parent run charts the search;
SIGTERM stops the whole server.

Chromium renders the page (`--dump-dom` after the page's scripts ran, `--screenshot`);
the test reads the runs table's cells from the rendered DOM. Screenshots go to the test's
temporary directory, and also to ``EVOMERGE_SCREENSHOTS`` when that names a directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from evomerge.testing import free_port

from .common import cli_env

pytestmark = pytest.mark.slow

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EVOMERGE_REQUIRE_BROWSER") == "1"
INSTALL = "apt-get install chromium (Debian's package; .ci/run installs it)"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if REQUIRED:
        pytest.fail(f"no chromium on PATH: {INSTALL}")
    pytest.skip(f"no chromium on PATH: {INSTALL}")


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page as Chromium renders it headless (offline, a fresh profile): its DOM, and a screenshot."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    base += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    base += ["--window-size=1600,1000", "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw"]
    if screenshot is not None:
        shot = [*base, f"--user-data-dir={profile}-shot", f"--screenshot={screenshot}", url]
        subprocess.run(shot, capture_output=True, timeout=180, check=True)
        assert screenshot.stat().st_size > 20_000
    dump = [*base, f"--user-data-dir={profile}-dom", "--dump-dom", url]
    return subprocess.run(dump, capture_output=True, text=True, timeout=180, check=True).stdout


class Cells(HTMLParser):
    """The text of every cell of the runs table, by (row index, column id)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str | None, str | None]] = []
        self.cells: dict[tuple[int, str], str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        row, col = self.stack[-1] if self.stack else (None, None)
        self.stack.append((a.get("row-index") or row, a.get("col-id") or col))

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and data.strip() and None not in self.stack[-1]:
            row, col = self.stack[-1]
            key = (int(row), col)  # type: ignore[arg-type]
            self.cells[key] = (self.cells.get(key, "") + " " + data.strip()).strip()


def _keep(path: Path) -> None:
    where = os.environ.get("EVOMERGE_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(where) / path.name)


def test_the_ui_shows_the_best_merge_on_first_load(tiny_zoo, tmp_path):
    import psutil
    from mlflow.tracking import MlflowClient

    from evomerge.experiments.run import RunOptions, run_experiment

    from ..search.conftest import tiny_config

    chromium()
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run = tmp_path / "run"
    cfg = tiny_config(tiny_zoo, name="browsed", search__trials=10).resolved()
    summary = run_experiment(cfg, run, RunOptions(quiet=True, in_process=True, tracking_uri=uri))
    port = free_port()
    cmd = [sys.executable, "-m", "evomerge.cli", "ui", str(run), "--tracking-uri", uri, "--port", str(port)]
    ui = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line, deadline = "", time.monotonic() + 120
        while "MLflow UI for" not in line:
            assert ui.poll() is None and time.monotonic() < deadline, "evomerge ui did not come up"
            line = ui.stdout.readline() if ui.stdout else ""
        url = line.split(": ", 1)[1].split()[0]
        exp = MlflowClient(uri).get_experiment_by_name("browsed")
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=evomerge"
        shot = tmp_path / "ui_runs_table.png"
        table = Cells()
        table.feed(render(url, tmp_path / "profile", shot))
        _keep(shot)
        cells = table.cells
        # the first six rows: the picked best, the untuned merge and the four sources, ranked by test
        # fitness, each with its search and test fitness; every other trial below them
        first = {cells[(r, "attributes.`Run Name`")].split()[-1]: r for r in range(6)}
        best = summary["best_trial"]
        names = {"(best)", "merge", "source-base", "source-cp", "source-rev", "source-sort"}
        assert set(first) == names, first
        row = first["(best)"]
        assert cells[(row, "attributes.`Run Name`")].endswith(f"trial-{best} (best)")
        assert float(cells[(row, "metrics.`fitness`")]) == pytest.approx(summary["best_fitness"], abs=1e-9)
        assert float(cells[(row, "metrics.`test_fitness`")]) == pytest.approx(summary["best_test_fitness"], abs=1e-9)
        tests = [float(cells[(r, "metrics.`test_fitness`")]) for r in range(6)]
        assert tests == sorted(tests, reverse=True) and all((r, "metrics.`fitness`") in cells for r in range(6))
        assert cells[(6, "metrics.`test_fitness`")] == "-"  # the other trials follow
        # the parent run charts the search: a point per trial, and the best so far
        parent = next(
            r for r in MlflowClient(uri).search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
        )
        charts = tmp_path / "ui_parent_metrics.png"
        base = url.split("/#/")[0]
        page = render(
            f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/model-metrics",
            tmp_path / "profile2",
            charts,
        )
        _keep(charts)
        assert "best_so_far" in page and "trial_fitness" in page and "scatterlayer" in page  # drawn, not loading
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server, "the MLflow server runs as a child of evomerge ui"
    finally:
        ui.send_signal(signal.SIGTERM)  # as `kill PID` of evomerge ui alone
        ui.wait(timeout=60)
    gone, alive = psutil.wait_procs(server, timeout=30)
    assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
