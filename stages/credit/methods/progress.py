"""Stepwise Progress Attribution (SPA-RL; Wang et al. 2025b, "SPA-RL: Reinforcing LLM Agents via
Stepwise Progress Attribution", arXiv 2505.20732; survey §5.7, Appendix B row 36, a CA-adjacent
enabler): a learned progress estimator splits the delayed episode reward over the turns.

* :class:`ProgressEstimator` — a small MLP on the policy's last-layer hidden state at each turn's
  last policy token (the turn's "step"), giving the turn's progress increment ``c_k``;
* :func:`turn_end_features` — those (B, K, H) features, read from ``ctx.hidden_states``;
* :func:`fit_progress` — the paper's regression on the **sum**: ``(sum_k c_k - R)^2``;
* :class:`SPARL` — the credit method: step reward ``r_k = c_k + grounding_coef * g_k``, a group
  baseline on the step rewards, the return-to-go over turns.

Vectorized over rows, turns and tokens; the only Python loop reads the batch's per-turn
``Turn.action`` (the grounding signal, O(B*K) like :meth:`stages.schema.BatchTensors.from_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.methods.turn_level import turn_group_baseline
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import Segments, broadcast, parsed_turns, policy_token_mask, turn_segments, unit_ends
from stages.schema import Batch, BatchTensors, CreditResult


class ProgressEstimator(nn.Module):
    """``c = W2 tanh(W1 h + b1) + b2``: the progress increment of a turn from its feature ``h``.
    The output layer starts at zero, so a fresh estimator attributes no progress to any turn."""

    def __init__(self, hidden_size: int, width: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)
        with torch.no_grad():
            bound = 1.0 / max(hidden_size, 1) ** 0.5
            self.inp.weight.copy_(torch.empty(width, hidden_size).uniform_(-bound, bound, generator=gen))
            self.inp.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...) increments."""
        return self.out(torch.tanh(self.inp(features.float()))).squeeze(-1)


