"""One contract, every registered operator: shape and dtype kept, identical inputs give
themselves back, a one-hot weight gives that input, the same seed gives the same output."""

from __future__ import annotations

import pytest
import torch

from evomerge.operators.finite import NonFiniteResult
from evomerge.operators.registry import Operator, operators

OPS = sorted(operators())


def _inputs(op: Operator, n: int, seed: int = 0, shape=(6, 8)):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    tensors = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(n)]
    return tensors, (base if op.base != "none" else None)


def _n_models(op: Operator) -> int:
    return op.max_models if op.max_models is not None else max(op.min_models, 3)


def _params(op: Operator, n: int, **over) -> dict:
    out = {}
    for p in op.params:
        value = over.get(p.name, p.default)
        if value is None:  # required: take the middle of its search range
            lo, hi = p.search or (0.0, 1.0)
            value = (lo * hi) ** 0.5 if p.log else (lo + hi) / 2
        out[p.name] = [value] * n if p.per_model and not isinstance(value, list) else value
    return out


def _call(op: Operator, tensors, base, seed=0, **over):
    """``op`` on the tensors with its defaults, ``over`` replacing them (the engine's
    ``out_dtype`` and ``out`` keywords passed as they are)."""
    gen = torch.Generator().manual_seed(seed)
    engine = {k: over.pop(k) for k in ("out_dtype", "out") if k in over}
    return op.fn(tensors, base, gen, **_params(op, len(tensors), **over), **engine)


@pytest.mark.parametrize("name", OPS)
def test_keeps_shape_and_dtype(name):
    op = operators()[name]
    tensors, base = _inputs(op, _n_models(op))
    out = _call(op, tensors, base)
    assert out.shape == tensors[0].shape and out.dtype == tensors[0].dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OPS)
def test_identical_inputs_give_themselves(name):
    op = operators()[name]
    n = _n_models(op)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    out = _call(op, [x.clone() for _ in range(n)], x.clone() if op.base != "none" else None)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in OPS if operators()[n].param("weight") is not None])
def test_one_hot_weight_gives_that_input(name):
    op = operators()[name]
    n = _n_models(op)
    tensors, base = _inputs(op, n, seed=5)
    for hot in range(n):
        weight = [1.0 if i == hot else 0.0 for i in range(n)]
        out = _call(op, tensors, base, weight=weight)
        torch.testing.assert_close(out, tensors[hot], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OPS)
def test_same_seed_same_output(name):
    op = operators()[name]
    tensors, base = _inputs(op, _n_models(op), seed=7)
    over = {"density": 0.5} if op.param("density") else {}
    a = _call(op, tensors, base, seed=11, **over)
    b = _call(op, tensors, base, seed=11, **over)
    assert torch.equal(a, b)
    if op.random:
        c = _call(op, tensors, base, seed=12, **over)
        assert not torch.equal(a, c), "a random operator ignored its generator"


@pytest.mark.parametrize("name", OPS)
def test_declared_parameters_are_complete(name):
    op = operators()[name]
    assert op.doc, f"{name} has no docstring"
    for p in op.params:
        if p.default is not None and p.kind is not bool:
            assert p.check(p.default, "default") == p.default
        if p.search is not None:
            assert p.search[0] < p.search[1]


PROPAGATING = [n for n in OPS if operators()[n].nonfinite_propagates]


@pytest.mark.parametrize("name", PROPAGATING)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_input_gives_nonfinite_result(name, bad, dtype):
    """What ``nonfinite_propagates`` promises (the engine then skips the input checks):
    one NaN or +-Inf in any input, a merged model's or the base's, on the torch path
    (small tensors) and the CPU kernels' (large ones), with several parameter sets."""
    op = operators()[name]
    n = _n_models(op)
    settings = [{}, {"weight": [0.0] + [1.0] * (n - 1)}]
    if op.param("density"):
        settings += [{"density": 0.3}, {"density": 1.0}]
    if op.param("lambda"):
        settings.append({"lambda": 0.0})
    if op.param("normalize"):
        settings.append({"normalize": not op.param("normalize").default})
    for shape in [(6, 8), (160, 128)]:
        tensors, base = _inputs(op, n, seed=2, shape=shape)
        tensors = [t.to(dtype) for t in tensors]
        base = base.to(dtype) if base is not None else None
        spots = [(i, pos) for i in range(n + (base is not None)) for pos in (0, tensors[0].numel() - 1, 37)]
        for over in settings:
            for i, pos in spots:
                ts = [t.clone() for t in tensors]
                b = base.clone() if base is not None else None
                target = ts[i] if i < n else b
                target.view(-1)[pos] = bad
                assert _nonfinite(op, ts, b, **over), f"{over} input {i} at {pos} gave a finite result"


