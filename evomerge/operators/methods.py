"""The merge operators. Notation: theta_i model i's tensor, theta_b the base's,
tau_i = theta_i - theta_b its task vector, w_i its weight.

Semantics follow mergekit 0.1.5 (see the recipe docs); deliberate differences:
weights that sum to ~0 under normalisation are an error, not a silent divisor
of 1; breadcrumbs with gamma*n < 1 drops no outliers (mergekit zeroes the
tensor); random sparsifiers draw from an explicit generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.operators import kernels, sparsify
from evomerge.operators.finite import checked
from evomerge.operators.registry import Operator, Param, add, register

WEIGHT = Param("weight", 1.0, per_model=True, search=(0.0, 1.0), doc="mixing weight w_i")
DENSITY = Param("density", 1.0, per_model=True, low=0.0, high=1.0, search=(0.1, 1.0), doc="fraction of tau_i kept")
LAMBDA = Param("lambda", 1.0, search=(0.5, 1.5), doc="scale of the merged task vector")
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0, search=(0.0, 0.1), doc="outlier fraction dropped")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=0.5, search=(0.01, 0.2), doc="DELLA probability spread")
INT8_MASK = Param("int8_mask", False, kind=bool, doc="accepted for mergekit recipes; no effect on the math")


def _normalize_flag(name: str, default: bool) -> Param:
    return Param(name, default, kind=bool, doc="divide by the sum of the weights")


def _weight_sum(weight: Sequence[float]) -> float:
    total = math.fsum(weight)
    if abs(total) < 1e-8:
        raise MergeError(f"weights {list(weight)} sum to ~0 with normalisation on; set normalize: false or change them")
    return total


@register(
    "linear",
    params=(WEIGHT, _normalize_flag("normalize", True)),
    min_models=1,
    mixed_precision=True,
    nonfinite_propagates=True,  # w * NaN, w * Inf (Inf * 0 = NaN) and their sums stay non-finite
    elementwise=True,
    writes_out=True,
)
def linear(
    tensors: list[Tensor], base: Tensor | None, gen, *, weight, normalize=True, out_dtype=None, out=None
) -> Tensor:
    """Weighted average: sum_i w_i theta_i, divided by sum_i w_i when ``normalize``;
    computed in float32 (or wider), returned in ``out_dtype`` when given (in ``out``
    when given).

    On the CPU it runs slice by slice (LINEAR_CHUNK elements): each input slice is
    widened into a cached float32 buffer and added there, about twice as fast as
    adding 16-bit tensors into float32 directly, with the same bits; each finished
    slice is cast into the output at once."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    total = _weight_sum(weight) if normalize else 1.0
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=out_dtype or dtype, device=tensors[0].device)
    flat = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    step = LINEAR_CHUNK if out.device.type == "cpu" else max(1, flat.numel())
    size = min(step, flat.numel())
    widen = torch.empty(size, dtype=dtype, device=out.device)
    acc = None if out.dtype == dtype else torch.empty(size, dtype=dtype, device=out.device)
    for start in range(0, flat.numel(), step):
        dst = flat[start : start + step]
        part = dst if acc is None else acc[: dst.numel()]
        for i, (w, t) in enumerate(zip(weight, flats)):
            piece = t[start : start + step]
            if piece.dtype != dtype:
                piece = widen[: part.numel()].copy_(piece)
            if i == 0:  # 0 + w x: the same value as the sum from zero, one pass less
                torch.mul(piece, w, out=part)
            else:
                part.add_(piece, alpha=w)
        if normalize:
            part.div_(total)
        if acc is not None:
            dst.copy_(part)
    return out


LINEAR_CHUNK = 1 << 17  # elements per slice of the CPU linear merge (its buffers stay in cache)


