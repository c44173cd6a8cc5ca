"""Credit statistics logged every iteration (DESIGN.md "MLflow"; survey §9.3 credit accuracy).

All vectorized over the batch. Turn-level quantities aggregate each method's per-token
advantages to turns (:func:`stages.schema.turn_credit`), so methods of every granularity are
compared on the same footing against the exact ground-truth turn advantages of benchmark tasks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from stages.benchmark.metrics import gradient_validity, identification, split_halves, turn_table
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit


def credit_statistics(tensors: BatchTensors, result: CreditResult, batch: Optional[Batch] = None) -> dict[str, float]:
    """Per-iteration credit statistics; on tasks with ground truth also the identification metrics
    and, given the ``batch`` (its turns' state keys and actions), the gradient-validity ones
    (:mod:`stages.benchmark.metrics`: shift-invariant error, cosine to the oracle's policy gradient,
    variance of the gradients of the rollout groups)."""
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
        if tensors.gt_repaired_mistake is not None:
            stats.update(repaired_mistake_credit(tc, gt, tensors.gt_repaired_mistake & valid))
        if batch is not None and bool(valid.any()):
            table = turn_table(batch, tensors, adv)
            # "batches" for the variance: two halves of every rollout group (split_halves: whole groups
            # visit disjoint states, and an episode alone visits a state once, so under its own
            # empirical policy its gradient vanishes)
            halves = split_halves(tensors.index)
            grad = gradient_validity(table.credit, table.advantage, table.state, table.action, halves[table.row])
            stats["gt_shift_invariant_rmse"] = grad["shift_invariant_rmse"]
            stats["gt_pg_cosine"] = grad["gradient_cosine"]
            if "gradient_variance" in grad:
                stats["gt_gradient_variance"] = grad["gradient_variance"]
    for k, v in result.stats.items():
        stats[f"method.{k}"] = float(v)
    return stats


def repaired_mistake_credit(turn_credit: torch.Tensor, advantage: torch.Tensor, repaired: torch.Tensor) -> dict[str, float]:
    """Credit on repaired mistakes (issue 15, recovery variant): turns flagged ``repaired`` (a
    wrong decisive action taken on track in an episode that still succeeded). Their true
    advantage is negative, but an outcome-grouped estimator (GRPO: every turn of a successful
    trajectory gets the same positive credit) credits them positively. Returns the count, the mean
    turn credit (``gt_repaired_mistake_credit``), the mean true advantage and the share credited
    positively; the means only where there is at least one such turn."""
    n = int(repaired.sum())
    out = {"gt_repaired_mistakes": float(n)}
    if n:
        c = turn_credit[repaired].double()
        out["gt_repaired_mistake_credit"] = float(c.mean())
        out["gt_repaired_mistake_advantage"] = float(advantage[repaired].double().mean())
        out["gt_repaired_mistake_positive_share"] = float((c > 0).double().mean())
    return out
