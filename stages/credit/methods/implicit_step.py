"""iStar (Liu et al. 2025, "Agentic Reinforcement Learning with Implicit Step Rewards", arXiv
2509.19199, ICLR 2026; survey §5.6, Appendix B row 29): implicit step rewards from an implicit
process reward model trained, alternately with the policy, by a **trajectory-level DPO** objective
on a group's success/failure pairs; step-level advantages fused with episode-level ones.

* :func:`trajectory_logratio` — ``sum_t (log pi_phi - log pi_old)`` over a row's policy tokens;
* :func:`prm_dpo_loss` / :func:`fit_prm` — the PRM's trajectory DPO objective
  ``-log sigmoid(beta * [logratio(tau+) - logratio(tau-)])`` over the group's pairs with different
  returns (reference = the rollout policy ``pi_old``, the behaviour log-probs);
* :func:`step_group_normalize` — a step reward's GRPO-style normalisation over the steps of its group;
* :class:`IStar` — the credit method.

Vectorized over rows, turns and tokens; the PRM's fit loops over optimizer steps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.functional import grpo
from stages.credit.group_stats import group_stats
from stages.credit.policy_copy import PolicyCopyHelper
from stages.credit.registry import register_method
from stages.credit.segments import broadcast, policy_token_mask, turn_segments, unit_sums
from stages.rollout.policy import sequence_logprobs
from stages.schema import Batch, BatchTensors, CreditResult, Overhead


def trajectory_logratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) ``sum_t (log pi_phi(y_t) - log pi_old(y_t))`` over each row's policy tokens."""
    return ((logprobs - old_logprobs) * mask).sum(-1)


