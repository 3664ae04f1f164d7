"""The ask/tell loop with one in-process worker on the tiny zoo."""

from __future__ import annotations

import optuna
import pytest
import torch

from evomerge.experiments.run import open_study, prepare
from evomerge.experiments.rundir import RunDir
from evomerge.search.dispatch import InProcessDispatcher
from evomerge.search.loop import (
    MAX_INTERRUPTIONS,
    Budget,
    SearchLoop,
    is_interrupted,
    origin_of,
    record_from_trial,
    recover_interrupted,
    trial_seed,
)
from evomerge.search.worker import Job, MergeWorker

from .faulty import FaultyWorker


def _loop(cfg, tmp_path, worker_cls=MergeWorker, trials=6, fractions=None):
    prep = prepare(cfg, log=lambda _: None)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    study = open_study(cfg, run, prep)
    dispatcher = InProcessDispatcher(worker=worker_cls(prep.spec))
    loop = SearchLoop(study, prep.space, dispatcher, budget=Budget(trials), seed=0, fractions=fractions)
    return loop, study, prep


def test_loop_completes_the_budget_starting_from_the_default(tiny_cfg, tmp_path):
    loop, study, prep = _loop(tiny_cfg(), tmp_path)
    stats = loop.run()
    assert (stats.complete, stats.failed, stats.pruned) == (6, 0, 0)
    assert len(study.trials) == 6
    assert study.trials[0].params == pytest.approx(prep.space.default_params())
    assert stats.samples_scored == 6 * 3 * 20
    for t in study.trials:
        assert all(0.0 <= v <= 1.5 for v in t.params.values())


def test_failed_and_nan_candidates_are_recorded_and_the_search_goes_on(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", "1=raise,2=nan")
    loop, study, _ = _loop(tiny_cfg(), tmp_path, worker_cls=FaultyWorker)
    stats = loop.run()
    assert (stats.complete, stats.failed) == (4, 2)
    states = {t.number: t.state for t in study.trials}
    assert states[1] == states[2] == optuna.trial.TrialState.FAIL
    errors = {r.number: r.error for r in stats.records}
    assert errors[1] == "injected merge failure" and "NaN" in errors[2]


@pytest.mark.parametrize("pruner", ["median", "successive_halving"])
def test_pruning_scores_fewer_samples(tiny_cfg, tmp_path, pruner):
    cfg = tiny_cfg(
        search__pruning={"enabled": True, "fractions": [0.25, 1.0], "pruner": pruner},
        search__sampler="random",
        fitness__samples=40,
    )
    loop, study, _ = _loop(cfg, tmp_path, trials=16, fractions=[0.25, 1.0])
    stats = loop.run()
    assert stats.finished == 16 and stats.pruned > 0
    # a promoted trial scores only the samples beyond its first quarter
    assert stats.samples_scored == stats.complete * 3 * 40 + stats.pruned * 3 * 10
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.intermediate_values for t in pruned)


def test_same_seed_same_search(tiny_cfg, tmp_path):
    a = _loop(tiny_cfg(), tmp_path / "a")[0].run()
    b = _loop(tiny_cfg(), tmp_path / "b")[0].run()
    assert [r.params for r in a.records] == [r.params for r in b.records]
    assert [r.value for r in a.records] == [r.value for r in b.records]


def test_interrupted_trials_are_failed_retried_and_not_counted_in_the_budget(tiny_cfg, tmp_path):
    dare = {"method": "dare_linear", "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": 0.5}}
    loop, study, prep = _loop(tiny_cfg(merge=dare), tmp_path, trials=5)
    loop.budget.trials = 2
    loop.run()
    stale = study.ask()  # a trial a killed driver left RUNNING
    params = prep.space.sample(stale)
    loop2, study2, _ = _loop(tiny_cfg(merge=dare), tmp_path, trials=5)  # same run dir: same study
    stats = loop2.run()
    trials = study2.trials
    assert trials[stale.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.user_attrs.get("retry_of") == stale.number]
    assert len(retried) == 1 and retried[0].params == pytest.approx(params)
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    # the budget counts evaluated trials: 2 before + its retry + 2 new = 5; the stale FAIL does not count
    assert len(trials) == 6 and stats.finished == 3 and is_interrupted(trials[stale.number])
    assert stats.earlier == 2  # what the progress line adds to this session's count
    assert sum(not is_interrupted(t) for t in trials) == 5
    # the retry repeats the interrupted trial's random stream (DARE masks): same tensors, same score
    recipe = prep.space.recipe(params).to_dict()
    worker = MergeWorker(prep.spec)
    same = worker.run(Job(0, recipe, seed=trial_seed(0, stale.number)))
    same_weights = {k: v.clone() for k, v in worker.params.items()}
    worker.run(Job(0, recipe, seed=trial_seed(0, retried[0].number)))
    assert retried[0].value == same.value
    # the seed matters (another one merges other tensors), so the stream check can fail
    assert any(not torch.equal(v, worker.params[k]) for k, v in same_weights.items())
    record = record_from_trial(retried[0], prep.space)
    assert record.seed_number == stale.number and record.tasks == same.tasks and record.samples == 60


