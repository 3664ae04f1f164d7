"""MLflow lineage of a search: one parent per run directory, one child per trial, reused on resume."""

from __future__ import annotations

import pytest

from evomerge.experiments.run import RunOptions, run_experiment

from .search.conftest import tiny_config


def _runs(uri, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_every_trial_is_a_child_run_and_resume_adds_no_duplicates(tiny_zoo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = tiny_config(tiny_zoo, name="tracked").resolved()
    out = tmp_path / "run"
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri))
    client, runs = _runs(uri, "tracked")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "trial" in r.data.tags]
    sources = [r for r in runs if r.data.tags.get("evomerge.kind") == "source"]
    assert len(parents) == 1 and len(children) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children + sources)
    assert sorted(r.data.tags["source"] for r in sources) == ["zoo:base", "zoo:cp", "zoo:rev", "zoo:sort"]
    assert all(0 <= r.data.metrics["test_fitness"] <= 1 and "test.acc.rev" in r.data.metrics for r in sources)
    assert sorted(int(r.data.tags["trial"]) for r in children) == list(range(6))
    child = children[0]
    assert child.data.tags["state"] == "COMPLETE" and "fitness" in child.data.metrics
    assert {"acc.cp", "acc.rev", "acc.sort", "merge_seconds", "score_seconds"} <= set(child.data.metrics)
    assert set(child.data.params) == {"weight.zoo:cp", "weight.zoo:rev", "weight.zoo:sort"}
    assert any(k.startswith("source.zoo:") for k in child.data.tags)
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["recipe.yml"]
    assert parents[0].data.metrics["best_test_fitness"] >= 0
    reports = {a.path for a in client.list_artifacts(parents[0].info.run_id, "reports")}
    assert reports == {"reports/history.png", "reports/importance.png", "reports/family_tree.png"}
    assert (out / "reports" / "history.png").stat().st_size > 10_000
    # a resumed run with a larger budget reuses the parent and logs only the new trials
    bigger = tiny_config(tiny_zoo, name="tracked", search__trials=8).resolved()
    run_experiment(bigger, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri), resume=True)
    _, runs = _runs(uri, "tracked")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    trials = sorted(int(r.data.tags["trial"]) for r in runs if "trial" in r.data.tags)
    assert trials == list(range(8))
    assert len([r for r in runs if r.data.tags.get("evomerge.kind") == "source"]) == 4  # not logged twice


@pytest.mark.parametrize(
    "fault, error", [("raise", "injected merge failure"), ("nan", "the fitness is NaN"), (None, None)]
)
def test_each_child_run_carries_its_trials_state(tiny_zoo, tmp_path, monkeypatch, fault, error):
    """Every child run's state tag and MLflow status follow its trial: a merge that raised
    and a NaN fitness are FAIL / FAILED with the error; with pruning on, pruned trials are
    PRUNED / KILLED and complete ones COMPLETE / FINISHED."""
    import optuna

    from .search.faulty import FaultyWorker

    if fault:
        monkeypatch.setenv("EVOMERGE_TEST_FAULTS", f"2={fault}")
    monkeypatch.setattr("evomerge.search.dispatch.MergeWorker", FaultyWorker)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    over = {} if fault else {"search__pruning": {"enabled": True}, "search__sampler": "random", "search__trials": 12}
    run_experiment(
        tiny_config(tiny_zoo, name="faults", **over).resolved(),
        tmp_path / "run",
        RunOptions(quiet=True, in_process=True, tracking_uri=uri),
    )
    _, runs = _runs(uri, "faults")
    children = {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    assert sorted(children) == [t.number for t in study.trials]
    for t in study.trials:
        assert children[t.number].data.tags["state"] == t.state.name
        assert children[t.number].info.status == status[t.state.name]
    states = {t.state.name for t in study.trials}
    if fault:
        assert study.trials[2].state.name == "FAIL" and children[2].data.tags["error"] == error
        assert states == {"COMPLETE", "FAIL"}
    else:
        assert states == {"COMPLETE", "PRUNED"}


def test_a_child_run_cut_short_by_a_kill_is_replaced_on_resume(tiny_zoo, tmp_path):
    """A session killed between creating a trial's child run and finishing it leaves that
    run RUNNING with part of its record; the next session deletes it and logs the trial
    again, whole: one active child run per trial, every one finished."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = tiny_config(tiny_zoo, name="cut").resolved()
    out = tmp_path / "run"
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri))
    client, runs = _runs(uri, "cut")
    half = next(r for r in runs if r.data.tags.get("trial") == "3")
    client.update_run(half.info.run_id, status="RUNNING")  # as a kill inside the tracker leaves it
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True, tracking_uri=uri), resume=True)
    _, runs = _runs(uri, "cut")
    children = [r for r in runs if "trial" in r.data.tags]
    assert sorted(int(r.data.tags["trial"]) for r in children) == list(range(6))
    assert all(r.info.status == "FINISHED" and "fitness" in r.data.metrics for r in children)
    assert half.info.run_id not in {r.info.run_id for r in children}
