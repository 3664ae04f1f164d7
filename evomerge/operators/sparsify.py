"""Sparsifiers and sign consensus for task vectors (TIES, DARE, breadcrumbs, DELLA).

Each sparsifier returns a boolean keep-mask of the task vector's shape; the
rescaling that DARE and DELLA apply is separate (:func:`rescale_l1`). Top-k is
computed by exact radix selection over the float bit patterns, never a full
sort. Entries of equal magnitude are ordered by :func:`tie_priority`, a hash of
their flat index: one fixed total order, so results are deterministic, top-k sets
are nested, and the entries kept among ties at the threshold are spread evenly
over the tensor (bfloat16 task vectors take few distinct magnitudes: a tenth of a
tensor may tie at the threshold), the same on every device.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from evomerge.operators import kernels

_HI = 1 << 15  # positive float32 magnitudes: the top 16 bits take values below 2**15
_LO = 1 << 16
_CHUNK = 1 << 22
_LITTLE = sys.byteorder == "little"
_M32 = 0xFFFFFFFF


def tie_priority(index: Tensor, key: int) -> Tensor:
    """The order among entries whose magnitude key (float32 bits, sign cleared) is
    ``key``: lower first. MurmurHash3's 32-bit finaliser (a bijection) of the low 32
    bits of the flat index xor the key, above it the high bits: distinct for distinct
    indices, uncorrelated with position within 2^32 entries, and a different order for
    each magnitude. int64 arithmetic (products wrap; the masks keep their low 32 bits)."""
    return _fmix32((index & _M32) ^ key) | ((index >> 32) << 32)


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser of 32-bit values held in int64."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


_M64 = (1 << 64) - 1


def stream_key(seed: int, stream: int) -> int:
    """A 64-bit key per (seed, stream): SplitMix64's output function (Steele et al. 2014)
    at ``seed + (stream + 1) * golden``; a merge's per-tensor seed and a model's index."""
    z = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def keep_hash(index: Tensor, key: int) -> Tensor:
    """A uniform 32-bit value per flat index under ``key`` (counter-based: no state, any
    order, any device): fmix32 of the low index bits xor the key's low half, then of
    that xor the high index bits xor the key's high half."""
    h = _fmix32((index & _M32) ^ (key & _M32))
    return _fmix32(h ^ ((index >> 32) & _M32) ^ ((key >> 32) & _M32))


def _magnitude_bits(x: Tensor) -> Tensor:
    """Flat int32 keys whose integer order is the order of |x| (IEEE-754, sign cleared)."""
    mag = x.detach().reshape(-1).to(torch.float32).abs()
    return mag.view(torch.int32)


def _magnitude_bits16(x: Tensor) -> Tensor:
    """For bfloat16 and float16: flat int16 keys, the bit pattern with the sign cleared.
    Both formats are sign-magnitude, so integer order is |x| order, the same order (and
    the same ties) as the float32 keys of the same values, at a quarter of the traffic."""
    return x.detach().reshape(-1).view(torch.int16) & 0x7FFF


def _kth_largest_key16(keys: Tensor, k: int) -> int:
    """As :func:`_kth_largest_key` for 15-bit keys: one histogram pass (bincount over
    int16 runs several times faster than over int32 here)."""
    from_top = torch.bincount(keys, minlength=_HI).flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([k], device=keys.device)).item())
    return _HI - 1 - pos


