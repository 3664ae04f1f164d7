"""Finite merge results: the check the engine runs on a result, and the error an
operator raises when it checked its own result (a fused kernel sees every value as it
stores it, so the engine need not read the result again)."""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.errors import MergeError


class NonFiniteResult(MergeError):
    """The merge produced a NaN or Inf; the engine names the input that brought it."""

    def __init__(self) -> None:
        super().__init__("the merge produced NaN or Inf")


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf: its minimum and maximum are finite (both
    propagate NaN). One reduction in the stored dtype: a float32 sum of a bfloat16
    tensor took 12 times as long."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def checked(t: Tensor) -> Tensor:
    """``t``, or :class:`NonFiniteResult` when it holds a NaN or Inf."""
    if not all_finite(t):
        raise NonFiniteResult()
    return t
