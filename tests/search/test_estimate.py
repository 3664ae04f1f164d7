"""A search whose fitness is estimated from anchor items (``fitness.estimator: irt``),
end to end on the tiny zoo in this process."""

from __future__ import annotations

import json

import pytest

from evomerge.errors import EvomergeError
from evomerge.experiments.run import RunOptions, run_experiment

LOCAL = RunOptions(quiet=True, in_process=True, track=False)
IRT = {"tasks": ["cp", "rev", "sort"], "samples": 40, "estimator": "irt", "anchors": 8, "calibration_merges": 2}


def test_an_irt_search_scores_anchors_only_and_reports_estimate_and_full_fitness(tiny_cfg, tmp_path):
    cfg = tiny_cfg(fitness=IRT)
    run = tmp_path / "run"
    summary = run_experiment(cfg, run, LOCAL)
    est = summary["estimator"]
    # the sources, the base and two random merges, each scored on all 3 x 40 samples
    assert est["calibration"] == ["zoo:cp", "zoo:rev", "zoo:sort", "zoo:base", "random merge 1", "random merge 2"]
    assert est["calibration_samples"] == 6 * 3 * 40
    trials = summary["trials"]["complete"]
    assert trials == 6 and summary["samples_scored"] == est["calibration_samples"] + trials * 3 * 8
    assert set(est["tasks"]) == {"cp", "rev", "sort"} and all(0 <= t["lambda"] <= 1 for t in est["tasks"].values())
    assert 0 <= summary["best_fitness_full"] <= 1 and 0 <= summary["best_fitness"] <= 1
    # the validation re-rank and the test report stay full-split
    assert summary["best_test_fitness"] is not None
    saved = json.loads((run / "irt.json").read_text())
    assert {n: len(t["anchors"]) for n, t in saved["tasks"].items()} == {"cp": 8, "rev": 8, "sort": 8}

    # a resumed run keeps its estimator: no second calibration
    more = run_experiment(tiny_cfg(fitness=IRT, search__trials=8), run, LOCAL, resume=True)
    assert more["trials"]["complete"] == 8 and more["samples_scored"] == 2 * 3 * 8
    assert json.loads((run / "irt.json").read_text()) == saved
    with pytest.raises(EvomergeError, match="a run keeps its estimator"):
        run_experiment(tiny_cfg(fitness={**IRT, "anchors": 5}), run, LOCAL, resume=True)


def test_an_irt_search_on_lm_eval_with_pruning_scores_growing_parts_of_the_anchors(tiny_cfg, tmp_path):
    """lm-eval's per-document results calibrate and answer the anchors as the native
    scorer's do; a pruned trial scores the first part of the anchors, a promoted one only
    the anchors beyond them."""
    fitness = {**IRT, "samples": 24, "anchors": 8, "calibration_merges": 0, "backend": "lm-eval"}
    pruning = {"enabled": True, "fractions": [0.5, 1.0], "pruner": "successive_halving", "reduction_factor": 2}
    cfg = tiny_cfg(fitness=fitness, search={"sampler": "random", "seed": 0, "trials": 6, "pruning": pruning})
    summary = run_experiment(cfg, tmp_path / "run", LOCAL)
    counts = summary["trials"]
    assert counts["complete"] + counts["pruned"] == 6 and counts["complete"] >= 1
    assert summary["estimator"]["calibration_samples"] == 4 * 3 * 24
    # every trial scores 4 anchors per task at the first rung; those that go on, 4 more
    searched = summary["samples_scored"] - summary["estimator"]["calibration_samples"]
    assert searched == 6 * 3 * 4 + counts["complete"] * 3 * 4
    assert 0 <= summary["best_fitness_full"] <= 1


@pytest.mark.parametrize(
    ("fitness", "message"),
    [
        ({"estimator": "irt"}, "needs anchors"),
        ({"anchors": 5}, "set estimator: irt"),
        ({"estimator": "irt", "anchors": 40}, r"anchors \(40\) must be fewer than fitness.samples \(40\)"),
    ],
)
def test_irt_settings_are_checked(tiny_cfg, fitness, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(fitness={"tasks": ["cp"], "samples": 40, **fitness})


def test_eval_with_the_runs_estimator_scores_its_anchors_and_estimates_as_the_search(tiny_cfg, tiny_zoo, tmp_path):
    from evomerge.fitness.evaluate import aggregate
    from evomerge.fitness.irt import IrtEstimator
    from evomerge.fitness.scoring import evaluate_model_dir

    from ..cli import one_line_error, run_cli

    cfg = tiny_cfg(fitness=IRT, search__trials=2)
    run = tmp_path / "run"
    run_experiment(cfg, run, LOCAL)
    config = tmp_path / "exp.yaml"
    config.write_text(cfg.to_yaml())
    ask = ["eval", str(tiny_zoo / "rev"), "--config", str(config), "--estimator", "irt"]
    res = run_cli(*ask, "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "estimated from 24 samples" in res.stdout
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    # what the search would have estimated from the model's answers on the anchors
    est = IrtEstimator.from_json(json.loads((run / "irt.json").read_text()))
    full = evaluate_model_dir(tiny_zoo / "rev", cfg).per_sample
    tasks = est.estimate({t: [full[t][p] for p in anchors] for t, anchors in est.anchors().items()})
    assert printed["fitness"] == pytest.approx(aggregate(cfg.fitness, tasks)[0], abs=1e-12)
    assert "no IRT calibration there" in one_line_error(run_cli(*ask, "--run", str(tmp_path)))
    other = run_cli(*ask, "--run", str(run), "--split", "test")
    assert "calibrated on the search split only" in one_line_error(other)
