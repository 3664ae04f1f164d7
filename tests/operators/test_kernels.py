"""The numba kernels give the same bits as the torch path they replace on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from evomerge.operators import kernels, sparsify
from evomerge.operators.registry import get_operator


@pytest.fixture
def torch_path(monkeypatch):
    """Run the operators as if the kernels did not apply."""

    def run(fn, *args, **kw):
        with monkeypatch.context() as m:
            m.setattr(kernels, "supports", lambda *a: False)
            return fn(*args, **kw)

    return run


def test_numba_is_installed_and_the_kernels_compile():
    assert kernels.available()


def _inputs(seed: int, n_models: int, shape=(300, 257), dtype=torch.bfloat16, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    fts = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(n_models)]
    if ties:  # few distinct task-vector values: many entries tie at any threshold
        fts = [base + (t - base).mul(2000).round().div(2000) for t in fts]
    return [t.to(dtype) for t in fts], base.to(dtype)


@pytest.fixture(params=[True, False], ids=["vector-compress", "scalar-compact"])
def compaction(request, monkeypatch):
    """Both ways the capture compacts its keys (the choice follows the CPU)."""
    monkeypatch.setattr(kernels, "vector_compress", lambda: request.param)
    return request.param


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_topk_threshold_matches_the_torch_mask(seed, ties, torch_path, compaction):
    (x,), _ = _inputs(seed, 1, dtype=torch.float32, ties=ties)
    n = x.numel()
    for k in (1, 2, 37, n // 10, n // 2, n - 1):
        want = torch_path(sparsify.topk_mask, x, k)
        got = kernels.topk_mask(x, k)
        assert torch.equal(got, want), k
        xs = kernels._array(x)
        nb = kernels._blocks(n)
        by_hist = kernels._threshold_by_histograms(xs, None, k, nb)
        by_sample = kernels._threshold_by_sample(xs, None, k, nb)
        assert by_sample is None or (by_sample[0] == by_hist[0] and (by_sample[1] == by_hist[1]).all())


def test_a_missed_sample_bracket_falls_back_to_the_histograms(monkeypatch, torch_path, compaction):
    (x,), _ = _inputs(5, 1, dtype=torch.float32, ties=True)
    monkeypatch.setattr(kernels, "MARGIN_SD", 0.0)  # a bracket of +-8 sample ranks: often missed
    misses = 0
    for k in range(1000, x.numel(), 7919):
        xs = kernels._array(x)
        misses += kernels._threshold_by_sample(xs, None, k, kernels._blocks(x.numel())) is None
        assert torch.equal(kernels.topk_mask(x, k), torch_path(sparsify.topk_mask, x, k))
    assert misses > 0


@pytest.mark.parametrize("n", [16_411, 70_000])
@pytest.mark.parametrize("cap", [5, 100_000])
def test_capture_compacts_alike_both_ways(n, cap):
    """Vector compress and the scalar loop capture the same keys and indices, in index
    order, and count past a full buffer; indices are those of x - base."""
    (x,), base = _inputs(9, 1, shape=(n,), ties=True)
    xs, bs = kernels._array(x), kernels._array(base)
    keys = ((x.float() - base.float()).view(torch.int32) & 0x7FFFFFFF).long()
    lo, hi = (int(keys.sort().values[int(q * n)]) for q in (0.4, 0.6))
    nb = kernels._blocks(n)
    runs = [kernels._kernels().capture(xs, bs, lo, hi, cap, nb, compress) for compress in (True, False)]
    inside = ((keys >= lo) & (keys <= hi)).nonzero().flatten()
    for above, counts, got_keys, index in runs:
        assert int(above.sum()) == int((keys > hi).sum()) and int(counts.sum()) == inside.numel()
        starts = [kernels._kernels()._span(n, nb, b)[0] for b in range(nb)]
        if cap >= n:
            flat = torch.cat([torch.from_numpy(index[b, : counts[b]]).long() + starts[b] for b in range(nb)])
            assert torch.equal(flat, inside)
            got = torch.cat([torch.from_numpy(got_keys[b, : counts[b]].astype("int64")) for b in range(nb)])
            assert torch.equal(got, keys[inside])
    (_, c0, k0, i0), (_, c1, k1, i1) = runs
    for b in range(nb):
        m = min(int(c0[b]), cap)
        assert (k0[b, :m] == k1[b, :m]).all() and (i0[b, :m] == i1[b, :m]).all()


def test_all_zero_task_vectors_keep_k_by_tie_priority(torch_path):
    x = torch.zeros(40_000)
    mask = kernels.topk_mask(x, 123)
    assert int(mask.sum()) == 123 and torch.equal(mask, torch_path(sparsify.topk_mask, x, 123))
    assert int(mask[:20_000].sum()) not in (0, 123)  # spread, not the first 123


@pytest.mark.parametrize("n", [16_411, 300_000])
def test_tie_priorities_agree_with_the_torch_definition(n):
    """The kernels' tie priority is ``sparsify.tie_priority`` (indices past 2^32 too)."""
    x = torch.full((n,), 0.5)
    key = int(x[:1].view(torch.int32))
    index, got = kernels._kernels().scan_ties(kernels._array(x), None, key, kernels._blocks(n))
    assert torch.equal(torch.from_numpy(index), torch.arange(n))
    assert torch.equal(torch.from_numpy(got), sparsify.tie_priority(torch.arange(n), key))
    far = torch.tensor([(1 << 32) + 7, (3 << 32) + 1, (1 << 40) - 1])
    idx = far.numpy()
    want = sparsify.tie_priority(far, key).tolist()
    assert [kernels._kernels()._tie_priority(int(i), key) for i in idx] == want


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_fused_merge_equals_the_torch_path(method, dtype, base_dtype, n_models, torch_path):
    tensors, base = _inputs(n_models, n_models, dtype=dtype, ties=n_models == 2)
    base = base.to(base_dtype)
    weight = [0.7, -0.3, 0.45, 0.2][:n_models]
    for normalize, lam, density in ((True, 1.0, [0.5, 0.3, 0.9, 1.0]), (False, 0.8, [1.0, 0.25, 0.6, 0.05])):
        p = {"weight": weight, "normalize": normalize, "lambda": lam, "int8_mask": False}
        if method == "ties":
            p["density"] = density[:n_models]
        if normalize and abs(sum(weight)) < 1e-8:
            continue
        fn = get_operator(method).fn
        assert kernels.supports(tensors, base)
        got = fn(tensors, base, None, **p)
        want = torch_path(fn, tensors, base, None, **p)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), (normalize, lam)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_bfloat16_output_is_the_cast_of_the_float32_result(method):
    tensors, base = _inputs(9, 3)
    p = {"weight": [0.6, 0.3, 0.4], "normalize": True, "lambda": 1.3, "int8_mask": False}
    if method == "ties":
        p["density"] = [0.4, 0.7, 0.2]
    fn = get_operator(method).fn
    wide = fn(tensors, base, None, **p)
    wide.view(-1)[:4] = torch.tensor([float("nan"), 3.3e38, -3.4e38, 1.00390625])  # cast edge cases
    narrow = fn(tensors, base, None, out_dtype=torch.bfloat16, **p)
    assert narrow.dtype == torch.bfloat16
    assert torch.equal(narrow.view(-1)[4:], wide.view(-1)[4:].to(torch.bfloat16))
    bits = kernels._array(torch.empty(4, dtype=torch.bfloat16))
    kernels._kernels().store_all(wide.view(-1)[:4].numpy(), bits)
    want = wide.view(-1)[:4].to(torch.bfloat16)
    got = torch.from_numpy(bits.view("int16")).view(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[1:], want[1:])


