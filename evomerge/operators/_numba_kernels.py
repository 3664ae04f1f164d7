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
from numba.core import cgutils
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


def _nonfinite(a, i):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_nonfinite, inline="always")
def _nonfinite_impl(a, i):
    """a[i] is NaN or Inf: its exponent bits all set (bfloat16 as its uint16 bits)."""
    if a.dtype == types.uint16:
        return lambda a, i: (np.uint32(a[i]) & np.uint32(0x7F80)) == np.uint32(0x7F80)
    return lambda a, i: (_bits_from_float(a[i]) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)


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
def _tie_priority(i, key):
    """The order among entries of magnitude key ``key``: ``sparsify.tie_priority`` (int64)."""
    h = _fmix32(np.uint32(np.uint32(i & 0xFFFFFFFF) ^ np.uint32(key)))
    return np.int64(h) | ((i >> 32) << 32)


@njit(inline="always")
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (``sparsify._fmix32``), in uint32."""
    # in uint32 (numba widens each operation; the casts narrow it back, so LLVM uses
    # 32-bit vector multiplies: int64 ones have no AVX2 instruction)
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h = np.uint32(h ^ (h >> np.uint32(13)))
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    return np.uint32(h ^ (h >> np.uint32(16)))


@njit(parallel=True, cache=True, nogil=True)
def random_keep(out, k_lo, k_hi, threshold, nblocks):
    """out[i] = sparsify.keep_hash(i, key) < threshold (the key as its two 32-bit halves)."""
    n = out.size
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        for i in range(lo, hi):
            h = _fmix32(np.uint32(np.uint32(i & 0xFFFFFFFF) ^ k_lo))
            h = _fmix32(np.uint32(h ^ np.uint32((i >> 32) & 0xFFFFFFFF) ^ k_hi))
            out[i] = np.uint64(h) < threshold


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
def scan_ties(x, base, key, nblocks):
    """The flat indices (ascending) and tie priorities of the entries of x - base whose key equals ``key``."""
    n = x.size
    counts = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, bv = x[lo:hi], _part(base, lo, hi)
        c = 0
        for i in range(hi - lo):
            c += _key(_delta(xv, bv, i)) == key
        counts[b] = c
    starts = np.cumsum(counts) - counts
    index = np.empty(counts.sum(), np.int64)
    priority = np.empty(counts.sum(), np.int64)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        at = starts[b]
        for i in range(lo, hi):
            if _key(_delta(x, base, i)) == key:
                index[at] = i
                priority[at] = _tie_priority(i, key)
                at += 1
    return index, priority


@njit(cache=True, nogil=True)
def sample_keys(x, base, stride):
    """The magnitude keys of every ``stride``-th entry of x - base."""
    m = (x.size + stride - 1) // stride
    out = np.empty(m, np.int64)
    for q in range(m):
        out[q] = _key(_delta(x, base, q * stride))
    return out


LANES = 16  # keys per compress step of the capture
CHUNK = 256  # keys computed (vectorised) before they are compacted


@intrinsic
def _compress_inside(typingctx, keys, index, at, src, pos, low, span, first):
    """Of the 16 keys src[pos:pos+16], those with low <= key <= low + span go to
    keys[at:] in order, and first + lane (their index) to index[at:]; returns how many.
    Writes 16 lanes past ``at`` (the caller leaves room). LLVM's vector compress: one
    vpcompressd per 16 keys on AVX-512; elsewhere it expands to lane-by-lane code, and
    the caller uses a scalar loop instead (see ``capture``)."""
    sig = types.int64(keys, index, at, src, pos, low, span, first)

    def codegen(context, builder, signature, args):
        keys_a, index_a, at_v, src_a, pos_v, low_v, span_v, first_v = args
        i32 = ir.IntType(32)
        vec = ir.VectorType(i32, LANES)
        mask_t = ir.VectorType(ir.IntType(1), LANES)

        def pointer(i, arr, offset):
            data = context.make_array(signature.args[i])(context, builder, arr).data
            return builder.bitcast(builder.gep(data, [offset]), vec.as_pointer())

        def splat(v):
            one = builder.insert_element(ir.Constant(vec, ir.Undefined), builder.trunc(v, i32), ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(vec, [0] * LANES))

        module = builder.module
        compress = cgutils.get_or_insert_function(
            module, ir.FunctionType(vec, [vec, mask_t, vec]), f"llvm.experimental.vector.compress.v{LANES}i32"
        )
        popcount = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.IntType(LANES), [ir.IntType(LANES)]), f"llvm.ctpop.i{LANES}"
        )
        v = builder.load(pointer(3, src_a, pos_v), align=4)
        inside = builder.icmp_unsigned("<=", builder.sub(v, splat(low_v)), splat(span_v))
        undef = ir.Constant(vec, ir.Undefined)
        builder.store(builder.call(compress, [v, inside, undef]), pointer(0, keys_a, at_v), align=4)
        lanes = builder.add(splat(first_v), ir.Constant(vec, list(range(LANES))))
        builder.store(builder.call(compress, [lanes, inside, undef]), pointer(1, index_a, at_v), align=4)
        count = builder.call(popcount, [builder.bitcast(inside, ir.IntType(LANES))])
        return builder.zext(count, ir.IntType(64))

    return sig, codegen


@njit(parallel=True, cache=True, nogil=True)
def capture(x, base, lo_key, hi_key, cap, nblocks, compress):
    """One pass: per block, the number of keys above ``hi_key``, and the keys in
    [lo_key, hi_key] with their indices from the block's start, in index order (the
    first ``cap``; ``counts`` tells how many there were).

    Keys are made CHUNK at a time in a vectorised loop that also counts those above;
    the chunk is then compacted 16 keys per step with ``compress`` (AVX-512), or by a
    branch-free scalar loop (every key written at the cursor, which moves on only
    for keys in the bracket)."""
    n = x.size
    above = np.zeros(nblocks, np.int64)
    counts = np.zeros(nblocks, np.int64)
    keys = np.empty((nblocks, cap + LANES), np.uint32)
    index = np.empty((nblocks, cap + LANES), np.int32)
    low = np.uint32(lo_key)
    top = np.uint32(hi_key)
    span = np.uint32(hi_key - lo_key)
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        kb = keys[b]
        ib = index[b]
        buf = np.empty(CHUNK, np.uint32)
        a = 0
        c = 0
        for s in range(lo, hi, CHUNK):
            w = min(hi - s, CHUNK)
            xv, bv = x[s : s + w], _part(base, s, s + w)
            for q in range(w):
                k = _bits_from_float(_delta(xv, bv, q)) & np.uint32(0x7FFFFFFF)
                buf[q] = k
                a += np.int64(k > top)
            if compress:
                buf[w:] = np.uint32(0xFFFFFFFF)  # above every key: never in the bracket
                for q in range(0, w, LANES):
                    at = min(c, cap)
                    c += _compress_inside(kb, ib, at, buf, q, low, span, s - lo + q)
            else:
                for q in range(w):
                    k = buf[q]
                    at = min(c, cap)
                    kb[at] = k
                    ib[at] = s - lo + q
                    c += np.int64(np.uint32(k - low) <= span)  # lo_key <= k <= hi_key
        above[b] = a
        counts[b] = c
    return above, counts, keys, index


DIGIT = 13  # bits per radix pass of the selection (a block's histogram: 32 KiB)


@njit(parallel=True, cache=True, nogil=True)
def kth_largest(keys, counts, low, span, j):
    """(T, greater, equal) for the j-th largest (1-based) of the captured keys (row b
    holds counts[b] of them, all within [low, low + span]), and how many keys equal T
    in each row: radix selection over key - low from the top digit down, each pass
    counting (row by row, in parallel) only the keys that share the digits chosen so far."""
    nb = counts.size
    done = 1  # bits of key - low not yet decided: those below ``done`` (span < 2^done)
    while (span >> done) > 0:
        done += 1
    prefix = 0  # the decided high bits of key - low
    above = 0  # keys greater than every key with this prefix
    equal = np.zeros(nb, np.int64)
    while done > 0:
        shift = max(0, done - DIGIT)
        width = done - shift
        hist = np.zeros((nb, 1 << width), np.int32)
        for b in prange(nb):
            hb = hist[b]
            row = keys[b, : counts[b]]
            for c in range(row.size):
                d = np.int64(row[c]) - low
                if d >> done == prefix:
                    hb[(d >> shift) & ((1 << width) - 1)] += 1
        total = hist.sum(axis=0)
        digit = (1 << width) - 1
        while above + total[digit] < j:
            above += total[digit]
            digit -= 1
        equal[:] = hist[:, digit]
        prefix = (prefix << width) | digit
        done = shift
    return low + prefix, above, equal


@njit(cache=True, nogil=True)
def captured_ties(keys, index, counts, equal, key, n):
    """The flat indices (ascending) and tie priorities of the captured entries equal to
    ``key`` (``equal`` counts them row by row; ``capture``'s indices count from each
    block's start, of n elements in all)."""
    nblocks = counts.size
    flat = np.empty(equal.sum(), np.int64)
    priority = np.empty(equal.sum(), np.int64)
    at = 0
    for b in range(nblocks):
        if equal[b] == 0:
            continue
        start = _span(n, nblocks, b)[0]
        for c in range(counts[b]):
            if keys[b, c] == key:
                flat[at] = start + np.int64(index[b, c])
                priority[at] = _tie_priority(flat[at], key)
                at += 1
    return flat, priority


@njit(parallel=True, cache=True, nogil=True)
def mask(x, key, drop, out, nblocks):
    """out[i] = |x[i]| is among the top k described by (key, drop): its key is at least
    ``key`` and i is not in ``drop`` (ascending flat indices of ties left out)."""
    n = x.size
    for b in prange(nblocks):
        lo, hi = _span(n, nblocks, b)
        xv, ov = x[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            ov[i] = _key(_load(xv, i)) >= key
        c = np.searchsorted(drop, lo)
        while c < drop.size and drop[c] < hi:
            out[drop[c]] = False
            c += 1


@njit(parallel=True, cache=True, nogil=True)
def merge(tensors, base, weight, keys, drops, bounds, consensus, normalize, scale, lam, out, bad, nblocks):
    """theta_b + lam * merge_i(trim(tau_i) * w_i): see ``kernels.task_arithmetic``.
    ``bad[b]`` is set when block b stored a NaN or Inf (after the cast to ``out``'s dtype):
    the finite check rides on the store, while the slice is in cache.

    Each block runs in slices of SLICE elements, model by model (one tuple lookup per
    model and slice, the base widened once per slice; branch-free loops the compiler
    vectorises). Dropped entries become tau * 0.0, as the torch path's multiply by a
    false mask gives, so even signed zeros agree. Keys are uint32 here; model j's ties
    left out are ``drops[bounds[j]:bounds[j + 1]]``: see ``kernels.magnitude_threshold``
    for the (key, drop) contract."""
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
        cursor = np.empty(m, np.int64)  # model j's next tie to leave out at or after the slice
        for j in range(m):
            cursor[j] = bounds[j] + np.searchsorted(drops[bounds[j] : bounds[j + 1]], lo)
        for s in range(lo, hi, SLICE):
            w = min(hi - s, SLICE)
            bs = base[s : s + w]
            for q in range(w):
                bb[q] = _load(bs, q)
                total[q] = zero
            for j in range(m):
                xs = tensors[j][s : s + w]
                key, wj = np.uint32(keys[j]), weight[j]
                vj = v[j]
                for q in range(w):
                    tau = _load(xs, q) - bb[q]
                    kept = (_bits_from_float(tau) & np.uint32(0x7FFFFFFF)) >= key
                    vj[q] = (tau if kept else tau * zero) * wj  # tau * 0.0 as the torch mask gives
                c = cursor[j]
                while c < bounds[j + 1] and drops[c] < s + w:  # the ties left out
                    q = drops[c] - s
                    vj[q] = ((_load(xs, q) - bb[q]) * zero) * wj
                    c += 1
                cursor[j] = c
                for q in range(w):
                    total[q] = total[q] + vj[q]
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
            nonfinite = False
            for q in range(w):
                nonfinite |= _nonfinite(ov, q)
            if nonfinite:
                bad[b] = True


@njit(cache=True, nogil=True)
def store_all(values, out):
    """out[i] = values[i] through ``_store`` (tests the cast to bfloat16 bits)."""
    for i in range(values.size):
        _store(out, i, np.float32(values[i]))
