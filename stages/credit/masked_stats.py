"""Masked statistics and whitening over response tokens (verl ``verl/utils/torch_functional.py``).

The statistics the episode-level estimators of :mod:`stages.credit.functional` whiten their
advantages with (PPO/GAE, REINFORCE++; survey §2.3, §2.5), with verl's numerics: the same
``1e-8`` guards, the unbiased (Bessel-corrected) masked variance, batch-global statistics.
:func:`whiten_binary` is the fast path the estimators use for a 0/1 float mask (same numbers).
"""

from __future__ import annotations

from typing import Optional

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (verl ``masked_sum``).

    NaNs outside the mask do not contaminate the sum. ``axis=None`` sums everything.
    """
    valid = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    prod = valid * mask
    return prod.sum() if axis is None else prod.sum(dim=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` over the mask: ``masked_sum / (mask.sum() + 1e-8)`` (verl ``masked_mean``)."""
    denom = mask.sum() if axis is None else mask.sum(dim=axis)
    return masked_sum(values, mask, axis) / (denom + 1e-8)


def _check_unbiased_count(n: torch.Tensor) -> None:
    """verl's errors for an unbiased variance over ``n`` masked entries (0 or 1 cannot have one)."""
    if n == 0:
        raise ValueError("masked_var: at least one element in the mask has to be 1 (mask.sum() == 0)")
    if n == 1:
        raise ValueError(
            "masked_var: the sum of the mask is one, the unbiased variance would divide by zero; "
            "use a larger batch"
        )


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the whole mask (verl ``masked_var``).

    With ``unbiased`` the biased masked variance is multiplied by the Bessel correction
    ``n / (n - 1)``, ``n = mask.sum()``; like verl this raises ``ValueError`` when ``n`` is 0 or 1.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        _check_unbiased_count(n)
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with mean/unbiased var over the mask (verl ``masked_whiten``).

    The statistics are batch-global (over every masked entry); the transform is applied to every
    entry, masked or not. With ``shift_mean=False`` the mean is added back after scaling.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def whiten_stats_binary(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, rsqrt(var + 1e-8))`` of :func:`masked_whiten` for a 0/1 float ``mask`` and values
    finite on the mask.

    Same numbers as verl's (``where(mask, x, 0) * mask == x * mask`` for such inputs and the
    reductions run in the same order) with multiplications instead of ``torch.where``, which is
    several times slower on CPU; used inside the estimators, whose whitened tensors are finite.
    """
    n = mask.sum()
    _check_unbiased_count(n)
    mean = (values * mask).sum() / (n + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (n + 1e-8) * (n / (n - 1))
    return mean, torch.rsqrt(var + 1e-8)


def whiten_binary(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten(values, mask)`` for a 0/1 float mask (see :func:`whiten_stats_binary`)."""
    mean, rstd = whiten_stats_binary(values, mask)
    return (values - mean) * rstd
