"""The numba kernels behind :mod:`evomerge.operators.kernels` (importing this module
imports numba). Arrays are flat; a bfloat16 input arrives as its uint16 bits and
``base`` may be None (top-k of |x| itself). Work is split into ``nblocks``
contiguous ranges run in parallel; histograms are kept per block, then summed.

All arithmetic is float32, one IEEE operation at a time (no fast-math, no fused
multiply-add), in the order of the torch implementation.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# ruff: noqa: ANN001, ANN202

SLICE = 1024  # elements per slice of the fused merge: its buffers stay in L1/L2


@intrinsic
def _float_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _load(a, i):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(a, i):
    """Element i of ``a`` as float32 (bfloat16 bits widen exactly: they are the top half)."""
    if a.dtype == types.uint16:
        return lambda a, i: _float_from_bits(np.uint32(np.uint32(a[i]) << np.uint32(16)))
    return lambda a, i: np.float32(a[i])


def _store(a, i, v):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(a, i, v):
    """a[i] = v; into bfloat16 bits by round to nearest even, as torch casts (NaN kept NaN)."""
    if a.dtype == types.uint16:

        def impl(a, i, v):
            u = _bits_from_float(v)
            if v != v:
                a[i] = np.uint16(0x7FC0)
            else:
                a[i] = np.uint16((u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16))

        return impl

    def plain(a, i, v):
        a[i] = v

    return plain


def _delta(x, base, i):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_delta, inline="always")
def _delta_impl(x, base, i):
    """x[i] - base[i] in float32 (x[i] without a base)."""
    if isinstance(base, types.NoneType):
        return lambda x, base, i: _load(x, i)
    return lambda x, base, i: _load(x, i) - _load(base, i)


def _part(a, lo, hi):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_part, inline="always")
def _part_impl(a, lo, hi):
    """a[lo:hi] (None stays None). Loops index such views from 0: numba cannot tell that
    lo + q is non-negative, and the negative-index wrap it then emits stops LLVM from
    vectorising (measured: 10x slower loads and stores)."""
    if isinstance(a, types.NoneType):
        return lambda a, lo, hi: None
    return lambda a, lo, hi: a[lo:hi]


@njit(inline="always")
def _key(v):
    """The magnitude bits of a float32: integer order is |v| order."""
    return np.int64(_bits_from_float(v) & np.uint32(0x7FFFFFFF))


@njit(inline="always")
def _span(n, nblocks, b):
    step = (n + nblocks - 1) // nblocks
    return b * step, min(n, (b + 1) * step)


@njit(parallel=True, cache=True, nogil=True)
def hist_high(x, base, nblocks):
    """Histogram of the high 16 bits of the magnitude keys of x - base."""
    n = x.size
    hist = np.zeros((nblocks, 1 << 15), np.int64)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, bv = x[lo:hi], _part(base, lo, hi)
        for i in range(hi - lo):
            hist[b, _key(_delta(xv, bv, i)) >> 16] += 1
    return hist.sum(axis=0)


@njit(parallel=True, cache=True, nogil=True)
def hist_low(x, base, bucket, nblocks):
    """Histogram of the low 16 bits of the keys whose high 16 bits equal ``bucket``."""
    n = x.size
    hist = np.zeros((nblocks, 1 << 16), np.int64)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, bv = x[lo:hi], _part(base, lo, hi)
        for i in range(hi - lo):
            key = _key(_delta(xv, bv, i))
            if key >> 16 == bucket:
                hist[b, key & 0xFFFF] += 1
    return hist.sum(axis=0)


@njit(parallel=True, cache=True, nogil=True)
def tie_cutoff(x, base, key, keep, nblocks):
    """One past the flat index of the ``keep``-th entry (keep >= 1) whose key equals ``key``."""
    n = x.size
    counts = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, bv = x[lo:hi], _part(base, lo, hi)
        c = 0
        for i in range(hi - lo):
            c += _key(_delta(xv, bv, i)) == key
        counts[b] = c
    seen = 0
    for b in range(nblocks):
        if seen + counts[b] >= keep:
            lo, hi = _span(n, nblocks, b)
            for i in range(lo, hi):
                if _key(_delta(x, base, i)) == key:
                    seen += 1
                    if seen == keep:
                        return i + 1
        seen += counts[b]
    return n


@njit(cache=True, nogil=True)
def sample_keys(x, base, stride):
    """The magnitude keys of every ``stride``-th entry of x - base."""
    m = (x.size + stride - 1) // stride
    out = np.empty(m, np.int64)
    for q in range(m):
        out[q] = _key(_delta(x, base, q * stride))
    return out


@njit(parallel=True, cache=True, nogil=True)
def capture(x, base, lo_key, hi_key, cap, nblocks):
    """One pass: per block, the number of keys above ``hi_key``, and the keys in
    [lo_key, hi_key] with their flat indices, in index order (the first ``cap``;
    ``counts`` tells how many there were). Branch-free: every key is written at the
    cursor, which moves on only for keys in the bracket."""
    n = x.size
    above = np.zeros(nblocks, np.int64)
    counts = np.zeros(nblocks, np.int64)
    keys = np.empty((nblocks, cap + 1), np.int32)
    index = np.empty((nblocks, cap + 1), np.int64)
    low = np.uint32(lo_key)
    top = np.uint32(hi_key)
    span = np.uint32(hi_key - lo_key)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, bv = x[lo:hi], _part(base, lo, hi)
        kb = keys[b]
        ib = index[b]
        a = 0
        c = 0
        for i in range(hi - lo):
            k = _bits_from_float(_delta(xv, bv, i)) & np.uint32(0x7FFFFFFF)
            a += np.int64(k > top)
            at = min(c, cap)
            kb[at] = np.int32(k)
            ib[at] = lo + i
            c += np.int64(np.uint32(k - low) <= span)  # lo_key <= k <= hi_key
        above[b] = a
        counts[b] = c
    return above, counts, keys, index


@njit(cache=True, nogil=True)
def kth_largest(keys, j):
    """(T, greater, equal) for the j-th largest (1-based) of non-negative int keys, by
    two radix passes of 16 bits over key - min(keys) (a 32-bit span at most)."""
    low = keys.min()
    top = np.zeros(1 << 16, np.int64)
    for k in keys:
        top[(np.int64(k) - low) >> 16] += 1
    above = 0
    digit = (1 << 16) - 1
    while above + top[digit] < j:
        above += top[digit]
        digit -= 1
    bottom = np.zeros(1 << 16, np.int64)
    for k in keys:
        d = np.int64(k) - low
        if d >> 16 == digit:
            bottom[d & 0xFFFF] += 1
    rest = (1 << 16) - 1
    while above + bottom[rest] < j:
        above += bottom[rest]
        rest -= 1
    return low + ((digit << 16) | rest), above, bottom[rest]


@njit(cache=True, nogil=True)
def tie_index(keys, index, counts, key, keep):
    """The flat index of the ``keep``-th captured entry (in index order) equal to ``key``."""
    seen = 0
    for b in range(counts.size):
        for c in range(counts[b]):
            if keys[b, c] == key:
                seen += 1
                if seen == keep:
                    return index[b, c]
    return -1


@njit(parallel=True, cache=True, nogil=True)
def mask(x, key, cutoff, out, nblocks):
    """out[i] = |x[i]| is among the top k described by (key, cutoff)."""
    n = x.size
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, ov = x[lo:hi], out[lo:hi]
        before = cutoff - lo
        for i in range(hi - lo):
            k = _key(_load(xv, i))
            ov[i] = (k > key) | ((k == key) & (i < before))


@njit(parallel=True, cache=True, nogil=True)
def merge(tensors, base, weight, keys, cutoffs, consensus, normalize, scale, lam, out, nblocks):
    """theta_b + lam * merge_i(trim(tau_i) * w_i): see ``kernels.task_arithmetic``.

    Each block runs in slices of SLICE elements, model by model (one tuple lookup per
    model and slice, the base widened once per slice; branch-free loops the compiler
    vectorises). Dropped entries become tau * 0.0, as the torch path's multiply by a
    false mask gives, so even signed zeros agree. Keys are uint32 here: see
    ``kernels.magnitude_threshold`` for the (key, cutoff) contract."""
    n = base.size
    m = len(tensors)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    tiny = np.float32(1e-8)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        v = np.empty((m, SLICE), np.float32)
        bb = np.empty(SLICE, np.float32)
        total = np.empty(SLICE, np.float32)
        part = np.empty(SLICE, np.float32)
        divisor = np.empty(SLICE, np.float32)
        for s in range(lo, hi, SLICE):
            w = min(hi - s, SLICE)
            bs = base[s : s + w]
            for q in range(w):
                bb[q] = _load(bs, q)
                total[q] = zero
            for j in range(m):
                xs = tensors[j][s : s + w]
                key, wj = np.uint32(keys[j]), weight[j]
                before = cutoffs[j] - s  # tied keys are kept at slice positions below this
                vj = v[j]
                for q in range(w):
                    tau = _load(xs, q) - bb[q]
                    k = _bits_from_float(tau) & np.uint32(0x7FFFFFFF)
                    kept = (k > key) | ((k == key) & (q < before))
                    tau = (tau if kept else tau * zero) * wj  # tau * 0.0 as the torch mask gives
                    vj[q] = tau
                    total[q] = total[q] + tau
            if consensus:  # TIES elect: the sign of the sum, zero counting as +; disjoint mean
                part[:w] = zero
                divisor[:w] = zero
                for j in range(m):
                    vj = v[j]
                    wj = weight[j]
                    for q in range(w):
                        t = vj[q]
                        agree = np.float32((t != zero) & ((t < zero) == (total[q] < zero)))
                        part[q] = part[q] + t * agree
                        divisor[q] = divisor[q] + wj * agree
                if normalize:
                    for q in range(w):
                        d = divisor[q]
                        part[q] = part[q] / (one if abs(d) < tiny else d)
            else:
                part[:w] = total[:w]
                if normalize:
                    for q in range(w):
                        part[q] = part[q] / scale
            if lam != one:
                for q in range(w):
                    part[q] = part[q] * lam
            ov = out[s : s + w]
            for q in range(w):
                _store(ov, q, part[q] + bb[q])


@njit(cache=True, nogil=True)
def store_all(values, out):
    """out[i] = values[i] through ``_store`` (tests the cast to bfloat16 bits)."""
    for i in range(values.size):
        _store(out, i, np.float32(values[i]))