def turn_end_features(hidden: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, R, H) hidden states -> (B, K, H): each turn's feature is the hidden state at its *last
    policy token* (it has read the prompt, the earlier turns with their observations and this
    turn's action, nothing later); 0 for absent turns."""
    idx = unit_ends(seg).clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.float().gather(1, idx) * seg.present.unsqueeze(-1).to(torch.float32)


def progress_loss(estimator: ProgressEstimator, features: torch.Tensor, present: torch.Tensor,
                  outcome: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``(sum_k c_k - R)^2`` (SPA's objective: the increments of an episode
    accumulate to its task completion; absent turns contribute nothing)."""
    c = estimator(features) * present.to(torch.float32)
    return ((c.sum(-1) - outcome.float()) ** 2).mean()


def fit_progress(estimator: ProgressEstimator, features: torch.Tensor, present: torch.Tensor,
                 outcome: torch.Tensor, steps: int, lr: float) -> dict[str, float]:
    """``steps`` full-batch Adam steps on :func:`progress_loss` (features are fixed tensors: the
    policy is not trained through the estimator). Returns the loss before and after."""
    if features.numel() == 0 or not bool(present.any()):
        return {}
    features, present, outcome = features.detach().float(), present.bool(), outcome.detach().float()
    with torch.no_grad():
        before = float(progress_loss(estimator, features, present, outcome))
    opt = torch.optim.Adam(estimator.parameters(), lr=lr)
    estimator.train()
    for _ in range(steps):  # optimizer steps, not a loop over tokens or rows
        opt.zero_grad(set_to_none=True)
        progress_loss(estimator, features, present, outcome).backward()
        opt.step()
    estimator.eval()
    with torch.no_grad():
        after = float(progress_loss(estimator, features, present, outcome))
    return {"progress_loss_before": before, "progress_loss_after": after}


def grounding(batch: Batch, tensors: BatchTensors, seg: Segments) -> torch.Tensor:
    """(B, K) 1.0 where the environment parsed the turn's action (``Turn.action`` is set: the
    action was executable), else 0.0; absent turns 0."""
    B = tensors.response_mask.shape[0]
    if len(batch.trajectories) != B:
        raise ValueError(f"credit method 'spa': grounding needs the batch's turns, got {len(batch.trajectories)} "
                         f"trajectories for {B} rows (set credit.grounding_coef=0 to run without them)")
    raw = parsed_turns(batch, B, "spa")
    turn_of_unit = tensors.turn_ids.gather(1, seg.starts.clamp(min=0)).clamp(min=0)
    return raw.gather(1, turn_of_unit.clamp(max=raw.shape[1] - 1)) * seg.present


@dataclass
class SPAConfig(CreditConfig):
    method: str = param("spa", help="credit-assignment method (registry name; SPA-RL, Wang et al. 2025b)")
    estimator_width: int = param(64, help="hidden width of the progress estimator MLP on the policy's turn-end hidden states (SPA-RL: a small head on the agent model)", ge=1)
    estimator_lr: float = param(1e-3, help="Adam learning rate of the progress estimator (fit each update stage on that iteration's batch)", gt=0)
    estimator_steps: int = param(50, help="full-batch Adam steps of the progress estimator per iteration, on the sum-regression (sum_k c_k - R)^2 (SPA-RL §3)", ge=0)
    grounding_coef: float = param(0.5, help="weight of the grounding signal g_k = 1 when the environment parsed the turn's action (SPA-RL's executability reward; the reference code adds 0.5); 0 = progress only", ge=0)
    baseline: str = param("grpo", help="group baseline on the step rewards (mean/std of the group's rows' mean step reward, as ITPO's turn baseline): grpo, rloo, or none", choices=("grpo", "rloo", "none"))
    gamma: float = param(1.0, help="discount of the return-to-go over turns of the baselined step rewards", ge=0, le=1)
    epsilon: float = param(1e-6, help="added to the group std (baseline=grpo)", ge=0)


@register_method
class SPARL(CreditMethod):
    """Stepwise Progress Attribution (Wang et al. 2025b, arXiv 2505.20732; survey §5.7, Appendix B
    row 36).

    Task completion is the accumulation of per-step progress. A progress estimator
    (:class:`ProgressEstimator`) reads each turn's feature ``h_k`` — the policy's last-layer hidden
    state at the turn's last policy token, so it never sees a later turn — and outputs the
    turn's increment ``c_k``; it is trained so that an episode's increments **sum** to its reward
    (:func:`fit_progress`: ``(sum_k c_k - R)^2``, the regression on the sum of the paper and of its
    reference code's ``prm_model``). The step (turn) reward is::

        r_k = c_k + grounding_coef * g_k      g_k = 1 if the environment parsed turn k's action

    (the paper's fused reward: progress plus a grounding signal for actions the environment can
    execute; the reference code adds 0.5 for turns whose observation is not "Nothing happens").
    Turn advantages: a group baseline on the step rewards (:func:`turn_group_baseline`, GRPO by
    default), then the return-to-go over turns with ``gamma`` (1 by default), broadcast to the
    turn's tokens (turn granularity: composes with ``update.loss=turn_ppo`` / ``sorl``).

    Trained alongside the policy: the credit stage scores the batch with the estimator as it is
    (trained on the earlier iterations) and records the turn features and rewards
    (``CreditResult.helper_inputs``); the update stage fits the estimator on them
    (:meth:`update_helpers`), and its weights are saved in every policy checkpoint
    (``helper.progress.safetensors``), so a resumed run continues with the same estimator. A fresh
    estimator's output layer is 0: at iteration 0 only the grounding signal is non-zero.

    Simplified: the paper trains the estimator (the SFT agent's backbone + a linear head, all
    weights) once, offline, on exploration trajectories of the SFT agent, then runs PPO with a
    critic on the fused rewards. Here the features are the live policy's detached hidden states
    (only the MLP trains, fresh Adam each iteration, ``estimator_steps`` steps), it is refitted
    every iteration on that iteration's batch, and the critic is replaced by a group baseline.
    Overhead: one forward pass over the batch for the hidden states (the provider counts it).
    """

    name = "spa"
    Config = SPAConfig
    granularity = "turn"
    methodology = "MLP estimator"
    needs = frozenset({"hidden_states"})
    reference = "Wang et al. 2025b (SPA-RL: stepwise progress attribution, progress estimator + grounding); survey §5.7"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.estimator: Optional[ProgressEstimator] = None

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        cfg: SPAConfig = self.cfg  # type: ignore[assignment]
        self.estimator = ProgressEstimator(hidden_size, cfg.estimator_width, seed).eval()

    def helper_modules(self) -> dict[str, nn.Module]:
        return {"progress": self.estimator} if self.estimator is not None else {}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        cfg: SPAConfig = self.cfg  # type: ignore[assignment]
        x = credit.helper_inputs
        if self.estimator is None or "features" not in x:
            return {}
        torch.manual_seed(seed)  # full-batch Adam is deterministic; kept for any future dropout
        return fit_progress(self.estimator, x["features"], x["present"], x["outcome"], cfg.estimator_steps,
                            cfg.estimator_lr)

    def increments(self, tensors: BatchTensors, ctx: CreditContext) -> tuple[torch.Tensor, torch.Tensor, Segments]:
        """(B, K) progress increments ``c_k``, (B, K, H) turn-end features, the turns."""
        hidden = ctx.hidden_states
        B, R = tensors.response_mask.shape
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, R):
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"credit method 'spa': ctx.hidden_states must be a (B, R, H) tensor with (B, R) = {(B, R)}, got {got}")
        if self.estimator is None:
            self.build_helpers(int(hidden.shape[-1]), 0)
        assert self.estimator is not None
        seg = turn_segments(tensors)
        feats = turn_end_features(hidden, seg)
        with torch.no_grad():
            c = self.estimator.eval()(feats) * seg.present
        return c, feats, seg

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SPAConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        c, feats, seg = self.increments(tensors, ctx)
        p = seg.present
        g = grounding(batch, tensors, seg) if cfg.grounding_coef > 0 else torch.zeros_like(c)
        r = (c + cfg.grounding_coef * g) * p
        r_b = turn_group_baseline(r, p, tensors.index, cfg.baseline, cfg.epsilon)
        ret_k = reverse_discounted_scan(r_b, cfg.gamma) * p
        adv = broadcast(ret_k, seg, mask)
        outcome = tensors.token_level_rewards.float().sum(-1)
        n = p.sum().clamp(min=1)
        has = seg.count > 0
        stats = {"increment_mean": float(c.sum() / n), "increment_abs_mean": float(c.abs().sum() / n),
                 "grounding_mean": float(g.sum() / n), "turns_per_trajectory": float(p.sum(-1).float().mean())}
        if bool(has.any()):  # how far the estimator is from its objective on this (unseen) batch
            stats["increment_sum_abs_error"] = float((c.sum(-1) - outcome)[has].abs().mean())
        helper_inputs = {"features": feats, "present": p, "outcome": outcome}
        return CreditResult(advantages=adv, granularity="turn", credit=c, returns=adv, stats=stats,
                            helper_inputs=helper_inputs)
