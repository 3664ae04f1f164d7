"""Fused CPU kernels (numba) for the hot loops of magnitude top-k and TIES.

The torch implementation makes one full pass over memory per elementwise step
(task vector, |x|, keys, mask, weight, election, agreement, divisor: a dozen
float32 passes per model). These kernels read each input in its stored dtype
(bfloat16 by its bits, or float32) and keep everything else in registers:

* :func:`magnitude_threshold`: the exact k-th largest |x - base| over the IEEE-754
  bit patterns (sign cleared, so integer order is magnitude order). A strided
  sample brackets it; one pass counts the keys above the bracket and captures
  those inside, among which a radix selection finds it. When the bracket misses
  (rare), two radix histograms over all keys do. Ties at the threshold are kept
  lowest tie priority first (``sparsify.tie_priority``, a hash of the flat index).
* :func:`task_arithmetic`: trim (by those thresholds), weight, and either sum
  (task arithmetic, Ilharco et al. 2023) or elect and take the disjoint mean
  (TIES, Yadav et al. 2023, Sec. 3), in one more pass.

Every float operation is the float32 operation of the torch path in the same
order, so the results are the same bits (tested). The kernels compile on first
use and are cached on disk; :func:`available` is false when numba is missing,
and callers then use the torch path.
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evomerge.operators.finite import NonFiniteResult

MIN_NUMEL = 1 << 14  # below this the torch path is as fast (no parallel launch)
MAX_MODELS = 32
_DTYPES = (torch.bfloat16, torch.float32)


@cache
def available() -> bool:
    """True when numba imports (a declared dependency; without it the torch path runs)."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def warm_in_background() -> None:
    """Import numba and start its machinery on a daemon thread (about 0.4 s, nearly all
    numba's own start-up), so that a merge's first kernel call need not wait for it
    while the first tensors are read. A process that ends first waits for it at exit
    (``atexit`` runs before the interpreter finalizes; a thread still loading LLVM then
    could crash a process whose work is done)."""
    if available.cache_info().currsize:  # warm already
        return
    thread = threading.Thread(target=available, name="evomerge-kernels", daemon=True)
    thread.start()
    atexit.register(thread.join)


