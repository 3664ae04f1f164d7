"""Each operator against its reference formula (OPERATORS.md) on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.operators import sparsify
from evomerge.operators.registry import get_operator

G = torch.Generator().manual_seed(0)
BASE = torch.randn(4, 6, generator=G)
A = BASE + 0.3 * torch.randn(4, 6, generator=G)
B = BASE + 0.3 * torch.randn(4, 6, generator=G)
C = BASE + 0.3 * torch.randn(4, 6, generator=G)


def run(name, tensors, base=None, seed=0, **params):
    op = get_operator(name)
    full = {p.name: p.default for p in op.params}
    full.update(params)
    for p in op.params:
        if p.per_model and not isinstance(full[p.name], list):
            full[p.name] = [full[p.name]] * len(tensors)
    return op.fn(list(tensors), base, torch.Generator().manual_seed(seed), **full)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_linear():
    close(run("linear", [A, B], weight=[0.3, 0.9]), (0.3 * A + 0.9 * B) / 1.2)
    close(run("linear", [A, B], weight=[0.3, 0.9], normalize=False), 0.3 * A + 0.9 * B)


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(MergeError, match="sum to ~0"):
        run("linear", [A, B], weight=[1.0, -1.0])


def _slerp_ref(t, v0, v1):
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    dot = float((u0 * u1).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    om = math.acos(dot)
    return math.sin((1 - t) * om) / math.sin(om) * v0 + math.sin(t * om) / math.sin(om) * v1


def test_slerp():
    x, y = torch.randn(4, 6, generator=G), torch.randn(4, 6, generator=G)
    for t in (0.0, 0.25, 1.0):
        close(run("slerp", [y], x, t=t), _slerp_ref(t, x, y))
    close(run("slerp", [A], BASE, t=0.4), _slerp_ref(0.4, BASE, A))  # nearly colinear -> lerp


def test_nuslerp_matches_slerp_of_task_vectors():
    w = [0.25, 0.75]
    t = 0.75
    expected = BASE + _slerp_ref(t, (A - BASE).reshape(-1), (B - BASE).reshape(-1)).view(4, 6)
    close(run("nuslerp", [A, B], BASE, weight=w), expected)


def test_nuslerp_row_wise():
    out = run("nuslerp", [A, B], None, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=False)
    rows = torch.stack([_slerp_ref(0.5, A[i], B[i]) for i in range(4)])
    close(out, rows)


def test_multislerp_two_equal_norms_is_slerp_midpoint():
    x = torch.randn(10, generator=G)
    y = torch.randn(10, generator=G)
    y = y / y.norm() * x.norm()
    close(run("multislerp", [x, y], None, weight=[1.0, 1.0]), _slerp_ref(0.5, x, y), tol=1e-4)


def test_task_arithmetic():
    out = run("task_arithmetic", [A, B], BASE, weight=[0.5, 1.5], **{"lambda": 0.8})
    close(out, BASE + 0.8 * (0.5 * (A - BASE) + 1.5 * (B - BASE)))


def _trim(tv, density):
    k = max(1, int(density * tv.numel()))
    flat = tv.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().argsort(descending=True)[:k]] = 1
    return (flat * keep).view(tv.shape)


def test_ties_reference():
    w = [0.7, 0.4, 1.1]
    d = [0.5, 0.3, 0.8]
    tvs = [_trim(t - BASE, di) * wi for t, wi, di in zip([A, B, C], w, d)]
    total = sum(tvs)
    out = torch.zeros_like(BASE)
    for i in range(BASE.numel()):
        sign = 1.0 if float(total.view(-1)[i]) >= 0 else -1.0
        num = den = 0.0
        for tv, wi in zip(tvs, w):
            v = float(tv.view(-1)[i])
            if v != 0 and math.copysign(1.0, v) == sign:
                num += v
                den += wi
        out.view(-1)[i] = num / (den if den else 1.0)
    close(run("ties", [A, B, C], BASE, weight=w, density=d), BASE + out)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_the_election_runs_slice_by_slice_with_the_same_bits(method, monkeypatch):
    from evomerge.operators import methods

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(37, 29, generator=gen)
    models = [base + 0.1 * torch.randn(37, 29, generator=gen) for _ in range(3)]
    models.append((base.t() + 0.1 * torch.randn(29, 37, generator=gen)).t())  # a non-contiguous input
    params = {"weight": [0.7, -0.4, 1.1, 0.5], "density": [0.5, 0.3, 0.8, 0.6]}
    whole = run(method, models, base.t().contiguous().t(), seed=2, **params)  # non-contiguous base
    monkeypatch.setattr(methods, "CONSENSUS_CHUNK", 100)  # 11 slices, the last one short
    sliced = run(method, models, base.t().contiguous().t(), seed=2, **params)
    assert torch.equal(whole, sliced)


def test_dare_linear_against_its_formula_below_density_one():
    """DARE (Yu et al. 2024, Eq. 2-3): tau_i * m_i, m_i ~ Bernoulli(p) drawn from the
    tensor's seed and model i's stream, rescaled to tau_i's L1 norm, then weighted and
    summed onto the base (no normalisation for dare_linear), times lambda."""
    weight, density, lam = [0.7, 0.4], [0.5, 0.3], 0.9
    gen = torch.Generator().manual_seed(11)
    expected = torch.zeros_like(BASE)
    for i, (t, w, d) in enumerate(zip([A, B], weight, density)):
        tau = t - BASE
        mask = sparsify.bernoulli(tau, d, gen, stream=i)
        assert 0 < mask.sum() < mask.numel()  # entries were dropped: not task arithmetic in disguise
        kept = tau * mask
        expected += w * kept * (tau.abs().sum() / kept.abs().sum())
    expected = BASE + lam * expected
    out = run("dare_linear", [A, B], BASE, seed=11, weight=weight, density=density, **{"lambda": lam})
    close(out, expected)
    plain = run("task_arithmetic", [A, B], BASE, weight=weight, **{"lambda": lam})
    assert not torch.allclose(out, plain)


def test_dare_keeps_l1_norm_and_is_seeded():
    big_base = torch.zeros(20000)
    x = torch.randn(20000, generator=G)
    out = run("dare_linear", [x], big_base, seed=3, density=[0.3])
    assert math.isclose(float(out.abs().sum()), float(x.abs().sum()), rel_tol=1e-4)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02
    assert torch.equal(out, run("dare_linear", [x], big_base, seed=3, density=[0.3]))


def test_breadcrumbs_reference():
    tv = torch.arange(1, 25, dtype=torch.float32).view(4, 6)
    out = run("breadcrumbs", [BASE + tv], BASE, density=[0.5], gamma=[0.1]) - BASE
    expected = torch.where((tv > 22 - 12) & (tv <= 22), tv, torch.zeros_like(tv))
    close(out, expected, tol=1e-4)


def test_della_probabilities_and_errors():
    with pytest.raises(MergeError, match="density"):
        run("della", [A], BASE, density=[0.1], epsilon=[0.15])
    out = run("della_linear", [A], BASE, density=[0.5], epsilon=[0.1], rescale=False) - BASE
    tv = A - BASE
    assert torch.equal((out != 0), (out == tv) & (tv != 0))


def test_model_stock_reference():
    tvs = [(t - BASE).reshape(-1) for t in (A, B, C)]
    cos = [float(torch.dot(tvs[i], tvs[j]) / (tvs[i].norm() * tvs[j].norm())) for i, j in ((0, 1), (0, 2), (1, 2))]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    close(run("model_stock", [A, B, C], BASE), t * (A + B + C) / 3 + (1 - t) * BASE)


def test_karcher_of_two_is_slerp_midpoint_scaled():
    x = torch.randn(12, generator=G)
    y = torch.randn(12, generator=G)
    out = run("karcher", [x, y], weight=[1.0, 1.0], max_iter=50, tol=1e-9)
    mid = _slerp_ref(0.5, x / x.norm(), y / y.norm())
    expected = mid / mid.norm() * (x.norm() + y.norm()) / 2
    close(out, expected, tol=1e-4)


def test_sce_reference_full_selection():
    tvs = torch.stack([A - BASE, B - BASE])
    energy = tvs.pow(2).mean(dim=(1, 2))
    w = (energy / energy.sum()).view(2, 1, 1)
    sign = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    keep = (tvs.sign() == sign).float()
    expected = BASE + (tvs * w * keep).sum(0) / (w * keep).sum(0).clamp(min=1e-6)
    close(run("sce", [A, B], BASE), expected)


def test_nearswap_reference():
    t = 0.05
    w = (t / (BASE - A).abs().clamp(min=1e-6)).clamp(0, 1)
    close(run("nearswap", [A], BASE, t=t), w * A + (1 - w) * BASE)


def test_passthrough_scale():
    close(run("passthrough", [A], scale=[0.5]), 0.5 * A)
