"""The item response estimator on seeded synthetic responses drawn from a 2PL model."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.fitness.irt import IrtEstimator, ability, calibrate, fit_2pl, neyman, pick_anchors


def _draw(a: torch.Tensor, b: torch.Tensor, thetas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Models x items correctness drawn from P = sigmoid(a theta - b)."""
    p = torch.sigmoid(a * thetas[:, None] - b)
    return torch.rand(p.shape, generator=gen, dtype=torch.float64) < p


@pytest.fixture(scope="module")
def items():
    gen = torch.Generator().manual_seed(0)
    a = torch.exp(0.4 * torch.randn(200, generator=gen, dtype=torch.float64))
    b = 1.5 * torch.randn(200, generator=gen, dtype=torch.float64)
    return a, b, gen


def test_the_fit_orders_items_by_difficulty_and_models_by_ability(items):
    a, b, gen = items
    thetas = torch.linspace(-2, 2, 12, dtype=torch.float64)
    theta, _, b_hat = fit_2pl(_draw(a, b, thetas, gen))
    assert torch.corrcoef(torch.stack([b_hat, b]))[0, 1] > 0.8
    assert torch.corrcoef(torch.stack([theta, thetas]))[0, 1] > 0.95


def test_ability_is_the_map_of_the_answers():
    a, b = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert ability(torch.tensor([True] * 4), a, b) > 0.5 > -0.5 > ability(torch.tensor([False] * 4), a, b)
    assert ability(torch.tensor([True, False, True, False]), a, b) == pytest.approx(0.0, abs=0.01)


def test_anchors_are_k_items_whose_weights_cover_the_task():
    y = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)  # 4 distinct columns
    for k in (2, 4, 5):
        picked = pick_anchors(y, k, seed=0)
        assert len(picked.items) == len(set(picked.items)) == k
        # the anchored strata's share plus the unanchored ones' (at their calibration correctness)
        unanchored = 1.0 - sum(picked.weights)
        assert 0.0 <= picked.rest <= unanchored + 1e-12
    picked = pick_anchors(y, 4, seed=0)
    # one anchor per distinct pattern, weighted by how many items share it
    assert sorted({tuple(y[:, i].tolist()) for i in picked.items}) == sorted({tuple(c) for c in y.T.tolist()})
    assert sorted(picked.weights) == pytest.approx(sorted([1 / 6, 1 / 6, 2 / 6, 2 / 6])) and picked.rest == 0.0


def test_neyman_allocation_spends_anchors_where_the_models_differ():
    # a big stratum every model gets right, a small one where they split evenly
    assert neyman([200, 20], [0.9999, 0.5], 10) == [2, 8]
    assert neyman([3, 2], [0.5, 0.5], 10) == [3, 2]  # no more than the items
    assert neyman([1, 1, 1, 1, 1], [0.5] * 5, 3) == [1, 1, 1, 0, 0]
    assert neyman([4, 4], [1.0, 0.0], 4) == [2, 2]  # no spread anywhere: by size
    y = torch.zeros(4, 100, dtype=torch.bool)
    y[:, :80] = True  # 80 items all four models get right
    y[:2, 80:] = True  # 20 that half of them do
    picked = pick_anchors(y, 5, seed=0)
    assert sum(i >= 80 for i in picked.items) == 3  # 3 of 5 on a fifth of the items (1 by their share)


def test_estimates_of_unseen_models_beat_the_anchors_alone_as_a_random_subset(items):
    """Calibrated on 10 models, the estimate of 100 others from 20 anchors is closer to
    their accuracy over all 200 items than the mean of 20 random items."""
    a, b, gen = items
    est = calibrate({"t": _draw(a, b, torch.randn(10, generator=gen, dtype=torch.float64), gen)}, 20, seed=0)
    task = est.tasks["t"]
    y = _draw(a, b, torch.randn(100, generator=gen, dtype=torch.float64), gen)
    truth = y.to(torch.float64).mean(1)
    estimated = torch.tensor([task.estimate(y[m, task.anchors].tolist()) for m in range(100)])
    random = torch.stack([y[m, torch.randperm(200, generator=gen)[:20]].to(torch.float64).mean() for m in range(100)])
    irt_error, random_error = (estimated - truth).abs().mean(), (random - truth).abs().mean()
    assert irt_error < random_error, (irt_error, random_error)
    assert 0.0 <= task.lam <= 1.0 and task.loo_error > 0


def test_a_partial_answer_list_estimates_from_the_first_anchors(items):
    a, b, gen = items
    est = calibrate({"t": _draw(a, b, torch.randn(6, generator=gen, dtype=torch.float64), gen)}, 10, seed=1)
    task = est.tasks["t"]
    assert 0.0 <= task.estimate([True, False, True]) <= 1.0
    with pytest.raises(EvomergeError, match="no anchor answered"):
        task.estimate([])


def test_the_estimator_round_trips_through_json(items):
    a, b, gen = items
    est = calibrate({"t": _draw(a, b, torch.randn(5, generator=gen, dtype=torch.float64), gen)}, 10, 0, ["m"] * 5)
    back = IrtEstimator.from_json(est.to_json())
    answers = {"t": [bool(i % 2) for i in range(10)]}
    assert back.estimate(answers) == est.estimate(answers) and back.anchors() == est.anchors()


def test_too_many_anchors_or_too_few_models_is_one_line(items):
    a, b, gen = items
    y = _draw(a, b, torch.zeros(4, dtype=torch.float64), gen)
    with pytest.raises(EvomergeError, match="200 anchors, but the task has only 200 items"):
        calibrate({"t": y}, 200, 0)
    with pytest.raises(EvomergeError, match="at least 3"):
        calibrate({"t": y[:2]}, 10, 0)