def _nonfinite(op: Operator, tensors, base, **over) -> bool:
    """Whether the merge's result holds a NaN or Inf: an operator that ``checks_finite``
    says so by raising, any other returns it."""
    try:
        out = _call(op, tensors, base, **over)
    except NonFiniteResult:
        assert op.checks_finite, f"{op.name} raised NonFiniteResult without declaring checks_finite"
        return True
    stored = out.to(tensors[0].dtype)  # as the engine stores it: a value beyond the dtype's range is Inf there
    assert not op.checks_finite or torch.isfinite(stored).all(), f"{op.name} returned a non-finite result"
    return not torch.isfinite(stored).all()


@pytest.mark.parametrize("name", [n for n in OPS if operators()[n].checks_finite])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_operator_that_checks_its_result_raises_for_an_overflow(name, dtype):
    """What ``checks_finite`` promises when every input is finite: a result that
    overflows to Inf (in the stored dtype) raises, on the torch path and the kernels'."""
    op = operators()[name]
    n = _n_models(op)
    for shape in [(6, 8), (160, 128)]:
        tensors, base = _inputs(op, n, seed=4, shape=shape)
        base = torch.zeros(shape, dtype=dtype) if base is not None else None
        tensors = [t.to(dtype) for t in tensors]
        for t in tensors:
            t.view(-1)[5] = 3e38  # finite in both dtypes; their sum is not
        over = {"weight": [1.0] * n, "normalize": False, "density": 1.0, "lambda": 1.0}
        over = {k: v for k, v in over.items() if op.param(k) is not None}
        with pytest.raises(NonFiniteResult):
            _call(op, tensors, base, out_dtype=dtype, **over)


@pytest.mark.parametrize("name", [n for n in OPS if operators()[n].writes_out])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_operator_that_writes_out_stores_its_result_there(name, dtype):
    """What ``writes_out`` promises: the result, bit for bit, in the ``out`` tensor
    given (which comes back), on the torch path and the kernels'."""
    op = operators()[name]
    n = _n_models(op)
    for shape in [(6, 8), (160, 128)]:
        tensors, base = _inputs(op, n, seed=6, shape=shape)
        tensors = [t.to(dtype) for t in tensors]
        base = base.to(dtype) if base is not None else None
        want = _call(op, tensors, base, out_dtype=dtype)
        out = torch.full(shape, float("nan"), dtype=dtype)
        got = _call(op, tensors, base, out_dtype=dtype, out=out)
        assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
        assert torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("name", [n for n in OPS if operators()[n].elementwise])
def test_an_elementwise_operator_merges_a_concatenation_as_its_parts(name):
    """What ``elementwise`` promises: merging tensors end to end gives the merges end to
    end, bit for bit (float32 and bfloat16, parts large enough for the CPU kernels)."""
    op = operators()[name]
    n = _n_models(op)
    for dtype in (torch.float32, torch.bfloat16):
        parts = [_inputs(op, n, seed=s, shape=shape) for s, shape in enumerate([(64, 300), (7,), (128, 129)])]
        cast = lambda t, dtype=dtype: None if t is None else t.to(dtype)  # noqa: E731
        whole = _call(
            op,
            [torch.cat([cast(p[0][i]).reshape(-1) for p in parts]) for i in range(n)],
            None if parts[0][1] is None else torch.cat([cast(p[1]).reshape(-1) for p in parts]),
        )
        pieces = torch.cat([_call(op, [cast(t) for t in ts], cast(b)).reshape(-1) for ts, b in parts])
        assert torch.equal(whole, pieces)