def supports(tensors: list[Tensor], base: Tensor | None) -> bool:
    """True when the kernels take these inputs: CPU, bfloat16 or float32 sources of one
    dtype, a bfloat16 or float32 base (or none), one shape, enough elements to pay for a launch."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in _DTYPES
        and len(tensors) <= MAX_MODELS
        and all(t.dtype == first.dtype and t.shape == first.shape and t.device == first.device for t in tensors)
        and (base is None or (base.dtype in _DTYPES and base.shape == first.shape and base.device == first.device))
        and first.numel() >= MIN_NUMEL
        and available()
    )


def _array(t: Tensor) -> np.ndarray:
    """A flat numpy view of ``t`` (bfloat16 as its uint16 bits)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _blocks(n: int) -> int:
    """How many blocks to split n elements into; numba's threads follow torch's.

    Numba's OpenMP layer sets OpenMP's thread count to all cores when it starts,
    which is torch's count too: restore it, or a Ray worker pinned to one thread
    would score on all cores beside its neighbours (measured: 5-10x slower)."""
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    # at most 2^30 elements a block: the capture's indices count from a block's start in int32
    return max(1, min(numba.get_num_threads() * 4, n // 4096), -(-n // (1 << 30)))


def magnitude_threshold(x: Tensor, base: Tensor | None, k: int) -> tuple[int, np.ndarray]:
    """``(key, drop)`` selecting the ``k`` largest |x - base| (|x| without a base):
    entries whose magnitude bits are at least ``key``, less those at the flat indices
    ``drop`` (ascending): the ties at ``key`` of highest tie priority, as
    :func:`sparsify.topk_mask` leaves out. Keys fit in uint32: everything is
    ``KEEP_ALL``, nothing is ``KEEP_NONE``. Leaving out a list of ties (at most the
    ties' count) rather than testing a priority per entry keeps the merge's hot loop
    a plain comparison (hashing every entry there cost TIES 25%)."""
    n = x.numel()
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    xs, bs = _array(x), (_array(base) if base is not None else None)
    nb = _blocks(n)
    found = _threshold_by_sample(xs, bs, k, nb)
    return found if found is not None else _threshold_by_histograms(xs, bs, k, nb)


NO_DROP = np.empty(0, dtype=np.int64)
KEEP_ALL = (0, NO_DROP)  # every key is at least 0
KEEP_NONE = (1 << 31, NO_DROP)  # no key reaches 2^31
SAMPLE_MIN, SAMPLE_MAX = 1 << 12, 1 << 16  # sample size: n / 128 within these bounds
MARGIN_SD = 5.0


@cache
def vector_compress() -> bool:
    """Whether the capture compacts with a vector compress: when numba compiles for a
    CPU with AVX-512 (one instruction per 16 keys, 2.7x faster than the scalar loop;
    without it LLVM's lane-by-lane expansion is 1.6x slower than that loop)."""
    import numba
    from llvmlite import binding

    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()  # type: ignore[attr-defined]
    return "+avx512f" in features.split(",")


def _threshold_by_sample(xs: np.ndarray, bs: np.ndarray | None, k: int, nb: int) -> tuple[int, np.ndarray] | None:
    """One pass: a strided sample brackets the k-th key to +-5 standard deviations of
    its sample rank; the pass counts the keys above the bracket and captures those in
    it, among which the k-th is selected exactly. None when the bracket missed."""
    kern = _kernels()
    n = xs.size
    sample = kern.sample_keys(xs, bs, max(1, n // min(SAMPLE_MAX, max(SAMPLE_MIN, n // 128))))
    m = sample.size
    p = k / n
    rank = p * m  # the k-th largest sits about here in the sample, counted from the top
    margin = MARGIN_SD * math.sqrt(m * p * (1 - p)) + 8
    hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
    ranks = [m - r for r in (hi_rank, lo_rank) if 1 <= r <= m]
    sample = np.partition(sample, ranks) if ranks else sample
    hi_key = int(sample[m - hi_rank]) if hi_rank >= 1 else 0x7FFFFFFF
    lo_key = int(sample[m - lo_rank]) if lo_rank <= m else 0
    inside = int(np.count_nonzero((sample >= lo_key) & (sample <= hi_key)))  # with the ties at either end
    cap = min(-(-n // nb), int(n / nb * (1.5 * inside / m + 0.01)) + 64)
    compress = vector_compress()
    above, counts, keys, index = kern.capture(xs, bs, lo_key, hi_key, cap, nb, compress)
    if int(counts.max()) > cap:  # the sample was unlucky: capture again with room for all
        above, counts, keys, index = kern.capture(xs, bs, lo_key, hi_key, int(counts.max()), nb, compress)
    j = k - int(above.sum())
    if not 0 < j <= int(counts.sum()):
        return None
    key, greater, equal = kern.kth_largest(keys, counts, lo_key, hi_key - lo_key, j)
    keep = j - int(greater)
    if keep >= int(equal.sum()):
        return int(key), NO_DROP
    flat, priority = kern.captured_ties(keys, index, counts, equal, key, n)
    return int(key), _left_out(flat, priority, keep)


def _threshold_by_histograms(xs: np.ndarray, bs: np.ndarray | None, k: int, nb: int) -> tuple[int, np.ndarray]:
    """Two radix passes over all keys (high 16 bits, then the low 16 of one bucket),
    and a third for the ties left out when some are."""
    kern = _kernels()
    from_top = np.cumsum(kern.hist_high(xs, bs, nb)[::-1])
    pos = int(np.searchsorted(from_top, k))
    bucket = (1 << 15) - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    low_top = np.cumsum(kern.hist_low(xs, bs, bucket, nb)[::-1])
    pos_lo = int(np.searchsorted(low_top, k - above))
    key = (bucket << 16) | ((1 << 16) - 1 - pos_lo)
    greater = above + (int(low_top[pos_lo - 1]) if pos_lo > 0 else 0)
    ties = int(low_top[pos_lo]) - (int(low_top[pos_lo - 1]) if pos_lo > 0 else 0)
    keep = k - greater
    if keep >= ties:
        return key, NO_DROP
    flat, priority = kern.scan_ties(xs, bs, key, nb)
    return key, _left_out(flat, priority, keep)


def _left_out(index: np.ndarray, priority: np.ndarray, keep: int) -> np.ndarray:
    """The indices (ascending) of the ties beyond the ``keep`` of lowest (distinct) priority."""
    cutoff = np.partition(priority, keep - 1)[keep - 1]
    return index[priority > cutoff]


def random_keep(n: int, key: int, threshold: int) -> Tensor:
    """``sparsify.keep_hash(arange(n), key) < threshold`` as a bool tensor, in parallel."""
    out = np.empty(n, np.bool_)
    _kernels().random_keep(out, np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32), np.uint64(threshold), _blocks(n))
    return torch.from_numpy(out)


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` entries of largest |x| (ties: lowest tie priority first)."""
    key, drop = magnitude_threshold(x, None, k)
    out = np.empty(x.numel(), dtype=np.bool_)
    _kernels().mask(_array(x), key, drop, out, _blocks(x.numel()))
    return torch.from_numpy(out).view(x.shape)


def task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    weight: list[float],
    density: list[float] | None,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """theta_b + lambda * merge_i(trim(tau_i, density_i) * w_i), in float32.

    ``merge`` is the sum (divided by sum_i w_i when ``normalize``), or with
    ``consensus`` TIES' sign election and disjoint mean (divided by the weights of
    the agreeing entries when ``normalize``). ``density`` None keeps everything.
    The caller checks that the weights do not sum to ~0 when normalising. The result
    is bfloat16 when ``out_dtype`` asks for it (rounded to nearest even, as torch's
    cast), float32 otherwise; it is written into ``out`` when given (contiguous, on the
    CPU, of that dtype: see :func:`writes_into`). Raises ``NonFiniteResult`` when the
    result holds a NaN or Inf (seen as it is stored)."""
    n = base.numel()
    keys, drops = [], []
    for i, t in enumerate(tensors):
        d = 1.0 if density is None else density[i]
        key, drop = KEEP_ALL if d >= 1.0 else magnitude_threshold(t, base, max(1, int(d * n)))
        keys.append(key)
        drops.append(drop)
    dtype = result_dtype(out_dtype)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype)
    elif not writes_into(out, dtype, base.numel()):
        raise ValueError(f"out: expected a contiguous CPU {dtype} tensor of {base.numel()} elements")
    nblocks = _blocks(n)
    bad = np.zeros(nblocks, dtype=np.bool_)
    scale = math.fsum(weight) if normalize and not consensus else 1.0
    _kernels().merge(
        tuple(_array(t) for t in tensors),
        _array(base),
        np.asarray(weight, dtype=np.float32),
        np.asarray(keys, dtype=np.int64),
        np.concatenate(drops),
        np.cumsum([0] + [d.size for d in drops], dtype=np.int64),
        consensus,
        normalize,
        np.float32(scale),
        np.float32(lam),
        _array(out),
        bad,
        nblocks,
    )
    if bad.any():
        raise NonFiniteResult()
    return out


def result_dtype(out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype :func:`task_arithmetic` stores for ``out_dtype``: bfloat16, else float32."""
    return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32


def writes_into(out: Tensor, dtype: torch.dtype, numel: int) -> bool:
    """Whether :func:`task_arithmetic` can store a ``dtype`` result of ``numel`` elements into ``out``."""
    return out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous() and out.numel() == numel


@cache
def _kernels() -> Any:
    """Import the numba kernels and run one (loading its compiled code, from the on-disk
    cache after the first run): ImportError without numba. The first kernel call of a
    process starts numba's compiler machinery, without its BLAS probe."""
    from evomerge.operators import _numba_kernels

    x = np.zeros(8, dtype=np.uint16)
    _without_blas_probe(lambda: _numba_kernels.sample_keys(x, x, 1))  # serial: OpenMP starts later
    return _numba_kernels


_PROBE = "ensure_blas"  # numba.np.linalg's check that scipy's BLAS is importable


def _without_blas_probe(first_call: Callable[[], object]) -> None:
    """Run numba's first compilation with its BLAS probe answering no.

    That compilation imports numba.np.arraymath, which imports scipy.linalg only to
    learn whether np.correlate may use BLAS (measured: 0.08 s of numba's 0.49 s start,
    with the GIL held, on the merge's critical path); these kernels use no BLAS.
    np.correlate in numba code of this process then takes its own loop (the same
    values); everything else, np.dot included, probes again when compiled. Nothing
    changes when the probe has run or scipy.linalg is already imported."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        first_call()
        return
    from numba.np import linalg

    probe = getattr(linalg, _PROBE, None)
    if probe is None:  # another numba: leave it alone
        first_call()
        return

    def no_blas() -> None:
        raise ImportError("BLAS probe skipped by evomerge")

    setattr(linalg, _PROBE, no_blas)
    try:
        first_call()
    finally:
        setattr(linalg, _PROBE, probe)
        arraymath = sys.modules.get("numba.np.arraymath")
        if arraymath is not None and getattr(arraymath, _PROBE, None) is no_blas:
            setattr(arraymath, _PROBE, probe)
