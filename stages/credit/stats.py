"""Credit statistics logged every iteration (DESIGN.md "MLflow"; survey §9.3 credit accuracy).

All vectorized over the batch. Turn-level quantities aggregate each method's per-token
advantages to turns (:func:`stages.schema.turn_credit`), so methods of every granularity are
compared on the same footing against the exact ground-truth turn advantages of benchmark tasks.
"""

from __future__ import annotations

import math

import torch

from stages.schema import BatchTensors, CreditResult, turn_credit


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank), like ``scipy.stats.rankdata``."""
    n = x.numel()
    if n == 0:
        return x.clone()
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1
    avg = (starts + ends) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation; nan when either side is constant or fewer than 2 points."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = rankdata(a.double()), rankdata(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        return float("nan")
    return float((ra * rb).sum() / denom)


def credit_statistics(tensors: BatchTensors, result: CreditResult) -> dict[str, float]:
    mask = tensors.response_mask
    adv = result.advantages.float()
    n_tok = mask.sum().clamp(min=1)
    mean = float((adv * mask).sum() / n_tok)
    var = float((((adv - mean) * mask) ** 2).sum() / n_tok)
    stats = {
        "mean": mean,
        "std": math.sqrt(max(var, 0.0)),
        "abs_mean": float((adv.abs() * mask).sum() / n_tok),
        "zero_fraction": float(((adv.abs() < 1e-8).float() * mask).sum() / n_tok),
        "policy_tokens": float(mask.sum()),
    }
    if tensors.gt_turn_advantage is not None:
        tc = turn_credit(adv, tensors.turn_ids, tensors.gt_turn_advantage.shape[1])
        gt = tensors.gt_turn_advantage
        valid = ~torch.isnan(tc) & ~torch.isnan(gt)
        abs_tc = torch.where(valid, tc.abs(), torch.zeros_like(tc))
        total = float(abs_tc.sum())
        decisive = tensors.decisive & valid
        stats["decisive_share"] = float(abs_tc[decisive].sum()) / total if total > 0 else float("nan")
        stats["decisive_turn_fraction"] = float(decisive.sum()) / max(int(valid.sum()), 1)
        stats["gt_rank_corr"] = spearman(tc[valid], gt[valid])
        # sign agreement on turns whose true advantage is non-zero
        nz = valid & (gt.abs() > 1e-9)
        stats["gt_sign_agreement"] = (
            float((torch.sign(tc[nz]) == torch.sign(gt[nz])).float().mean()) if bool(nz.any()) else float("nan")
        )
    for k, v in result.stats.items():
        stats[f"method.{k}"] = float(v)
    return stats