def _kth_largest_key(keys: Tensor, k: int) -> int:
    """The key value T with count(keys > T) < k <= count(keys >= T), by two radix passes:
    a histogram of the high 16 bits, then one of the low 16 bits of the keys in the
    bucket that holds the k-th. Both read int16 views of the keys (little-endian halves),
    which bincount counts faster than shifted int32 copies, and make no temporaries."""
    halves = keys.view(torch.int16)
    high, low = (halves[1::2], halves[0::2]) if _LITTLE else (halves[0::2], halves[1::2])
    hist = torch.zeros(_HI, dtype=torch.int64, device=keys.device)
    for chunk in high.split(_CHUNK):  # chunks bound bincount's internal copies
        hist += torch.bincount(chunk, minlength=_HI)
    from_top = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([k], device=from_top.device)).item())
    bucket = _HI - 1 - pos
    above = int(from_top[pos - 1].item()) if pos > 0 else 0
    lo = low[high == bucket].to(torch.int32) & 0xFFFF  # the low halves are unsigned
    from_top_lo = torch.bincount(lo, minlength=_LO).flip(0).cumsum(0)
    pos_lo = int(torch.searchsorted(from_top_lo, torch.tensor([k - above], device=keys.device)).item())
    return (bucket << 16) | (_LO - 1 - pos_lo)


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` entries of largest |x| (ties: lowest :func:`tie_priority` first)."""
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if kernels.supports([x], None):
        return kernels.topk_mask(x, k)
    if x.dtype in (torch.bfloat16, torch.float16):
        keys = _magnitude_bits16(x)
        threshold = _kth_largest_key16(keys, k)
    else:
        keys = _magnitude_bits(x)
        threshold = _kth_largest_key(keys, k)
    mask = keys >= threshold
    extra = int(torch.count_nonzero(mask)) - k  # usually 0 in float32: one entry sits at the threshold
    if extra > 0:  # ties at the threshold: drop those of highest priority (distinct: no tie left)
        ties = (keys == threshold).nonzero().view(-1)
        mask[ties[tie_priority(ties, _float32_key(threshold, x.dtype)).topk(extra).indices]] = False
    return mask.view(x.shape)


def _float32_key(key: int, dtype: torch.dtype) -> int:
    """A magnitude key in float32 bits (a bfloat16 key is their top half; float16 widens)."""
    if dtype == torch.bfloat16:
        return key << 16
    if dtype == torch.float16:
        value = torch.tensor([key], dtype=torch.int16).view(torch.float16).float()
        return int(value.view(torch.int32).item())
    return key


def magnitude(x: Tensor, density: float) -> Tensor:
    """TIES trim (Yadav et al. 2023, Sec. 3 step 1): keep max(1, int(density*n)) largest |x|."""
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    return topk_mask(x, max(1, int(density * x.numel())))


def magnitude_outliers(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top int(gamma*n) outliers and
    the smallest entries so that int(density*n) remain. gamma*n < 1 drops no outliers."""
    n = x.numel()
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    n_top = int(gamma * n)
    keep = min(int(density * n), n - n_top)
    upper = topk_mask(x, n_top + keep)
    if n_top == 0:
        return upper
    return upper & ~topk_mask(x, n_top)


def bernoulli(x: Tensor, density: float, gen: torch.Generator | None, stream: int = 0) -> Tensor:
    """DARE drop (Yu et al. 2024, Eq. 2): keep each entry with probability ``density``,
    independently: entry i is kept when ``keep_hash(i, key) < density * 2^32``, the key
    from the generator's seed and ``stream`` (the model's index). Counter-based, so the
    mask is the same on every device and thread count: a candidate scored on a GPU is
    exported on a CPU as it was scored. The CPU runs it as a numba kernel."""
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    key = stream_key(gen.initial_seed() if gen is not None else 0, stream)
    threshold = round(density * 2**32)
    n = x.numel()
    if x.device.type == "cpu" and n >= kernels.MIN_NUMEL and kernels.available():
        return kernels.random_keep(n, key, threshold).view(x.shape)
    return (keep_hash(torch.arange(n, device=x.device), key) < threshold).view(x.shape)


def rank_sampling(x: Tensor, density: float, epsilon: float, gen: torch.Generator | None) -> Tensor:
    """DELLA MAGPRUNE (Deep et al. 2024, Eq. 1): per row, keep entry j with probability
    p_j = (density - eps) + rank_j / (n - 1) * 2 eps, ranks of |x| ascending from 0."""
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    rows = x.detach().reshape(1, -1) if x.dim() < 2 else x.detach().reshape(x.shape[0], -1)
    n = rows.shape[1]
    order = rows.to(torch.float32).abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
    scale = 2.0 * epsilon / (n - 1) if n > 1 else 0.0
    probs = (density - epsilon) + ranks.to(torch.float32) * scale
    if n == 1:
        probs.fill_(density)
    return torch.bernoulli(probs, generator=gen).to(torch.bool).view(x.shape)


def rescale_l1(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, rescaled so that its L1 norm equals x's (DARE's rescale, L1 form)."""
    before = torch.linalg.vector_norm(x, 1)
    kept = x * mask
    after = torch.linalg.vector_norm(kept, 1)
    if before >= 1e-8 and after >= 1e-8:
        kept.mul_(before / after)
    return kept


def agrees(x: Tensor, negative: Tensor) -> Tensor:
    """Entries of ``x`` whose sign is the elected one (``negative`` marks where the
    election chose -); zeros never agree. Sign bits, not multiplications: one pass."""
    return (torch.signbit(x) == negative) & (x != 0)


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES elect (Yadav et al. 2023, Sec. 3 step 2): keep-mask of the entries of each
    stacked task vector whose sign agrees with sign(sum_i w_i tau_i) (zero counts as +).
    Entries equal to zero never agree, so they never count in the divisor."""
    return agrees(weighted, weighted.sum(dim=0) < 0)