def _slerp_vectors(t: float, v0: Tensor, v1: Tensor, threshold: float, eps: float = 1e-8) -> Tensor:
    """SLERP (Shoemake 1985) between whole tensors; lerp when |cos Omega| > threshold."""
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0.double() * u1.double()).sum())
    if abs(dot) > threshold:
        return torch.lerp(v0, v1, t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return v0 * (math.sin((1 - t) * omega) / s) + v1 * (math.sin(t * omega) / s)


@register(
    "slerp",
    params=(Param("t", None, search=(0.0, 1.0), doc="0 gives the base, 1 the other model"),),
    base="required",
    min_models=1,
    max_models=1,
)
def slerp(tensors: list[Tensor], base: Tensor | None, gen, *, t) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    assert base is not None
    return _slerp_vectors(t, base, tensors[0], 0.9995)


def _nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> Tensor:
    """Vectorised SLERP along ``dim`` (or over whole flattened tensors)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1).acos()
    sin_theta = theta.sin()
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    colinear = (sin_theta.abs() < eps).expand_as(res)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


@register(
    "nuslerp",
    params=(
        WEIGHT,
        Param("nuslerp_flatten", True, kind=bool, doc="slerp whole tensors"),
        Param("nuslerp_row_wise", False, kind=bool, doc="slerp rows instead of columns when not flattened"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
)
def nuslerp(tensors: list[Tensor], base: Tensor | None, gen, *, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    """SLERP with t = w_2 / (w_1 + w_2); with a base, of the task vectors."""
    total = math.fsum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _nuslerp(t, tensors[0], tensors[1], dim, nuslerp_flatten)
    return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, dim, nuslerp_flatten)


@register(
    "multislerp",
    params=(WEIGHT, _normalize_flag("normalize_weights", True), Param("eps", 1e-8, low=0.0)),
    base="optional",
    min_models=1,
)
def multislerp(tensors: list[Tensor], base: Tensor | None, gen, *, weight, normalize_weights=True, eps=1e-8):
    """Weighted spherical mean (Goddard 2025): average in the tangent space at the weighted
    mean direction, map back with the exponential map, scale by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    stack = torch.stack(tensors)
    if base is not None:
        stack -= base
    flat = stack.view(len(tensors), -1)
    w = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / _weight_sum(weight)
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if float(norms.max()) < eps:  # all inputs (task vectors) are zero: so is their mean
        res = torch.zeros_like(stack[0])
    elif mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError("multislerp: the weighted mean direction is zero (antipodal inputs balance out)")
        res = (flat[0] * w[0] + flat[1] * w[1]).view(stack.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent_mean = (tangent * w.view(-1, 1)).sum(0)
        tnorm = tangent_mean.norm() + eps
        res = mean * tnorm.cos() + tangent_mean * (tnorm.sin() / tnorm)
        res = (res * (norms.squeeze(-1) * w).sum()).view(stack.shape[1:])
    return res + base if base is not None else res


Sparsifier = Callable[[Tensor, int, dict, "torch.Generator | None"], Tensor]


def _sparsify_none(delta: Tensor, i: int, p: dict, gen) -> Tensor:
    return delta


def _sparsify_magnitude(delta: Tensor, i: int, p: dict, gen) -> Tensor:
    d = p["density"][i]
    return delta if d >= 1.0 else delta.mul_(sparsify.magnitude(delta, d))


def _rescaled(mask_fn: Callable[[Tensor, int, dict, Any], Tensor]) -> Sparsifier:
    def apply(delta: Tensor, i: int, p: dict, gen) -> Tensor:
        if p["density"][i] >= 1.0:
            return delta
        mask = mask_fn(delta, i, p, gen)
        return sparsify.rescale_l1(delta, mask) if p["rescale"] else delta * mask

    return apply


_sparsify_random = _rescaled(lambda d, i, p, gen: sparsify.bernoulli(d, p["density"][i], gen, stream=i))
_sparsify_outliers = _rescaled(lambda d, i, p, gen: sparsify.magnitude_outliers(d, p["density"][i], p["gamma"][i]))


def _della_mask(delta: Tensor, i: int, p: dict, gen) -> Tensor:
    density, eps = p["density"][i], p["epsilon"][i]
    if not (0.0 < density - eps and density + eps < 1.0):
        raise MergeError(f"della: density +- epsilon must lie in (0, 1), got density={density}, epsilon={eps}")
    return sparsify.rank_sampling(delta, density, eps, gen)


_sparsify_rank = _rescaled(_della_mask)


def _minus(t: Tensor, base: Tensor) -> Tensor:
    """t - base as a new tensor of base's dtype (converting first is faster than mixed-dtype sub)."""
    return t.to(base.dtype).sub_(base) if t.dtype != base.dtype else torch.sub(t, base)


def _task_arithmetic_family(
    tensors: list[Tensor],
    base: Tensor,
    gen,
    p: dict,
    sparsifier: Sparsifier,
    consensus: bool,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Generalised task arithmetic: theta_b + lambda * merge_i(sparsify(tau_i) * w_i).

    TIES (Yadav et al. 2023, Sec. 3): trim, elect sign, disjoint mean. DARE (Yu et al.
    2024): random drop and rescale. Without consensus it is task arithmetic (Ilharco et
    al. 2023). On the CPU, trim-and-sum and TIES run as fused kernels (the same
    bits); otherwise task vectors are made one at a time, in place, to bound memory.
    The result is in ``out_dtype`` (in ``out`` when given) and checked finite.
    """
    weight = p["weight"]
    if p["normalize"]:
        total_weight = _weight_sum(weight)
    if sparsifier in (_sparsify_none, _sparsify_magnitude) and kernels.supports(tensors, base):
        density = p["density"] if sparsifier is _sparsify_magnitude else None
        stores = out is not None and kernels.writes_into(out, kernels.result_dtype(out_dtype), base.numel())
        into = out if stores else None
        merged = kernels.task_arithmetic(
            tensors,
            base,
            weight,
            density,
            consensus=consensus,
            normalize=p["normalize"],
            lam=p["lambda"],
            out_dtype=out_dtype,
            out=into,
        )  # checked finite as it was stored
        if merged is into or (out is None and out_dtype in (None, merged.dtype)):
            return merged
        return _stored(merged, out_dtype, out)
    base = base.to(torch.float32)
    weighted: list[Tensor] = []
    total = torch.zeros_like(base, memory_format=torch.contiguous_format)
    for i, t in enumerate(tensors):
        tau = sparsifier(_minus(t, base), i, p, gen)
        tau.mul_(weight[i])
        total.add_(tau)
        weighted.append(tau)
    if consensus:
        merged = _elect_and_merge(total, weighted, weight, p["normalize"])
    else:
        merged = total
        if p["normalize"]:
            merged.div_(total_weight)
    if p["lambda"] != 1.0:
        merged.mul_(p["lambda"])
    return _stored(merged.add_(base), out_dtype, out)


def _stored(result: Tensor, out_dtype: torch.dtype | None, out: Tensor | None) -> Tensor:
    """``result`` in ``out_dtype`` (copied into ``out`` when given), checked finite there."""
    if out is not None:
        return checked(out.copy_(result.view(out.shape)))
    return checked(result if out_dtype is None else result.to(out_dtype))


CONSENSUS_CHUNK = 1 << 18  # elements per slice of the election: its temporaries stay in cache


def _elect_and_merge(total: Tensor, weighted: list[Tensor], weight: Sequence[float], normalize: bool) -> Tensor:
    """TIES elect and disjoint merge (Yadav et al. 2023, Sec. 3 steps 2-3), in ``total``.

    Elect sign(sum_i w_i tau_i), zero counting as +; keep w_i tau_i where it agrees;
    sum, and with ``normalize`` divide by the sum of the weights of the agreeing
    entries. Every step is elementwise, so it runs slice by slice: the sign mask,
    the agreement masks and the divisor exist for one slice at a time (less peak
    memory, and they stay in cache), and the result is the same bit for bit.
    """
    out = total.view(-1)
    flats = [tau.reshape(-1) for tau in weighted]
    for start in range(0, out.numel(), CONSENSUS_CHUNK):
        part = out[start : start + CONSENSUS_CHUNK]
        negative = part < 0
        part.zero_()
        divisor = torch.zeros_like(part)
        for w, flat in zip(weight, flats):
            tau = flat[start : start + CONSENSUS_CHUNK]
            agree = sparsify.agrees(tau, negative)
            part.add_(tau.mul_(agree))
            divisor.add_(agree, alpha=w)
        if normalize:
            divisor[divisor.abs() < 1e-8] = 1.0
            part.div_(divisor)
    return total


def _register_family(
    name: str, sparsifier: Sparsifier, consensus: bool, normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()
) -> None:
    """One implementation, configured by (sparsifier x sign consensus)."""
    sparse = (DENSITY,) if sparsifier is not _sparsify_none else ()
    params = (WEIGHT, *sparse, *extra, LAMBDA, _normalize_flag("normalize", normalize), INT8_MASK)
    if sparsifier not in (_sparsify_none, _sparsify_magnitude):
        params = (*params, Param("rescale", rescale, kind=bool, doc="keep the L1 norm of tau_i"))

    def fn(tensors: list[Tensor], base: Tensor | None, gen, out_dtype=None, out=None, **p) -> Tensor:
        assert base is not None
        p.setdefault("rescale", False)
        return _task_arithmetic_family(tensors, base, gen, p, sparsifier, consensus, out_dtype, out)

    doc = f"{name}: {_task_arithmetic_family.__doc__}"
    random = sparsifier in _RANDOM
    kern = sparsifier in (_sparsify_none, _sparsify_magnitude, _sparsify_outliers)  # top-k or fused merge
    # a non-finite tau_i stays so when trimmed or dropped (NaN * 0, Inf * 0 = NaN), when
    # rescaled, and through the sum or the disjoint mean (a disagreeing one adds Inf * 0)
    add(
        Operator(
            name, fn, params, "required", 1, None, random, doc,
            mixed_precision=True, cpu_kernels=kern, nonfinite_propagates=True,
            elementwise=sparsifier is _sparsify_none and not consensus,  # task arithmetic
            writes_out=True, checks_finite=True,
        )
    )  # fmt: skip


_RANDOM = (_sparsify_random, _sparsify_rank)
_register_family("task_arithmetic", _sparsify_none, consensus=False, normalize=False, rescale=False)
_register_family("ties", _sparsify_magnitude, consensus=True, normalize=True, rescale=False)
_register_family("dare_ties", _sparsify_random, consensus=True, normalize=False, rescale=True)
_register_family("dare_linear", _sparsify_random, consensus=False, normalize=False, rescale=True)
_register_family("breadcrumbs", _sparsify_outliers, consensus=False, normalize=False, rescale=False, extra=(GAMMA,))
_register_family("breadcrumbs_ties", _sparsify_outliers, consensus=True, normalize=False, rescale=False, extra=(GAMMA,))
_register_family("della", _sparsify_rank, consensus=True, normalize=True, rescale=True, extra=(EPSILON,))
_register_family("della_linear", _sparsify_rank, consensus=False, normalize=False, rescale=True, extra=(EPSILON,))


@register("model_stock", params=(Param("filter_wise", False, kind=bool),), base="required", min_models=2)
def model_stock(tensors: list[Tensor], base: Tensor | None, gen, *, filter_wise=False) -> Tensor:
    """Model Stock (Jang et al. 2024, Eq. 5): t = N cos / (1 + (N-1) cos) from the mean
    pairwise cosine of the task vectors; theta = t * mean(theta_i) + (1 - t) * theta_b."""
    assert base is not None
    shape = base.shape
    if filter_wise:
        rows = (lambda x: x.reshape(1, -1)) if base.dim() <= 1 else (lambda x: x.reshape(x.shape[0], -1))
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    offsets = [rows(t - base) for t in tensors]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    t = n * cos / (1 + (n - 1) * cos)
    mean = torch.stack([rows(x) for x in tensors]).mean(dim=0)
    return (t * mean + (1 - t) * rows(base)).reshape(shape)


@register(
    "karcher",
    params=(WEIGHT, Param("max_iter", 10, kind=int, low=1, high=10_000), Param("tol", 1e-5, low=0.0)),
    min_models=1,
)
def karcher(tensors: list[Tensor], base: Tensor | None, gen, *, weight, max_iter=10, tol=1e-5) -> Tensor:
    """Karcher mean on the unit sphere (Karcher 1977), by Riemannian gradient steps,
    rescaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    kept = [(w, t.norm(), t) for w, t in zip(weight, tensors) if float(t.norm()) >= tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    total = _weight_sum([w for w, _, _ in kept])
    ws = [w / total for w, _, _ in kept]
    units = [t / n for _, n, t in kept]
    u = sum(w * x for w, x in zip(ws, units))
    assert isinstance(u, Tensor)
    u = units[0] if float(u.norm()) < tol else u / u.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for w, x in zip(ws, units):
            dot = (u * x).sum().clamp(-1.0, 1.0)
            theta = dot.acos()
            if float(theta) >= tol:
                step += w * (theta / theta.sin()) * (x - dot * u)
        size = step.norm()
        if float(size) < tol:
            break
        u = size.cos() * u + size.sin() * (step / size)
        u = u / u.norm()
    scale = sum(w * n for w, (_, n, _) in zip(ws, kept))
    return u * scale


@register(
    "sce",
    params=(Param("select_topk", 1.0, low=0.0, high=1.0, search=(0.1, 1.0)), INT8_MASK),
    base="required",
    min_models=1,
    cpu_kernels=True,
)
def sce(tensors: list[Tensor], base: Tensor | None, gen, *, select_topk=1.0, int8_mask=False) -> Tensor:
    """SCE (FuseChat, Wan et al. 2024): Select the top-variance entries, Calculate weights
    from mean squared task vectors, Erase sign minorities, average what is kept."""
    assert base is not None
    tvs = torch.stack([t - base for t in tensors])
    if select_topk < 1.0:
        var = tvs.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        tvs = tvs * sparsify.topk_mask(var, k).unsqueeze(0)
    energy = tvs.pow(2).reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    energy = torch.full_like(energy, 1.0 / len(tensors)) if abs(total) < 1e-6 else energy / total
    w = energy.view(-1, *([1] * base.dim()))
    kept_w = w * sparsify.sign_consensus(tvs)
    return base + (tvs * kept_w).sum(dim=0) / kept_w.sum(dim=0).clamp(min=1e-6)


@register(
    "nearswap",
    params=(Param("t", None, low=0.0, search=(1e-5, 1e-2), log=True, doc="similarity threshold"),),
    base="required",
    min_models=1,
    max_models=1,
)
def nearswap(tensors: list[Tensor], base: Tensor | None, gen, *, t) -> Tensor:
    """Nearswap: w = clamp(t / max(|theta_b - theta_1|, 1e-6), 0, 1); w theta_1 + (1-w) theta_b."""
    assert base is not None
    w = (t / (base - tensors[0]).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return torch.lerp(base, tensors[0], w)


@register("passthrough", params=(Param("scale", 1.0, per_model=True),), min_models=1, max_models=1)
def passthrough(tensors: list[Tensor], base: Tensor | None, gen, *, scale) -> Tensor:
    """Copy the single source (times ``scale``): layer stacking (frankenmerges)."""
    return tensors[0] * scale[0] if scale[0] != 1.0 else tensors[0].clone()
