"""Credit statistics logged every iteration (DESIGN.md "MLflow"; survey §9.3 credit accuracy).

All vectorized over the batch. Turn-level quantities aggregate each method's per-token
advantages to turns (:func:`stages.schema.turn_credit`), so methods of every granularity are
compared on the same footing against the exact ground-truth turn advantages of benchmark tasks.
"""

from __future__ import annotations

import math

import torch

from stages.benchmark.metrics import identification
from stages.schema import BatchTensors, CreditResult, turn_credit


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
        decisive = tensors.decisive & valid
        ident = identification(tc[valid], gt[valid], decisive[valid])
        stats["decisive_share"] = ident["decisive_share"]
        stats["decisive_turn_fraction"] = float(decisive.sum()) / max(int(valid.sum()), 1)
        stats["gt_rank_corr"] = ident["spearman"]
        stats["gt_sign_agreement"] = ident["sign_accuracy"]  # on turns whose true advantage is non-zero
        stats["gt_rmse"] = ident["rmse"]
        stats["gt_zero_advantage_mass"] = ident["zero_advantage_mass"]
    for k, v in result.stats.items():
        stats[f"method.{k}"] = float(v)
    return stats