def outcome_pairs(returns: torch.Tensor, index: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` where i and j are rollouts of one task and i's return exceeds j's by
    more than ``margin`` (i the success/preferred, j the failure/dispreferred trajectory)."""
    same = index.unsqueeze(0) == index.unsqueeze(1)
    return same & (returns.unsqueeze(1) - returns.unsqueeze(0) > margin)


def prm_dpo_loss(logratio: torch.Tensor, pairs: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(beta * (logratio_i - logratio_j))`` (0 without pairs)."""
    n = pairs.sum()
    if int(n) == 0:
        return logratio.sum() * 0.0
    diff = beta * (logratio.unsqueeze(1) - logratio.unsqueeze(0))
    return (-F.logsigmoid(diff) * pairs.to(diff.dtype)).sum() / n


def fit_prm(prm: torch.nn.Module, tensors: BatchTensors, pairs: torch.Tensor, beta: float, steps: int, lr: float,
            temperature: float) -> dict[str, float]:
    """``steps`` full-batch AdamW steps of :func:`prm_dpo_loss` on the batch (the PRM's own
    parameters; the behaviour log-probs are the reference). Returns loss and pair accuracy."""
    mask = policy_token_mask(tensors)
    old = tensors.old_logprobs.float() * mask
    args = (tensors.input_ids, tensors.attention_mask, tensors.position_ids, tensors.prompt_len)

    def loss_acc() -> tuple[torch.Tensor, float]:
        lp, _ = sequence_logprobs(prm, *args, temperature=temperature)
        s = trajectory_logratio(lp, old, mask)
        acc = float(((s.unsqueeze(1) > s.unsqueeze(0)) & pairs).sum() / pairs.sum().clamp(min=1))
        return prm_dpo_loss(s, pairs, beta), acc

    with torch.no_grad():
        before, acc0 = loss_acc()
    stats = {"prm_pairs": float(pairs.sum()), "prm_loss_before": float(before), "prm_accuracy_before": acc0}
    if int(pairs.sum()) == 0 or steps == 0:
        return {**stats, "prm_loss_after": float(before), "prm_accuracy_after": acc0}
    opt = torch.optim.AdamW(prm.parameters(), lr=lr, weight_decay=0.0)
    prm.train()
    for _ in range(steps):  # optimizer steps, not a loop over tokens or rows
        opt.zero_grad(set_to_none=True)
        loss_acc()[0].backward()
        opt.step()
    prm.eval()
    with torch.no_grad():
        after, acc1 = loss_acc()
    return {**stats, "prm_loss_after": float(after), "prm_accuracy_after": acc1}


def step_group_normalize(r: torch.Tensor, present: torch.Tensor, index: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(B, K) ``(r_k - mean_g) / (std_g + epsilon)`` over all present steps of row's group g (a
    group with one step: ``mean 0, std 1``, verl's singleton rule); 0 on absent steps."""
    if not bool(present.any()):
        return torch.zeros_like(r)
    rows = index.unsqueeze(1).expand_as(r)[present]
    _, mean, std, _ = group_stats(r[present].float(), rows, with_std=True)
    out = torch.zeros_like(r, dtype=torch.float32)
    out[present] = (r[present].float() - mean) / (std + epsilon)
    return out


@dataclass
class IStarConfig(CreditConfig):
    method: str = param("istar", help="credit-assignment method (registry name; iStar, Liu et al. 2025)")
    beta: float = param(0.05, help="beta of the implicit step reward beta * log(pi_phi / pi_old) and of the PRM's trajectory DPO objective (iStar; PRIME's implicit PRM scale)", gt=0)
    alpha: float = param(1.0, help="weight of the step-level advantage added to the episode-level one: A = A^E + alpha * A^S (iStar's fusion)", ge=0)
    prm_lr: float = param(1e-3, help="AdamW learning rate of the implicit PRM's DPO fit (a copy of the policy)", gt=0)
    prm_steps: int = param(4, help="full-batch AdamW steps of the implicit PRM's trajectory DPO objective per iteration, before the step rewards are read (0 = no PRM update: pi_phi stays the initial policy)", ge=0)
    pair_margin: float = param(0.0, help="a success/failure pair needs returns differing by more than this", ge=0)
    epsilon: float = param(1e-6, help="added to the group std of the episode and the step normalisations", ge=0)


@register_method
class IStar(PolicyCopyHelper, CreditMethod):
    """iStar: implicit step rewards for agentic RL (Liu et al. 2025; survey §5.6, Appendix B row 29).

    An implicit process reward model ``pi_phi`` (an LM of the policy's architecture, initialised
    from the policy: :meth:`bind_policy` / :meth:`build_helpers`) is trained alternately with the
    policy. Each iteration, before the policy update, the PRM takes ``prm_steps`` steps of the
    trajectory-level DPO objective on the group's (success, failure) pairs — rollouts of one task
    with different returns — with the rollout policy ``pi_old`` as reference (:func:`fit_prm`)::

        L_PRM = -log sigmoid( beta * sum_t log pi_phi/pi_old (tau+) - beta * sum_t log pi_phi/pi_old (tau-) )

    The implicit step reward of step (turn) k is ``r_k = beta * sum_{t in turn k} log pi_phi(y_t)/pi_old(y_t)``:
    a step-wise reward whose sum over a trajectory is the DPO-trained trajectory reward (the
    paper's theory: the objective yields a step-wise reward function). Advantages fuse the two
    levels::

        A^E_i = GRPO(R_i)                                   (episode level, group of the task)
        A^S_ik = (r_ik - mean_g r) / (std_g r + eps)        (step level, over the group's steps)
        A_ik = A^E_i + alpha * A^S_ik                       (every token of turn k)

    (turn granularity: one advantage per turn; composes with ``grpo``/``ppo``/``turn_ppo``/``sorl``/
    ``turn_dpo``). The PRM's fitted weights are recorded (``CreditResult.helper_inputs``), adopted
    by the update stage (:meth:`update_helpers`) and saved in every checkpoint (``helper.istar_prm``).

    Limits: ``prm_steps=0`` and behaviour log-probs that are the bound policy's own: ``r = 0``,
    ``A^S = 0``, exactly GRPO. A group without different returns gives no pair and no PRM step.

    Simplified: the paper's reference for the implicit reward is the policy snapshot before the
    update (``pi_old``) as here, but its PRM is trained with its own optimiser state over
    mini-batches; here ``prm_steps`` full-batch AdamW steps with a fresh optimiser each iteration,
    on that iteration's batch only. The step-level normalisation is over the steps of the task's
    group (the paper's normaliser over steps was not available to us in detail). With the tiny
    policy the PRM is a full copy of it (cheap on CPU); a large model would share weights or use
    LoRA. Overhead: (prm_steps + 1) forward passes of the PRM over the batch (+ prm_steps backward).
    """

    name = "istar"
    Config = IStarConfig
    granularity = "turn"
    methodology = "Implicit DPO"
    needs_group = True
    needs = frozenset({"rollout_temperature"})
    reference = "Liu et al. 2025 (iStar: implicit step rewards from a trajectory-DPO implicit PRM, step + episode advantages); survey §5.6"

    helper_name, helper_state_key, adopted_stat, helper_what = "istar_prm", "prm_state", "prm_adopted", "its implicit PRM"

    @property
    def prm(self) -> Optional[torch.nn.Module]:
        """The kept implicit PRM (None until built)."""
        return self.helper_copy

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: IStarConfig = self.cfg  # type: ignore[assignment]
        prm = self.copy_to_fit()
        temperature = float(ctx.rollout_temperature)
        mask = policy_token_mask(tensors)
        returns = tensors.token_level_rewards.float().sum(-1)
        pairs = outcome_pairs(returns, tensors.index, cfg.pair_margin)
        stats = fit_prm(prm, tensors, pairs, cfg.beta, cfg.prm_steps, cfg.prm_lr, temperature)
        with torch.no_grad():
            lp, _ = sequence_logprobs(prm, tensors.input_ids, tensors.attention_mask, tensors.position_ids,
                                      tensors.prompt_len, temperature=temperature)
        seg = turn_segments(tensors)
        p = seg.present
        token_lr = (lp - tensors.old_logprobs.float()) * mask
        r = cfg.beta * unit_sums(token_lr, seg) * p
        a_s = step_group_normalize(r, p, tensors.index, cfg.epsilon)
        a_e, _ = grpo(tensors.token_level_rewards, tensors.response_mask, tensors.index, cfg.epsilon)
        adv = (a_e + cfg.alpha * broadcast(a_s, seg, mask)) * mask
        n = p.sum().clamp(min=1)
        stats.update({"step_reward_mean": float(r.sum() / n), "step_reward_abs_mean": float(r.abs().sum() / n),
                      "step_adv_abs_mean": float(a_s.abs().sum() / n),
                      "turns_per_trajectory": float(p.sum(-1).float().mean())})
        passes = cfg.prm_steps + 1 if int(pairs.sum()) > 0 and cfg.prm_steps > 0 else 1
        B = int(mask.shape[0])
        overhead = Overhead(extra_forward_passes=passes * B, forward_tokens=passes * int(tensors.attention_mask.sum()))
        state = {k: v.detach().clone() for k, v in prm.state_dict().items()}
        return CreditResult(advantages=adv, granularity="turn", credit=r, overhead=overhead, stats=stats,
                            helper_inputs={"prm_state": state})
