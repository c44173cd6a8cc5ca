"""Reward shaping over training and segment-level reward: two CA-adjacent enablers of survey §5.7.

* :class:`PRS` — Progressive Reward Shaping + Value-based Sampling Policy Optimization (Su et al.
  2025, "Enhancing Agentic RL with Progressive Reward Shaping and Value-based Sampling Policy
  Optimization", arXiv 2512.07478; survey §5.7, Appendix B row 40 "PRS").
* :class:`AdaptSeg` — Adaptive Segment-level Reward (Li et al. 2024b, "Adaptive Segment-level
  Reward: Bridging the Gap Between Action and Reward Space in Alignment", arXiv 2411.00809;
  survey §5.7, Appendix B row 41 "AdaptSeg").

PRS + VSPO
----------
The survey: "In early training, dense rewards focus on format correctness; in later stages,
rewards shift to task accuracy. VSPO ... prioritiz[es] training on trajectories where credit
signals are most informative." The paper's PRS first rewards parseable, well-formed tool calls,
then correctness; VSPO replaces the zero-advantage groups of GRPO by prompts chosen by a task
value that balances difficulty and uncertainty. Here, for trajectory ``i`` of iteration ``t``:

1. **Format stage** (dense): ``f_i`` = the fraction of its turns whose action the environment
   parsed (``Turn.action`` set: :func:`stages.credit.segments.parsed_turns`).
2. **Schedule**: ``alpha(t) = format_weight * (1 - t / shaping_iterations)`` (``schedule=linear``)
   or ``format_weight`` until ``shaping_iterations`` (``schedule=step``), and 0 from iteration
   ``shaping_iterations`` on. The shaped reward is

       R~_i(t) = alpha(t) * f_i + (1 - alpha(t)) * R_i

   with ``R_i`` the outcome (the row's token-level rewards summed: terminal + turn rewards, what
   GRPO scores). From ``t >= shaping_iterations`` it is the pure outcome reward: PRS is GRPO.
3. **Credit**: the GRPO advantage of ``R~`` within each group, on every policy token;
   ``format_weight = 0`` is GRPO at every iteration.
4. **VSPO sampling** (:meth:`PRS.task_weights`): the credit stage records each task instance's
   value estimate, its group's success rate ``p`` (``CreditResult.curriculum``); the next
   iterations sample instance ``j`` with weight ``exp(s * (v_j - mean v))`` where

       v = (1 - lambda) * 4 p (1 - p) + lambda * (1 - p)

   (uncertainty ``4p(1-p)``, 1 at p = 1/2 and 0 for a group with identical outcomes, i.e. a
   zero-advantage group; difficulty ``1 - p``; ``lambda = difficulty_weight``; ``s =
   vspo_strength``; an instance never seen weighs 1). Low-value (solved, zero-advantage) tasks
   are replaced in the next batches by informative ones; ``s = 0`` samples uniformly.

Simplifications (named in the inventory row): the format score is the environment's own parse of
each action (the paper: a format checker of tool-call syntax); no length-aware BLEU or LLM-judge
partial-correctness stage (the families' outcome is exact); the replacement of zero-advantage
groups happens across iterations through the sampling weights, not by resampling inside the
iteration; the value estimate is the last batch's success rate of the instance (no smoothing
over iterations), and the paper's value-smoothing clipping of the update is not implemented.
No extra forward passes, tokens or environment steps (empty :class:`~stages.schema.Overhead`).

Adaptive segment-level reward
-----------------------------
The survey: "semantic segmentation to divide trajectories into balanced segments regardless of
length, ensuring consistent reward granularity". The paper cuts a response at *pivot* tokens,
where the token-level reward changes, and trains only through the segments whose reward agrees
with the sequence-level signal. Here, for response ``i``:

1. **Token rewards**: the implicit reward ``r_t = beta * (log pi_old - log pi_ref)`` of each policy
   token (``needs={"ref_logprobs"}``; the DPO token reward, :mod:`stages.credit.ref_logratio`).
2. **Balanced adaptive segments** (:func:`stages.credit.segments.balanced_segments`): the
   ``num_segments - 1`` tokens with the largest boundary score open new segments, so every
   response has ``min(num_segments, n_i)`` segments whatever its length ``n_i``. The boundary
   score is the reward change ``|r_t - r_prev|`` to the previous policy token
   (``boundary=reward_change``, the paper's pivots) or the policy's next-token entropy
   (``boundary=entropy``); ties (a flat signal, e.g. iteration 0 where pi_old = pi_ref) fall
   back to the equal-size split.
3. **Segment reward**: ``rho_s`` = the mean token reward over segment ``s``.
4. **Credit**: with ``A_i`` the GRPO outcome advantage, segment ``s`` gets

       c_s = m_s * A_i + segment_weight * rho_s,   m_s = 1[rho_s * A_i >= 0]

   (``mask_misaligned=false``: ``m_s = 1``) and every token of the segment has advantage
   ``c_s``. With pi_old = pi_ref (all ``rho = 0``) it is GRPO exactly.

Simplifications: the token rewards come from the policy's own implicit reward against the frozen
initial policy (the paper: a separately DPO-trained reward model); the number of segments is a
fixed target per response (the paper's segments are delimited by pivots without a target count;
the target count is the survey's "balanced regardless of length"); segments run over the
response's policy tokens across turns (observation tokens are no one's). The reference forward
pass is counted by the context provider; the method adds nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from stages.config_fields import param
from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.group_stats import group_stats
from stages.credit.ref_logratio import ref_logratio
from stages.credit.registry import register_method
from stages.credit.segments import balanced_segments, broadcast, parsed_turns, policy_token_mask, unit_sums
from stages.schema import Batch, BatchTensors, CreditResult, Overhead, turn_credit


# --------------------------------------------------------------------------------------------
# PRS + VSPO
# --------------------------------------------------------------------------------------------


@dataclass
class PRSConfig(CreditConfig):
    method: str = param("prs", help="credit-assignment method (registry name; PRS + VSPO, Su et al. 2025)")
    format_weight: float = param(0.5, help="alpha_0 in [0, 1]: weight of the format stage (share of parsed actions) in the shaped reward at iteration 0 (PRS, Su et al. 2025); 0 = GRPO", ge=0, le=1)
    shaping_iterations: int = param(10, help="iteration from which the shaped reward is the pure outcome reward (PRS's last stage, Su et al. 2025)", ge=1)
    schedule: str = param("linear", help="how the format weight falls to 0: linear (alpha_0 (1 - t/N)) or step (alpha_0 until N) (PRS stages, Su et al. 2025)", choices=("linear", "step"))
    vspo_strength: float = param(2.0, help="s: VSPO's task sampling weight exp(s (v - mean v)) by task value v (Su et al. 2025); 0 = uniform sampling", ge=0)
    difficulty_weight: float = param(0.5, help="lambda in [0, 1]: VSPO's task value v = (1 - lambda) 4p(1-p) + lambda (1-p), uncertainty vs difficulty of the group success rate p (Su et al. 2025)", ge=0, le=1)
    norm_adv_by_std: bool = param(True, help="advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def format_schedule(cfg: PRSConfig, iteration: int) -> float:
    """alpha(t): the weight of the format stage at ``iteration`` (module docstring, step 2)."""
    n = int(cfg.shaping_iterations)
    if iteration >= n:
        return 0.0
    if cfg.schedule == "step":
        return float(cfg.format_weight)
    return float(cfg.format_weight) * (1.0 - iteration / n)


def task_value(p: torch.Tensor, difficulty_weight: float) -> torch.Tensor:
    """VSPO's task value of a group success rate ``p``: uncertainty 4p(1-p) blended with difficulty 1-p."""
    lam = float(difficulty_weight)
    return (1 - lam) * 4 * p * (1 - p) + lam * (1 - p)


