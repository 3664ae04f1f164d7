"""A task's accuracy from a few of its items: item response theory (IRT), as in
tinyBenchmarks (Polo et al., ICML 2024) and MERGE3 (Mencattini et al., ICML 2025).

The two-parameter logistic model (2PL): model m answers item i correctly with

    P(y_mi = 1) = sigmoid(a_i * theta_m - b_i)

theta_m the model's ability, a_i the item's discrimination, b_i its difficulty.

Calibration fits a and b (and the calibration models' theta) by joint maximum a
posteriori on the per-item correctness of a few fully scored models, under the priors
theta ~ N(0, 1), log a ~ N(0, 1), b ~ N(0, 3^2): with a handful of models the priors keep
the items that every calibration model gets right (or wrong) finite.

Anchors: the k items nearest the centres of k-means clusters of the items' correctness
over the calibration models (tinyBenchmarks' "anchor points"); each anchor stands for
its cluster, weight = cluster size / N. Where the items fall into fewer distinct
clusters than k, the extra anchors go to the largest clusters (stratified sampling).

A candidate answers the anchors only (y_j, j in A). Its accuracy over the N items:

- anchor:  sum_j w_j y_j
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

    def estimate(self, answers: Sequence[bool]) -> float:
        """The task's accuracy over all its items from the answers on its first
        ``len(answers)`` anchors (a pruned candidate has answered only some)."""
        if not answers:
            raise EvomergeError("fitness.anchors: no anchor answered")
        a, b = torch.tensor(self.a, dtype=torch.float64), torch.tensor(self.b, dtype=torch.float64)
        return combine(self.lam, *_estimates(a, b, self.anchors, self.weights, answers))


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


def _estimates(
    a: torch.Tensor, b: torch.Tensor, anchors: Sequence[int], weights: Sequence[float], answers: Sequence[bool]
) -> tuple[float, float]:
    """(anchor, p-IRT) estimates from the answers on the first ``len(answers)`` anchors."""
    n = len(answers)
    idx = torch.tensor(list(anchors[:n]), dtype=torch.long)
    y = torch.tensor([float(v) for v in answers], dtype=torch.float64)
    w = torch.tensor(list(weights[:n]), dtype=torch.float64)
    anchor = float((w * y).sum() / w.sum())
    theta = ability(y, a[idx], b[idx])
    p = torch.sigmoid(a * theta - b)
    p[idx] = y  # the answered items count as answered
    return anchor, float(p.mean())


def combine(lam: float, anchor: float, pirt: float) -> float:
    return lam * anchor + (1.0 - lam) * pirt


def pick_anchors(y: torch.Tensor, k: int, seed: int) -> tuple[list[int], list[float]]:
    """``k`` anchor items of ``y`` (models x items) and their weights: k-means over the
    items' correctness vectors, the item nearest each centre; where there are fewer
    distinct clusters than ``k``, more anchors (seeded draws) in the largest ones."""
    from sklearn.cluster import KMeans

    items = y.shape[1]
    points = y.to(torch.float64).T.numpy()
    distinct = len({tuple(row) for row in points.tolist()})
    clusters = min(k, distinct)
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(points)
    labels = torch.tensor(km.labels_, dtype=torch.long)
    centres = torch.tensor(km.cluster_centers_, dtype=torch.float64)
    members = [torch.nonzero(labels == c).flatten() for c in range(clusters)]
    members = [m for m in members if len(m)]
    # anchors per cluster: one each, the rest to the clusters with the most items per anchor
    share = [1] * len(members)
    for _ in range(k - len(members)):
        c = max(range(len(members)), key=lambda i: (len(members[i]) / share[i], -i))
        share[c] = min(share[c] + 1, len(members[c]))
    gen = torch.Generator().manual_seed(seed)
    anchors: list[int] = []
    weights: list[float] = []
    for c, m in enumerate(members):
        dist = ((torch.tensor(points[m.numpy()]) - centres[int(labels[m[0]])]) ** 2).sum(1)
        nearest = int(m[int(dist.argmin())])
        rest = m[m != nearest]
        extra = rest[torch.randperm(len(rest), generator=gen)[: share[c] - 1]].tolist()
        chosen = [nearest, *extra]
        anchors += chosen
        weights += [len(m) / items / len(chosen)] * len(chosen)
    order = sorted(range(len(anchors)), key=lambda i: anchors[i])  # a stable, readable order
    return [anchors[i] for i in order], [weights[i] for i in order]


def calibrate_task(y: torch.Tensor, k: int, seed: int) -> TaskIrt:
    """A task's estimator from the correctness ``y`` (models x items) of the calibration models."""
    models, items = y.shape
    if k >= items:
        raise EvomergeError(f"fitness.anchors: {k} anchors, but the task has only {items} items (use fewer)")
    if models < 3:
        raise EvomergeError(f"fitness.estimator irt: {models} calibration model(s); it needs at least 3")
    y = y.to(torch.float64)
    anchors, weights = pick_anchors(y, k, seed)
    _, a, b = fit_2pl(y)
    # lambda: least squares of lambda*anchor + (1-lambda)*pirt against the truth, over the
    # calibration models, each estimated from anchors and item parameters chosen and
    # fitted without it (as a candidate of the search is)
    pairs, truth = [], []
    for m in range(models):
        rest = torch.cat([y[:m], y[m + 1 :]])
        anchors_m, weights_m = pick_anchors(rest, k, seed)
        _, a_m, b_m = fit_2pl(rest)
        answers = [bool(v) for v in y[m, anchors_m].tolist()]
        pairs.append(_estimates(a_m, b_m, anchors_m, weights_m, answers))
        truth.append(float(y[m].mean()))
    anchor_est = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    pirt = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    t = torch.tensor(truth, dtype=torch.float64)
    gap = anchor_est - pirt
    lam = float(((t - pirt) * gap).sum() / (gap**2).sum()) if float((gap**2).sum()) > 1e-12 else 0.5
    lam = min(max(lam, 0.0), 1.0)
    loo = float((lam * anchor_est + (1 - lam) * pirt - t).abs().mean())
    return TaskIrt(anchors, weights, a.tolist(), b.tolist(), lam, loo)


def calibrate(responses: dict[str, torch.Tensor], k: int, seed: int, names: Sequence[str] = ()) -> IrtEstimator:
    """Per-task estimators from each task's correctness matrix (models x items)."""
    tasks = {task: calibrate_task(y, k, seed) for task, y in responses.items()}
    return IrtEstimator(tasks, list(names))