def test_a_trial_killed_before_all_its_parameters_is_failed_not_retried(tiny_cfg, tmp_path):
    loop, study, prep = _loop(tiny_cfg(), tmp_path, trials=5)
    loop.budget.trials = 2
    loop.run()
    empty = study.ask()  # killed between ask and the first suggestion: no parameters
    partial = study.ask()  # killed while drawing them: one of three
    partial.suggest_float("weight[zoo:cp]", 0.0, 1.5)
    loop2, study2, _ = _loop(tiny_cfg(), tmp_path, trials=5)
    loop2.run()
    trials = study2.trials
    assert trials[empty.number].state == trials[partial.number].state == optuna.trial.TrialState.FAIL
    assert not any("retry_of" in t.user_attrs for t in trials)
    assert len(trials) == 7 and all(prep.space.complete(t.params) for t in trials if t.number > partial.number)
    assert sum(not is_interrupted(t) for t in trials) == 5  # the two interrupted ones did not count
    record = record_from_trial(trials[partial.number], prep.space)  # what the tracker logs for it
    assert record.state == "FAIL" and record.recipe == {} and "interrupted" in (record.error or "")


def test_a_higher_fidelity_reuses_the_lower_ones_samples(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg(fitness__samples=40), log=lambda _: None)
    worker = MergeWorker(prep.spec)
    recipe = prep.space.recipe(prep.space.default_params()).to_dict()
    full = worker.run(Job(0, recipe, seed=0))
    quarter = worker.run(Job(1, recipe, seed=0, fraction=0.25))
    assert quarter.samples == 3 * 10 and all(len(v) == 10 for v in quarter.per_sample.values())
    rest = worker.run(Job(1, recipe, seed=0, prior=quarter.per_sample))
    assert rest.samples == 3 * 30  # only the samples beyond the quarter were scored
    assert rest.per_sample == full.per_sample and rest.value == full.value and rest.tasks == full.tasks


def test_recovery_is_idempotent_and_retries_a_retry_up_to_the_limit(tiny_cfg, tmp_path):
    """A resume killed after queueing a retry but before failing the original queues no
    second retry; a retry that is itself interrupted is queued again, up to
    MAX_INTERRUPTIONS interruptions of one parameter set; nothing is left WAITING."""
    loop, study, prep = _loop(tiny_cfg(), tmp_path, trials=3)
    loop.budget.trials = 1
    loop.run()
    stale = study.ask()
    prep.space.sample(stale)
    study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})  # the killed resume got this far
    assert recover_interrupted(study, prep.space) == 1
    same = [t for t in study.trials if origin_of(t) == stale.number]
    assert [t.state.name for t in same] == ["FAIL", "WAITING"]  # no second retry
    for _ in range(MAX_INTERRUPTIONS - 1):  # the retry is asked, then cut short again
        retry = study.ask()
        assert retry.user_attrs["retry_of"] == stale.number
        prep.space.sample(retry)
        recover_interrupted(study, prep.space)
    same = [t for t in study.trials if origin_of(t) == stale.number]
    assert len(same) == MAX_INTERRUPTIONS and all(is_interrupted(t) for t in same)  # no more retries
    loop2, study2, _ = _loop(tiny_cfg(), tmp_path, trials=3)
    loop2.run()
    assert not [t for t in study2.trials if not t.state.is_finished()]
    assert sum(not is_interrupted(t) for t in study2.trials) == 3
