from __future__ import annotations

import struct

import pytest
import torch

from evomerge.operators import sparsify


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser, written out in Python integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def _priority(i: int, value: float) -> int:
    key = struct.unpack("<I", struct.pack("<f", abs(value)))[0]
    return _fmix32((i % 2**32) ^ key) + (i >> 32 << 32)


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), _priority(i, float(flat[i]))))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("seed", range(6))
def test_topk_mask_is_exact_with_deterministic_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 25, generator=gen)
    if seed % 2:
        x = x.round()  # many ties
    for k in (1, 7, 500, 999, 1000):
        mask = sparsify.topk_mask(x, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, _reference_topk(x, k))


def test_tie_priorities_are_distinct_and_spread_over_the_tensor():
    """Half of 400,000 equal magnitudes kept: the same fraction in every tenth of the
    rows (lowest-index ties would keep the first half whole), and none kept twice."""
    x = torch.full((4000, 100), 0.25)
    mask = sparsify.topk_mask(x, x.numel() // 2)
    assert int(mask.sum()) == x.numel() // 2
    per_tenth = mask.view(10, -1).float().mean(dim=1)
    assert bool(((per_tenth - 0.5).abs() < 0.01).all()), per_tenth
    index = torch.arange(1 << 20, dtype=torch.int64) * 4099 + (5 << 32)
    assert sparsify.tie_priority(index, 0x3E800000).unique().numel() == index.numel()


def test_topk_sets_are_nested():
    x = torch.randn(300, generator=torch.Generator().manual_seed(1)).round()
    small, big = sparsify.topk_mask(x, 40), sparsify.topk_mask(x, 200)
    assert torch.equal(small & big, small)


def test_magnitude_keeps_at_least_one():
    x = torch.tensor([0.1, -3.0, 2.0])
    assert sparsify.magnitude(x, 0.1).tolist() == [False, True, False]


def test_breadcrumbs_drops_outliers_and_small_values():
    x = torch.arange(1, 101, dtype=torch.float32)
    mask = sparsify.magnitude_outliers(x, density=0.5, gamma=0.1)
    kept = x[mask]
    assert kept.numel() == 50 and kept.min() == 41 and kept.max() == 90


def test_breadcrumbs_small_gamma_drops_no_outliers():
    """mergekit 0.1.5 zeroes the tensor when gamma*n < 1; we drop nothing from the top."""
    x = torch.arange(1, 11, dtype=torch.float32)
    kept = x[sparsify.magnitude_outliers(x, density=0.5, gamma=0.01)]
    assert kept.tolist() == [6, 7, 8, 9, 10]


def test_bernoulli_keeps_density_fraction_and_is_seeded():
    x = torch.ones(100_000)
    a = sparsify.bernoulli(x, 0.3, torch.Generator().manual_seed(0))
    b = sparsify.bernoulli(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.3) < 0.01
    # each quarter of the tensor keeps its share: no drift with position
    assert all(abs(q.float().mean().item() - 0.3) < 0.015 for q in a.chunk(4))


def test_dare_masks_are_independent_per_model_and_seed_and_the_same_on_every_path():
    """The mask is a function of (tensor seed, model index, flat index): the numba kernel
    (CPU) gives the torch definition's bits (any device), models and seeds differ, and a
    pair of models keeps both entries as often as independence says (density^2)."""
    x = torch.ones(1 << 18)
    gen = torch.Generator().manual_seed(7)
    first, second = sparsify.bernoulli(x, 0.4, gen, stream=0), sparsify.bernoulli(x, 0.4, gen, stream=1)
    reseeded = sparsify.bernoulli(x, 0.4, torch.Generator().manual_seed(8), stream=0)
    torch_path = sparsify.keep_hash(torch.arange(x.numel()), sparsify.stream_key(7, 0)) < round(0.4 * 2**32)
    assert torch.equal(first, torch_path)
    assert not torch.equal(first, second) and not torch.equal(first, reseeded)
    assert abs((first & second).float().mean().item() - 0.16) < 0.005
    assert not sparsify.bernoulli(x, 0.0, gen).any() and sparsify.bernoulli(x, 1.0, gen).all()


def test_rank_sampling_probabilities_follow_rank():
    x = torch.arange(1, 1001, dtype=torch.float32).repeat(200, 1)
    mask = sparsify.rank_sampling(x, 0.5, 0.2, torch.Generator().manual_seed(0)).float()
    low, high = mask[:, :100].mean().item(), mask[:, -100:].mean().item()
    assert abs(low - 0.31) < 0.02 and abs(high - 0.69) < 0.02


def test_rescale_l1_preserves_norm():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    mask = sparsify.bernoulli(x, 0.4, torch.Generator().manual_seed(3))
    out = sparsify.rescale_l1(x, mask)
    assert torch.isclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert torch.equal(out == 0, ~mask | (x == 0))


def test_sign_consensus_zero_counts_positive_and_zero_never_kept():
    w = torch.tensor([[1.0, -1.0, 0.0], [-1.0, -2.0, 0.0]])
    keep = sparsify.sign_consensus(w)
    assert keep.tolist() == [[True, True, False], [False, True, False]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_top_k_equals_the_float32_path(dtype):
    """The 16-bit keys give the same order and the same ties as float32 keys."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5000, generator=gen) * 0.01).to(dtype)
    x[:1500] = x[2000:3500]  # many exact ties
    x[7] = -x[8]  # a tie across signs
    for density in (0.01, 0.3, 0.5, 0.97):
        k = max(1, int(density * x.numel()))
        mask = sparsify.topk_mask(x, k)
        assert torch.equal(mask, sparsify.topk_mask(x.float(), k)) and int(mask.sum()) == k