def test_linear_returns_the_asked_dtype_with_the_same_values():
    tensors, _ = _inputs(4, 3, shape=(700, 300))
    fn = get_operator("linear").fn
    wide = fn(tensors, None, None, weight=[0.2, 0.5, 0.3])
    narrow = fn(tensors, None, None, weight=[0.2, 0.5, 0.3], out_dtype=torch.bfloat16)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow, wide.to(torch.bfloat16))


def test_the_kernels_leave_torch_thread_count_alone():
    """Numba's OpenMP layer resets OpenMP's thread count when it starts; a worker
    pinned to one torch thread must stay pinned (a fresh process: the layer starts once)."""
    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from evomerge.operators import kernels\n"
        "x = torch.randn(50_000)\n"
        "kernels.topk_mask(x, 10)\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_the_kernels_start_without_scipy_and_leave_numba_whole():
    """The first kernel call skips numba's BLAS probe (no scipy.linalg import), then
    puts the probe back: numba code using BLAS still compiles and runs in the process."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from numba import njit\n"
        "from numba.np import linalg\n"
        "probe = linalg.ensure_blas\n"
        "from evomerge.operators import kernels\n"
        "assert kernels.available()\n"
        "print('scipy.linalg' in sys.modules, linalg.ensure_blas is probe)\n"
        "dot = njit(lambda a, b: np.dot(a, b))\n"
        "print(dot(np.ones((2, 3)), np.ones((3, 2)))[0, 0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "3.0"]


WARM_THEN_EXIT = """
import atexit, threading
# registered first, so it runs last: after the kernels' own exit hook
alive = lambda: sum(t.name == "evomerge-kernels" and t.is_alive() for t in threading.enumerate())
atexit.register(lambda: print("alive at exit:", alive()))
from evomerge.operators import kernels
kernels.warm_in_background()
print("warming:", alive())
"""


def test_a_process_that_ends_while_the_kernels_warm_waits_for_them():
    """A merge that never needs a kernel can end while numba is still loading on the
    warming thread: the process waits for it at exit, before Python finalizes."""
    res = subprocess.run([sys.executable, "-c", WARM_THEN_EXIT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["warming:", "1", "alive", "at", "exit:", "0"], res.stdout
