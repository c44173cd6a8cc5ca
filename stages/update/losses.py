"""Policy-gradient losses of stage 5 (survey §2.6, §8): PPO-clip and GRPO, k3 KL, value loss.

All functions take (B, R) tensors aligned with the response and a float ``mask`` (1 on policy
tokens) and return scalar losses plus detached statistics. The policy losses ``update.loss``
names are registered here with :func:`stages.update.loss_registry.register_loss`.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.update.loss_registry import register_loss


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``token-mean``: mean over all policy tokens of the batch (PPO, Schulman et al. 2017).
    ``seq-mean-token-mean``: mean over each sequence's tokens, then over sequences (GRPO,
    Shao et al. 2024, eq. 3 of DeepSeekMath). Sequences without policy tokens are ignored."""
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-mean":
        has = mask.sum(-1) > 0
        per_seq = masked_mean(loss_mat, mask, dim=-1)
        return per_seq[has].mean() if bool(has.any()) else loss_mat.sum() * 0.0
    raise ValueError(f"unknown loss aggregation {mode!r}")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    agg: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)`` with r = pi/pi_old."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss_mat = torch.maximum(unclipped, clipped)
    loss = aggregate(loss_mat, mask, agg)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(-log_ratio, mask)  # E_old[log pi_old - log pi]
    return loss, {"clip_fraction": float(clipfrac), "approx_kl_old": float(approx_kl)}


@register_loss("ppo", aggregation="token-mean", reference="Schulman et al. 2017, PPO eq. 7 (clipped surrogate)",
               off_policy="token ratio to the behaviour log-probs, clipped (AReaL's decoupled objective with the behaviour policy as proximal)")
def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip: the clipped surrogate averaged over all policy tokens of the mini-batch, so a
    long response weighs more than a short one."""
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_ratio, "token-mean")


@register_loss("grpo", aggregation="seq-mean-token-mean",
               reference="Shao et al. 2024, DeepSeekMath eq. 3 (GRPO objective)",
               off_policy="token ratio to the behaviour log-probs, clipped (AReaL's decoupled objective with the behaviour policy as proximal)")
def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: the same clipped surrogate, averaged over each response's tokens (``1/|o_i|``) and
    then over responses (``1/G``), so every response weighs the same whatever its length."""
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_ratio, "seq-mean-token-mean")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): ``exp(ref - log) - (ref - log) - 1`` (>= 0),
    as in GRPO (Shao et al. 2024) and verl's ``low_var_kl`` (clamped to [-10, 10])."""
    delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1.0).clamp(-10.0, 10.0)


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip: float = 0.0,
) -> torch.Tensor:
    """0.5 * (V - G)^2 over policy tokens, optionally clipped around the old values (PPO)."""
    err = (values - returns) ** 2
    if clip > 0 and old_values is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


from stages.update import turn_losses  # noqa: E402,F401  (registers turn_ppo and sorl)
from stages.update import dpo_losses  # noqa: E402,F401  (registers dpo and turn_dpo)
