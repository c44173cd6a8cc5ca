"""Turn-level importance-ratio / clip losses of stage 5 for multi-turn agents (survey §5.1).

In the turn-level MDP of Turn-PPO (Li et al. 2025b, "Turn-PPO: Turn-level advantage estimation
with PPO") and SORL (Li et al. 2025a, "Stabilizing off-policy training for long-horizon LLM agents
via turn-level importance sampling and clipping-triggered normalization", v1 "ST-PPO") a whole
turn (the policy's response between two observations) is one action. Its importance ratio is the **geometric mean** of the turn's token ratios (SORL's
"turn-level importance sampling"; Turn-PPO's turn-level ratio is described the same way in the
summaries read here; GSPO aggregates the same way per sequence)::

    r_k(theta) = exp( 1/|y^k| * sum_{t in turn k} (log pi_theta(y_t) - log pi_old(y_t)) )

— not the product, whose logarithm grows with the turn's length and clips almost every long
turn. Every token of a turn therefore shares one ratio and one clip decision; the gradient
reaches each token through the geometric mean (weight 1/|y^k|).

* ``turn_ppo``: the clipped surrogate per turn, ``-min(r_k A_k, clip(r_k, 1-eps, 1+eps) A_k)``,
  averaged over the mini-batch's turns (each turn one action of the turn-level MDP).
* ``sorl``: the same surrogate with SORL's *clipping-triggered normalization*: where clipping
  is triggered in a trajectory (a turn's ratio left the trust region ``[1-eps, 1+eps]``, i.e. the
  behaviour log-probs are stale for it), the trajectory's update is rescaled by the share of
  its turns still inside the trust region (detached), so updates from highly off-policy
  trajectories are suppressed and a trajectory whose every turn left the region contributes
  nothing; with fresh samples (no turn clipped) it is ``turn_ppo`` with a per-trajectory mean
  (SO-GRPO's aggregation).

What was read of SORL (arXiv 2511.20718; its v1 is titled "ST-PPO: Stabilized Off-Policy PPO for
Multi-Turn Agents"): the abstracts and third-party summaries only — turn-level importance sampling
as the geometric mean of a turn's token ratios (the paper's Eq. 4, per those summaries) and a
"clipping-bias correction" that "normalizes gradients by downweighting unreliable, highly
off-policy samples" (Eq. 8). The paper's own normalization formula was not available, so
**simplified**: the normalization factor here is our rule — the detached share of a trajectory's
turns whose ratio is inside ``[1-eps, 1+eps]`` — not the paper's clipping-bias term; which
samples are downweighted (those with clipped, i.e. unreliable, turn ratios) follows the
abstract, by how much does not claim to. No threshold on the batch clip fraction decides
whether the normalization applies: it is always on (a trajectory without clipped turns has
factor 1). The off-policy setting itself (stale rollouts from an older policy) only arises here
with ``update.epochs > 1`` (later epochs of the same batch) or deliberately stale log-probs.

Both need ``turn_ids`` (the trainer passes ``BatchTensors.turn_ids``) and accept only credit that
is constant on a turn's tokens (``episode``, ``turn``): a token-level advantage would be averaged
away, so the config loader refuses such a ``credit.method`` before compute.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.update.loss_registry import register_loss

TURN_CREDIT = ("episode", "turn")


def turn_pieces(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                turn_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per turn (B, K): the log of the geometric-mean ratio (with grad), the turn's mean advantage
    and the presence mask (float)."""
    B, R = logprobs.shape
    tid = turn_ids[:, :R].to(logprobs.device).long()
    valid = ((tid >= 0) & (mask != 0)).to(logprobs.dtype)
    K = max(int(tid.max().item()) + 1 if tid.numel() else 1, 1)
    idx = tid.clamp(min=0)
    zeros = torch.zeros((B, K), dtype=logprobs.dtype, device=logprobs.device)
    count = zeros.scatter_add(1, idx, valid)
    log_r = zeros.scatter_add(1, idx, (logprobs - old_logprobs) * valid) / count.clamp(min=1)
    adv = zeros.scatter_add(1, idx, advantages.to(logprobs.dtype) * valid).detach() / count.clamp(min=1)
    return log_r, adv, (count > 0).to(logprobs.dtype)


def _clipped(log_r: torch.Tensor, adv: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K) per-turn clipped surrogate loss, ratio, and whether the clipped branch was taken."""
    ratio = torch.exp(log_r.clamp(max=20.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def _stats(log_r, ratio, took_clip, present) -> dict[str, float]:
    n = present.sum().clamp(min=1)
    with torch.no_grad():
        return {"clip_fraction": float((took_clip.float() * present).sum() / n),
                "approx_kl_old": float((-log_r * present).sum() / n),
                "turn_ratio_mean": float((ratio * present).sum() / n),
                "turns": float(present.sum())}


@register_loss("turn_ppo", aggregation="token-mean", needs=("turn_ids",), accepts=TURN_CREDIT,
               reference="Li et al. 2025b (Turn-PPO): turn-level ratio (geometric mean) and clipping per turn",
               off_policy="turn-level ratio (geometric mean) to the behaviour log-probs, clipped per turn")
def turn_ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  cfg: Any, turn_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Turn-PPO's clipped surrogate: one ratio and one clip per turn, mean over the batch's turns."""
    log_r, adv, present = turn_pieces(logprobs, old_logprobs, advantages, mask, turn_ids)
    loss_k, ratio, took = _clipped(log_r, adv, cfg.clip_ratio)
    loss = (loss_k * present).sum() / present.sum().clamp(min=1)
    return loss, _stats(log_r, ratio, took, present)


@register_loss("sorl", aggregation="seq-mean-token-mean", needs=("turn_ids",), accepts=TURN_CREDIT,
               reference="Li et al. 2025a (SORL: SO-PPO / SO-GRPO): turn-level IS + clipping-triggered normalization (simplified factor)",
               off_policy="turn-level importance sampling against the behaviour log-probs, trajectories with clipped turns suppressed")
def sorl_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: Any, turn_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """SORL: the turn-level clipped surrogate, per trajectory, rescaled by its share of turns whose
    ratio is inside ``[1-eps, 1+eps]`` where clipping is triggered (see the module docstring)."""
    log_r, adv, present = turn_pieces(logprobs, old_logprobs, advantages, mask, turn_ids)
    loss_k, ratio, took = _clipped(log_r, adv, cfg.clip_ratio)
    eps = cfg.clip_ratio
    with torch.no_grad():
        inside = ((ratio >= 1.0 - eps) & (ratio <= 1.0 + eps)).to(loss_k.dtype) * present
        n_turns = present.sum(-1)
        weight = inside.sum(-1) / n_turns.clamp(min=1)  # 1 where no turn triggered clipping
    has = n_turns > 0
    per_traj = (loss_k * present).sum(-1) / n_turns.clamp(min=1)
    loss = (weight * per_traj)[has].mean() if bool(has.any()) else loss_k.sum() * 0.0
    stats = _stats(log_r, ratio, took, present)
    stats["sorl_weight_mean"] = float(weight[has].mean()) if bool(has.any()) else 1.0
    stats["sorl_suppressed_fraction"] = float((weight[has] < 1).float().mean()) if bool(has.any()) else 0.0
    return loss, stats
