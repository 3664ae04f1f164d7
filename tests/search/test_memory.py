"""The memory plan: what a worker holds where, decided before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.search.memory import GIB, MARGIN, footprint, plan_memory


def test_the_footprint_is_the_sources_bytes_from_their_headers(family):
    fp = footprint([str(p) for p in family], 2)
    sizes = [sum(t.numel() for t in load_file(str(p / "model.safetensors")).values()) * 2 for p in family]
    assert fp.model == sizes[0] and fp.sources == sum(sizes) and fp.inputs == len(family)
    largest = max(t.numel() for p in family for t in load_file(str(p / "model.safetensors")).values())
    assert fp.largest == largest and fp.itemsize == 2


def _plan(family, placement, device, budget):
    return plan_memory(footprint([str(p) for p in family], 2), placement, device, budget)


@pytest.fixture
def small_read_ahead(monkeypatch):
    """A read-ahead below the test family's size (the default, 256 MiB, would hold it all)."""
    from evomerge.search import memory

    monkeypatch.setattr(memory, "READ_AHEAD_BYTES", 1 << 12)


def test_auto_keeps_sources_resident_when_they_fit_else_streams_them(family, small_read_ahead):
    fp = footprint([str(p) for p in family], 2)
    resident, streamed = fp.device_bytes("resident") / GIB, fp.device_bytes("streamed") / GIB
    assert streamed < resident
    roomy = _plan(family, "auto", "cuda", resident / (1 - MARGIN) * 1.01)
    assert roomy.placement == "resident" and roomy.host_gib == 0
    tight = _plan(family, "auto", "cuda", (resident + streamed) / 2 / (1 - MARGIN))
    assert tight.placement == "streamed" and tight.device_gib == pytest.approx(streamed)
    assert tight.host_gib == pytest.approx(fp.sources / GIB)
    with pytest.raises(EvomergeError, match=r"device_memory_gib: a worker needs .* streamed"):
        _plan(family, "auto", "cuda", streamed / (1 - MARGIN) * 0.99)
    with pytest.raises(EvomergeError, match=r"placement: streamed fits"):
        _plan(family, "resident", "cuda", (resident + streamed) / 2 / (1 - MARGIN))


def test_on_the_cpu_streaming_saves_nothing_so_the_budget_holds_both(family, small_read_ahead):
    fp = footprint([str(p) for p in family], 2)
    total = (fp.device_bytes("streamed", "cpu") + fp.host_bytes("streamed")) / GIB
    assert total == pytest.approx(fp.device_bytes("resident", "cpu") / GIB)
    assert _plan(family, "auto", "cpu", total / (1 - MARGIN) * 1.01).placement == "resident"
    with pytest.raises(EvomergeError):
        _plan(family, "streamed", "cpu", total / (1 - MARGIN) * 0.99)


def test_streamed_sources_give_the_resident_trial_values_bit_for_bit(tiny_cfg, tmp_path):
    from evomerge.experiments.run import RunOptions, run_experiment

    values = {}
    for placement in ("resident", "streamed"):
        cfg = tiny_cfg(name=f"placed-{placement}", placement=placement)
        run_experiment(cfg, tmp_path / placement, RunOptions(quiet=True, in_process=True, track=False))
        summary = json.loads((tmp_path / placement / "summary.json").read_text())
        assert summary["memory"]["placement"] == placement and summary["memory"]["device"] == "cpu"
        assert summary["memory"]["device_gib"] > 0
        # measured in the worker, beside the plan: in this long-lived process a tiny model may
        # fit in memory the process already holds (tests/search/test_hostpeak.py: the measure)
        assert summary["memory"]["peak_gib"] is not None and summary["memory"]["peak_gib"] >= 0
        import optuna

        study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{tmp_path / placement / 'study.db'}")
        values[placement] = [t.value for t in study.trials]
        log = (tmp_path / placement / "run.log").read_text()
        assert f"memory: sources {placement} (cpu)" in log
    assert values["resident"] == values["streamed"] and len(values["resident"]) == 6


def test_a_budget_too_small_even_streamed_is_one_line_and_writes_nothing(tiny_zoo, tmp_path):
    import yaml

    from tests.cli import one_line_error, run_cli
    from tests.search.conftest import tiny_config

    cfg = tiny_config(tiny_zoo, device_memory_gib=0.0001).model_dump(mode="json", exclude={"source_dir"})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "run"), "--quiet")
    err = one_line_error(res)
    assert "device_memory_gib: a worker needs" in err and "budget is 0.00 GiB" in err
    assert not (tmp_path / "run").exists()


def test_resident_sources_on_a_device_are_not_copied_per_candidate(tiny_cfg):
    from evomerge.experiments.run import prepare
    from evomerge.search.worker import Job, MergeWorker

    prep = prepare(tiny_cfg(), log=lambda _: None)
    worker = MergeWorker(prep.spec)
    recipe = prep.space.recipe(prep.space.default_params()).to_dict()
    assert worker.run(Job(0, recipe, seed=0)).ok and worker.copied_bytes == 0
    assert all(t.device == torch.device("cpu") for ck in worker.sources.values() for t in ck.pickled.values())


def test_without_a_known_budget_auto_is_resident_and_nothing_is_refused(family):
    """A driver that sees no GPU (a cluster's are on other nodes) cannot size the plan."""
    plan = _plan(family, "auto", "cuda", None)
    assert plan.placement == "resident" and plan.budget_gib is None and "budget unknown here" in plan.line()
    assert _plan(family, "streamed", "cuda", None).placement == "streamed"


def test_the_scoring_term_is_the_fitness_batch_the_workers_will_score(tiny_cfg):
    """The planner encodes the samples as the workers do: its batch is the samples (fewer
    than the 160 a batch holds) by the longest item, on every split the run scores."""
    from evomerge.experiments.run import _scoring_batch, prepare, with_memory_plan
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.scoring import load_tokenizer
    from evomerge.search.memory import SCORE_ROWS, SCORE_WIDTH

    prep = prepare(tiny_cfg(), log=lambda _: None)
    tokenizer = load_tokenizer(Path(prep.spec.sources[prep.spec.model_ref]))
    widths = []
    for split in ("search", "validation", "test"):
        ev = Evaluator(prep.cfg.fitness, zoo_root=Path(prep.spec.zoo_root), seed=prep.spec.seed, split=split)
        widths += [int(ev._encode(name, tokenizer).ids.shape[1]) for name in ev.items]
    rows, width, answers = _scoring_batch(prep)
    assert rows == 20 < SCORE_ROWS and width == max(widths) < SCORE_WIDTH and answers >= 1
    fp = footprint(
        [
            prep.spec.sources[prep.spec.model_ref],
            *(p for r, p in prep.spec.sources.items() if r != prep.spec.model_ref),
        ],
        4,
    )
    planned = with_memory_plan(prep).memory
    assert planned.device_gib == pytest.approx(fp.scoring(rows, width, answers).device_bytes("resident", "cpu") / GIB)
    assert planned.device_gib < fp.device_bytes("resident", "cpu") / GIB  # the default batch is larger
