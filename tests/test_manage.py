"""Run directories: resume, status and export, on the tiny zoo with one in-process worker."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main
from evomerge.experiments.run import RunOptions, run_experiment

from .search.conftest import tiny_config


@pytest.fixture
def finished_run(tiny_zoo, tmp_path):
    cfg = tiny_config(tiny_zoo).resolved()
    out = tmp_path / "run"
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True))
    return out


def test_export_reproduces_the_recorded_fitness(finished_run, tmp_path, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "trial" in card and "mergekit" in card and (out / "mergekit_config.yml").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--config", str(finished_run / "config.yaml"), "--split", "search"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fitness"] == summary["best_fitness"]


def test_status_lists_the_top_trials(finished_run, capsys):
    assert main(["status", str(finished_run), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6/6 trials" in out and "complete 6" in out and "finished: best trial" in out


def test_resume_refuses_a_changed_config_and_shows_the_difference(finished_run, capsys):
    cfg_path = finished_run / "config.yaml"
    data = yaml.safe_load(cfg_path.read_text())
    data["search"]["trials"] = 8
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["resume", str(finished_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run started" in err and "trials: 8" in err and "Traceback" not in err


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
