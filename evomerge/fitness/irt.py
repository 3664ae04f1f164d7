"""A task's accuracy from a few of its items: item response theory (IRT), as in
tinyBenchmarks (Polo et al., ICML 2024) and MERGE3 (Mencattini et al., ICML 2025).

The two-parameter logistic model (2PL): model m answers item i correctly with

    P(y_mi = 1) = sigmoid(a_i * theta_m - b_i)

theta_m the model's ability, a_i the item's discrimination, b_i its difficulty.

Calibration fits a and b (and the calibration models' theta) by joint maximum a
posteriori on the per-item correctness of a few fully scored models, under the priors
theta ~ N(0, 1), log a ~ N(0, 1), b ~ N(0, 3^2): with a handful of models the priors keep
the items that every calibration model gets right (or wrong) finite.

Anchors: stratified sampling (Cochran, Sampling Techniques, 5.5) over strata of items
that the calibration models answer alike: k-means clusters of the items' correctness
vectors (tinyBenchmarks' "anchor points"), up to 2k of them. The k anchors are shared
out by Neyman allocation, n_h proportional to N_h * s_h, with s_h^2 = p_h (1 - p_h) and
p_h the stratum's calibration correctness, Laplace-smoothed (s + 1) / (n + 2): strata
that every calibration model gets right (or wrong) get few anchors or none, the items
where models differ, which decide between good candidates, get most. In a stratum, the
item nearest its centre first, then seeded draws; each anchor weighs N_h / (n_h N). A
stratum left without anchors counts at its calibration correctness (``rest``).

A candidate answers the anchors only (y_j, j in A). Its accuracy over the N items:

- anchor:  rest + sum_j w_j y_j
- p-IRT:   (sum_{j in A} y_j + sum_{i not in A} sigmoid(a_i theta^ - b_i)) / N, theta^ the MAP
  ability given the anchors' answers (a and b fixed)
- gp-IRT:  lambda * anchor + (1 - lambda) * p-IRT, lambda per task by least squares over the
  calibration models, each estimated with anchors and item parameters chosen and fitted
  without it (leave one out)

The estimate is gp-IRT. All arithmetic in float64 on the CPU: deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge.errors import EvomergeError

_THETA_GRID = torch.linspace(-6.0, 6.0, 2401, dtype=torch.float64)  # abilities the MAP search tries (0.005 apart)
_B_PRIOR_SD = 3.0


@dataclass
class TaskIrt:
    """One task's calibrated estimator (positions are in the task's sample order)."""

    anchors: list[int]
    weights: list[float]  # each anchor's share of the items (sum 1)
    a: list[float]  # every item's discrimination
    b: list[float]  # and difficulty
    lam: float  # gp-IRT's weight of the anchor estimate
    loo_error: float = 0.0  # mean absolute error of the estimate over the calibration models, left out in turn
    rest: float = 0.0  # the strata without anchors: their share of the items times their calibration correctness

    def estimate(self, answers: Sequence[bool]) -> float:
        """The task's accuracy over all its items from the answers on its first
        ``len(answers)`` anchors (a pruned candidate has answered only some)."""
        if not answers:
            raise EvomergeError("fitness.anchors: no anchor answered")
        a, b = torch.tensor(self.a, dtype=torch.float64), torch.tensor(self.b, dtype=torch.float64)
        return combine(self.lam, *_estimates(a, b, Anchors(self.anchors, self.weights, self.rest), answers))


@dataclass
class IrtEstimator:
    """Per-task estimators and what they were calibrated on."""

    tasks: dict[str, TaskIrt]
    calibration: list[str] = field(default_factory=list)  # the fully scored models, by name

    def anchors(self) -> dict[str, list[int]]:
        return {name: list(t.anchors) for name, t in self.tasks.items()}

    def estimate(self, per_sample: dict[str, list[bool]]) -> dict[str, float]:
        """Each task's estimated accuracy from the answers on its anchors."""
        return {name: t.estimate(per_sample[name]) for name, t in self.tasks.items()}

    def to_json(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "tasks": {n: asdict(t) for n, t in self.tasks.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IrtEstimator:
        return cls({n: TaskIrt(**t) for n, t in data["tasks"].items()}, list(data.get("calibration", [])))


def fit_2pl(y: torch.Tensor, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint MAP fit of the 2PL model to ``y`` (models x items, 0/1): (theta, a, b)."""
    y = y.to(torch.float64)
    mean = y.mean(0).clamp(0.05, 0.95)
    theta = torch.zeros(y.shape[0], dtype=torch.float64, requires_grad=True)
    log_a = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    b = (-torch.log(mean / (1 - mean))).clone().requires_grad_(True)  # logit^-1 of each item's mean correctness
    opt = torch.optim.LBFGS([theta, log_a, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def loss() -> torch.Tensor:
        opt.zero_grad()
        z = log_a.exp() * theta[:, None] - b
        # -log posterior: Bernoulli likelihood (as softplus), then the three Gaussian priors
        nll = (torch.nn.functional.softplus(z) - y * z).sum()
        prior = 0.5 * (theta**2).sum() + 0.5 * (log_a**2).sum() + 0.5 * ((b / _B_PRIOR_SD) ** 2).sum()
        value = nll + prior
        value.backward()
        return value

    opt.step(loss)
    return theta.detach(), log_a.detach().exp(), b.detach()


def ability(answers: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """The MAP ability (prior N(0, 1)) of a model that gave ``answers`` to items (a, b), on a grid."""
    z = _THETA_GRID[:, None] * a[None, :] - b[None, :]
    y = answers.to(torch.float64)[None, :]
    log_post = -(torch.nn.functional.softplus(z) - y * z).sum(1) - 0.5 * _THETA_GRID**2
    return float(_THETA_GRID[int(log_post.argmax())])


@dataclass
class Anchors:
    """A task's anchor items, their weights (summing to the share of the items in anchored
    strata) and ``rest``, what the unanchored strata add (share times correctness)."""

    items: list[int]
    weights: list[float]
    rest: float = 0.0


def _estimates(a: torch.Tensor, b: torch.Tensor, anchors: Anchors, answers: Sequence[bool]) -> tuple[float, float]:
    """(anchor, p-IRT) estimates from the answers on the first ``len(answers)`` anchors
    (those answered stand for all the anchored strata)."""
    n = len(answers)
    idx = torch.tensor(list(anchors.items[:n]), dtype=torch.long)
    y = torch.tensor([float(v) for v in answers], dtype=torch.float64)
    w = torch.tensor(list(anchors.weights[:n]), dtype=torch.float64)
    anchor = anchors.rest + sum(anchors.weights) * float((w * y).sum() / w.sum())
    theta = ability(y, a[idx], b[idx])
    p = torch.sigmoid(a * theta - b)
    p[idx] = y  # the answered items count as answered
    return anchor, float(p.mean())


def combine(lam: float, anchor: float, pirt: float) -> float:
    return lam * anchor + (1.0 - lam) * pirt


def pick_anchors(y: torch.Tensor, k: int, seed: int) -> Anchors:
    """``k`` anchor items of ``y`` (models x items), their weights and the unanchored
    strata's part: strata by k-means over the items' correctness vectors, anchors shared
    out by Neyman allocation (module docstring)."""
    from sklearn.cluster import KMeans

    items = y.shape[1]
    points = y.to(torch.float64).T.numpy()
    distinct = len({tuple(row) for row in points.tolist()})
    km = KMeans(n_clusters=min(2 * k, distinct), n_init=10, random_state=seed).fit(points)
    labels = torch.tensor(km.labels_, dtype=torch.long)
    centres = torch.tensor(km.cluster_centers_, dtype=torch.float64)
    strata = [m for m in (torch.nonzero(labels == c).flatten() for c in range(len(centres))) if len(m)]
    share = neyman([len(m) for m in strata], [_smoothed(y[:, m]) for m in strata], k)
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, float] = {}
    rest = 0.0
    for m, n in zip(strata, share):
        if n == 0:
            rest += len(m) / items * float(y[:, m].to(torch.float64).mean())
            continue
        dist = ((torch.tensor(points[m.numpy()]) - centres[int(labels[m[0]])]) ** 2).sum(1)
        nearest = int(m[int(dist.argmin())])
        others = m[m != nearest]
        for i in [nearest, *others[torch.randperm(len(others), generator=gen)[: n - 1]].tolist()]:
            chosen[int(i)] = len(m) / items / n
    order = sorted(chosen)  # a stable, readable order
    return Anchors(order, [chosen[i] for i in order], rest)


def _smoothed(y: torch.Tensor) -> float:
    """Laplace-smoothed correctness of a stratum's answers: (right + 1) / (answers + 2)."""
    return (float(y.to(torch.float64).sum()) + 1.0) / (y.numel() + 2.0)


def neyman(sizes: Sequence[int], p: Sequence[float], k: int) -> list[int]:
    """Anchors per stratum: k shared in proportion to N_h * sqrt(p_h (1 - p_h)) (by size
    where every spread is 0), at most N_h each (a stratum the share would overfill is
    taken whole and the rest shared again), whole numbers by largest remainder (Cochran
    5.5, 5.9)."""
    spread = [n * (q * (1.0 - q)) ** 0.5 for n, q in zip(sizes, p)]
    total = min(k, sum(sizes))
    whole: set[int] = set()
    ideal: dict[int, float] = {}
    while True:
        open_ = [h for h in range(len(sizes)) if h not in whole]
        if not open_:
            break
        budget = total - sum(sizes[h] for h in whole)
        key = spread if any(spread[h] for h in open_) else [float(n) for n in sizes]
        norm = sum(key[h] for h in open_)
        ideal = {h: budget * key[h] / norm for h in open_}
        full = {h for h in open_ if ideal[h] >= sizes[h]}
        if not full:
            break
        whole |= full
    share = [sizes[h] if h in whole else int(ideal[h]) for h in range(len(sizes))]
    by_remainder = sorted(open_, key=lambda h: (int(ideal[h]) - ideal[h], h))
    for h in by_remainder[: total - sum(share)]:
        share[h] += 1
    return share


def calibrate_task(y: torch.Tensor, k: int, seed: int) -> TaskIrt:
    """A task's estimator from the correctness ``y`` (models x items) of the calibration models."""
    models, items = y.shape
    if k >= items:
        raise EvomergeError(f"fitness.anchors: {k} anchors, but the task has only {items} items (use fewer)")
    if models < 3:
        raise EvomergeError(f"fitness.estimator irt: {models} calibration model(s); it needs at least 3")
    y = y.to(torch.float64)
    anchors = pick_anchors(y, k, seed)
    _, a, b = fit_2pl(y)
    # lambda: least squares of lambda*anchor + (1-lambda)*pirt against the truth, over the
    # calibration models, each estimated from anchors and item parameters chosen and
    # fitted without it (as a candidate of the search is)
    pairs, truth = [], []
    for m in range(models):
        rest = torch.cat([y[:m], y[m + 1 :]])
        anchors_m = pick_anchors(rest, k, seed)
        _, a_m, b_m = fit_2pl(rest)
        answers = [bool(v) for v in y[m, anchors_m.items].tolist()]
        pairs.append(_estimates(a_m, b_m, anchors_m, answers))
        truth.append(float(y[m].mean()))
    anchor_est = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    pirt = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    t = torch.tensor(truth, dtype=torch.float64)
    gap = anchor_est - pirt
    lam = float(((t - pirt) * gap).sum() / (gap**2).sum()) if float((gap**2).sum()) > 1e-12 else 0.5
    lam = min(max(lam, 0.0), 1.0)
    loo = float((lam * anchor_est + (1 - lam) * pirt - t).abs().mean())
    return TaskIrt(anchors.items, anchors.weights, a.tolist(), b.tolist(), lam, loo, anchors.rest)


def calibrate(responses: dict[str, torch.Tensor], k: int, seed: int, names: Sequence[str] = ()) -> IrtEstimator:
    """Per-task estimators from each task's correctness matrix (models x items)."""
    tasks = {task: calibrate_task(y, k, seed) for task, y in responses.items()}
    return IrtEstimator(tasks, list(names))