@register_method
class PRS(CreditMethod):
    """PRS + VSPO: a format-then-outcome reward schedule over training and value-based sampling
    of the task instances (module docstring; Su et al. 2025; survey §5.7)."""

    name = "prs"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = PRSConfig
    granularity = "step"
    methodology = "Progressive"
    reference = "Su et al. 2025 (PRS + VSPO: progressive reward shaping and value-based sampling, arXiv 2512.07478); survey §5.7"

    def shaped_rewards(self, tensors: BatchTensors, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """((B,) shaped reward R~, (B,) outcome R, (B,) format score f, alpha) of ``batch.iteration``."""
        cfg: PRSConfig = self.cfg  # type: ignore[assignment]
        rewards = tensors.token_level_rewards.float()
        outcome = (rewards * policy_token_mask(tensors)).sum(-1)
        B = outcome.shape[0]
        parsed = parsed_turns(batch, B, self.name)
        n = tensors.num_turns.clamp(max=parsed.shape[1]).float()
        fmt = torch.where(n > 0, parsed.sum(-1) / n.clamp(min=1), torch.zeros_like(n))
        alpha = format_schedule(cfg, int(batch.iteration))
        return alpha * fmt + (1 - alpha) * outcome, outcome, fmt, alpha

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: PRSConfig = self.cfg  # type: ignore[assignment]
        shaped, outcome, fmt, alpha = self.shaped_rewards(tensors, batch)
        mask = policy_token_mask(tensors)
        _, mean, std, gid = group_stats(shaped, tensors.index, with_std=cfg.norm_adv_by_std)
        adv_ep = (shaped - mean) / (std + cfg.epsilon) if cfg.norm_adv_by_std else shaped - mean
        adv = adv_ep.unsqueeze(-1) * mask
        credit = turn_credit(adv, tensors.turn_ids, max(tensors.max_turns, 1))
        # VSPO: each task instance's value estimate, its group's success rate (row -> group -> task)
        success = torch.tensor([float(t.success) for t in batch.trajectories])
        count, p_row, _, _ = group_stats(success, gid, with_std=False)
        p_row = torch.where(count <= 1, success, p_row)  # verl's singleton rule zeroes the mean
        curriculum = {t.task_id: float(p) for t, p in zip(batch.trajectories, p_row.tolist())}
        value = task_value(p_row, cfg.difficulty_weight)
        stats = {
            "format_weight": alpha,
            "format_score_mean": float(fmt.mean()),
            "shaped_reward_mean": float(shaped.mean()),
            "outcome_reward_mean": float(outcome.mean()),
            "task_value_mean": float(value.mean()),
            "zero_advantage_row_fraction": float((adv_ep.abs() < 1e-8).float().mean()),
        }
        return CreditResult(advantages=adv, granularity="step", credit=credit, overhead=Overhead(), stats=stats,
                            curriculum=curriculum)

    def task_weights(self, curriculum: dict[str, float], iteration: int, iterations: int) -> Optional[dict[str, float]]:
        """VSPO's sampling weights ``exp(s (v_j - mean v))`` over the instances with a recorded
        success rate (module docstring, step 4); None (uniform) without scores or with ``s = 0``."""
        cfg: PRSConfig = self.cfg  # type: ignore[assignment]
        s = float(cfg.vspo_strength)
        if not curriculum or s == 0:
            return None
        ids = sorted(curriculum)
        p = torch.tensor([float(curriculum[i]) for i in ids], dtype=torch.float64).clamp(0, 1)
        v = task_value(p, cfg.difficulty_weight)
        w = torch.exp(s * (v - v.mean()))
        return dict(zip(ids, w.tolist()))


# --------------------------------------------------------------------------------------------
# Adaptive segment-level reward
# --------------------------------------------------------------------------------------------


@dataclass
class AdaptSegConfig(CreditConfig):
    method: str = param("adaptseg", help="credit-assignment method (registry name; adaptive segment-level reward, Li et al. 2024b)")
    num_segments: int = param(4, help="segments per response whatever its length (balanced segments, Li et al. 2024b; survey 5.7)", ge=1)
    boundary: str = param("reward_change", help="pivot signal: reward_change (|r_t - r_prev| of the implicit token reward, the paper's pivots) or entropy (the policy's next-token entropy) (Li et al. 2024b)", choices=("reward_change", "entropy"))
    beta: float = param(0.1, help="beta of the implicit token reward beta * log(pi_old / pi_ref) (Li et al. 2024b's DPO token reward)", gt=0)
    segment_weight: float = param(1.0, help="weight of the segment's mean implicit reward added to its credit (Li et al. 2024b); 0 = mask only", ge=0)
    mask_misaligned: bool = param(True, help="zero the outcome advantage on segments whose reward sign disagrees with it (Li et al. 2024b)")
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def previous_policy_value(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R): at each position the value at the row's previous policy token (0 before the first),
    skipping observation tokens (vectorized with a running max of policy positions)."""
    B, R = values.shape
    pos = torch.arange(R).expand(B, R)
    last = torch.where(mask != 0, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    prev = torch.cat([torch.full((B, 1), -1, dtype=last.dtype), last[:, :-1]], dim=1)
    return torch.where(prev >= 0, values.gather(1, prev.clamp(min=0)), torch.zeros_like(values))


@register_method
class AdaptSeg(CreditMethod):
    """Adaptive segment-level reward: balanced pivot segments of the implicit token reward, each
    segment's tokens credited with its reward and the sign-aligned outcome advantage (module
    docstring; Li et al. 2024b; survey §5.7)."""

    name = "adaptseg"
    needs_group = True
    Config = AdaptSegConfig
    granularity = "segment"
    methodology = "Segmentation"
    needs = frozenset({"ref_logprobs"})
    reference = "Li et al. 2024b (Adaptive segment-level reward, arXiv 2411.00809); survey §5.7"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: AdaptSegConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        r = cfg.beta * ref_logratio(self.name, tensors, ctx)
        if cfg.boundary == "entropy":
            score = tensors.entropies.float()
        else:
            score = (r - previous_policy_value(r, mask)).abs()
        seg = balanced_segments(score, mask, cfg.num_segments)
        sizes = unit_sums(mask, seg)
        rho = torch.where(seg.present, unit_sums(r, seg) / sizes.clamp(min=1), torch.zeros_like(sizes))
        adv_ep = F._grpo_scalars(tensors.token_level_rewards, tensors.response_mask, tensors.index,
                                 cfg.epsilon, cfg.norm_adv_by_std)
        aligned = (rho * adv_ep.unsqueeze(-1) >= 0) | (not cfg.mask_misaligned)
        c = torch.where(seg.present, aligned.float() * adv_ep.unsqueeze(-1) + cfg.segment_weight * rho,
                        torch.full_like(rho, math.nan))
        adv = broadcast(c, seg, mask)
        present = seg.present
        n_seg = seg.count.float()
        stats = {
            "segments_per_response": float(n_seg.mean()) if n_seg.numel() else 0.0,
            "segment_tokens_mean": float(sizes[present].mean()) if bool(present.any()) else 0.0,
            "segment_reward_abs_mean": float(rho[present].abs().mean()) if bool(present.any()) else 0.0,
            "masked_segment_fraction": float((~aligned & present).float().sum() / present.float().sum().clamp(min=1)),
        }
        return CreditResult(advantages=adv, granularity="segment", credit=c, overhead=Overhead(), stats=stats)
