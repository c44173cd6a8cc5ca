"""Turn-level credit for multi-turn agents (survey §5.1): the turn, the policy's whole response
between two observations, is the unit of credit.

* :class:`ITPO` (Wang et al. 2026, "Implicit Turn-Wise Policy Optimization for Proactive
  User-LLM Interaction") — implicit turn rewards ``beta * sum_{t in turn} log pi/pi_ref``, no
  reward model; Norm-ITPO redistributes the outcome reward over the turns by a softmax of them.
* :class:`TurnPPO` (Li et al. 2025b, "Turn-PPO: Turn-Level Advantage Estimation with PPO for
  Improved Multi-Turn RL in Agentic LLMs") — the turn-level MDP: a critic over turn states and
  GAE over the turn index; composed by default with ``update.loss=turn_ppo``.

Shared math: :func:`turn_implicit_rewards`, :func:`turn_group_baseline`, :func:`turn_gae`;
units and broadcasting come from :mod:`stages.credit.segments` (``turn_segments``, ``unit_sums``,
``segment_rewards``, ``broadcast``). Vectorized over rows, turns and tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, critic_values
from stages.credit.group_stats import group_stats
from stages.credit.masked_stats import masked_whiten
from stages.credit.ref_logratio import ref_logratio
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import (Segments, broadcast, policy_token_mask, segment_rewards, turn_segments,
                                    unit_sums)
from stages.schema import Batch, BatchTensors, CreditResult, Overhead

# --------------------------------------------------------------------------------------------
# shared math
# --------------------------------------------------------------------------------------------


def turn_implicit_rewards(logratio: torch.Tensor, seg: Segments, beta: float) -> torch.Tensor:
    """(B, K) implicit turn rewards ``r_k = beta * sum_{t in turn k} (log pi - log pi_ref)`` (0 for
    absent turns): the implicit process reward of PRIME / "From r to Q*" summed over a turn."""
    return beta * unit_sums(logratio, seg) * seg.present.to(torch.float32)


def turn_group_baseline(u: torch.Tensor, present: torch.Tensor, index: torch.Tensor, baseline: str,
                        epsilon: float = 1e-6) -> torch.Tensor:
    """Group baseline on per-turn rewards ``u`` (B, K), as ITPO's reference code does it: the
    statistics are over each row's mean turn reward ``m_i = mean_k u_ik`` within its group.

    ``rloo``: ``u * n/(n-1) - mean_g(m) * n/(n-1)`` (a one-turn row gets ``u_i - mean_{j!=i} u_j``;
    singleton groups keep ``u``); ``grpo``: ``(u - mean_g(m)) / (std_g(m) + epsilon)``; ``none``: ``u``.
    Absent turns stay 0."""
    p = present.to(u.dtype)
    if baseline == "none":
        return u * p
    m = (u * p).sum(-1) / p.sum(-1).clamp(min=1)
    n, mean, std, _ = group_stats(m, index, with_std=baseline == "grpo")
    if baseline == "rloo":
        k = (n / (n - 1).clamp(min=1)).unsqueeze(1)
        out = torch.where((n > 1).unsqueeze(1), u * k - (mean.unsqueeze(1) * k), u)
    elif baseline == "grpo":
        out = (u - mean.unsqueeze(1)) / (std.unsqueeze(1) + epsilon)
    else:
        raise ValueError(f"config key 'credit.baseline' must be rloo, grpo or none, got {baseline!r}")
    return out * p


def turn_proportions(r: torch.Tensor, length: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K) Norm-ITPO split ``rho_ik = softmax_k(rbar_ik * L / temperature)`` over each row's
    present turns: ``rbar_ik = r_ik / |turn k|`` the turn's mean token reward and ``L`` the batch's
    mean turn length (the ITPO reference code's ``calculate_segment_proportions_itponorm``). Rows
    sum to 1 (0 for a row without turns); absent turns get 0."""
    mean_len = length[present].float().mean() if bool(present.any()) else torch.tensor(1.0)
    logits = (r / length.clamp(min=1)) * mean_len / temperature
    rho = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=-1)
    return torch.nan_to_num(rho, nan=0.0) * present


def turn_gae(rewards: torch.Tensor, values: torch.Tensor, present: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the turn index of the turn-level MDP (Li et al. 2025b; Schulman et al. 2016).

    ``rewards``, ``values`` (B, K): reward collected in turn k and ``V(s_k)``, the value of the
    state turn k's action is taken in; ``present`` (B, K) bool, the row's turns ``0..n-1``::

        delta_k = r_k + gamma * V(s_{k+1}) - V(s_k)      (V(s_n) = 0: the episode ended)
        A_k     = delta_k + gamma * lam * A_{k+1}         returns G_k = A_k + V(s_k)

    Returns ``(advantages, returns)`` (B, K), 0 on absent turns."""
    p = present.to(values.dtype)
    v = values * p
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    delta = (rewards + gamma * v_next - v) * p
    adv = reverse_discounted_scan(delta, gamma * lam) * p
    return adv, (adv + v) * p


# --------------------------------------------------------------------------------------------
# ITPO
# --------------------------------------------------------------------------------------------


@dataclass
class ITPOConfig(CreditConfig):
    method: str = param("itpo", help="credit-assignment method (registry name; ITPO, Wang et al. 2026)")
    beta: float = param(0.05, help="implicit reward scale beta of beta * log(pi/pi_ref) (ITPO builds on PRIME's implicit PRM, beta=0.05)", gt=0)
    normalization: str = param("softmax", help="softmax: Norm-ITPO, the outcome reward split over a trajectory's turns by softmax(length-normalized implicit turn rewards / temperature); none: plain ITPO, the implicit turn rewards themselves (+ outcome_coef * outcome on the last turn) (Wang et al. 2026)", choices=("softmax", "none"))
    temperature: float = param(0.7, help="Norm-ITPO softmax temperature over a trajectory's turns (ITPO reference code default 0.7)", gt=0)
    outcome_coef: float = param(1.0, help="normalization=none: weight of the outcome reward added to the last turn's implicit reward (ITPO's reward_gt_coef; the paper's runs use 0 with a trained PRM, here the policy is the implicit PRM and starts at 0)", ge=0)
    baseline: str = param("rloo", help="group baseline on the turn rewards (ITPO combines with RLOO, GRPO or PPO; the reference code's main runs: RLOO); none: no baseline", choices=("rloo", "grpo", "none"))
    whiten: bool = param(True, help="whiten the turn returns-to-go over the batch's policy tokens (ITPO reference code, verl masked_whiten); false: raw returns")
    epsilon: float = param(1e-6, help="added to the group std (baseline=grpo)", ge=0)


@register_method
class ITPO(CreditMethod):
    """Implicit Turn-wise Policy Optimization (Wang et al. 2026; survey §5.1, Appendix B row 26).

    ITPO reads the implicit process reward of a KL-regularized model ("From r to Q*", PRIME) per
    *turn*: token log-ratios are volatile, their sum over a turn is not. Per turn k of trajectory i
    (:func:`turn_implicit_rewards`, the native credit)::

        r_ik = beta * sum_{t in turn k} (log pi(y_t | .) - log pi_ref(y_t | .))

    Turn rewards ``u_ik`` (``normalization``):

    * ``softmax`` (Norm-ITPO, default): the outcome reward ``R_i`` is split over the trajectory's
      turns in proportion ``rho_ik = softmax_k(rbar_ik * L / temperature)``, with ``rbar_ik`` the
      turn's *mean* token reward and ``L`` the batch's mean turn length (the reference code's
      ``calculate_segment_proportions_itponorm``): ``u_ik = R_i * rho_ik``. The turns of a row sum
      to its outcome; turns the policy prefers over the reference get the larger share.
    * ``none`` (plain ITPO): ``u_ik = r_ik``; the outcome enters as its own term,
      ``outcome_coef * baseline(R_i)`` on the last turn (the reference code's ``reward_gt_coef``
      term: baselined over the group's outcomes, separately from the turn rewards, whose group
      statistic is each row's mean turn reward).

    Then a group baseline (:func:`turn_group_baseline`, RLOO by default), the return-to-go over
    turns ``G_ik = sum_{k' >= k} u'_ik'`` (the reference code's reverse cumsum of the turn rewards
    placed at each turn's last token, gamma = 1), whitened over the batch's policy tokens, and
    broadcast to the turn's tokens: every token of a turn shares one advantage (turn granularity,
    so it composes with ``update.loss=turn_ppo`` / ``sorl``).

    Limits (``whiten=false``; tests/test_turn_level.py). One turn per row: exactly GRPO
    (``baseline=grpo``) or RLOO (``baseline=rloo``), ``rho = 1``. Softmax, RLOO, groups whose rows
    have equally many turns: the first turn's return-to-go sums the whole split outcome, so it is
    exactly RLOO's advantage whatever the log-ratios; the split only moves credit between later
    turns. At ``pi = pi_ref`` (iteration 0 here: every ``r = 0``, uniform ``rho = 1/K``) turn k of
    K gets ``(K - k) / K * A^RLOO_i``. Plain ITPO at ``pi = pi_ref``: RLOO on every turn.

    Simplified: the paper trains a separate implicit PRM (PRIME's cross-entropy on outcome labels)
    and scores with it; here the implicit PRM is the policy itself (``pi`` = the behaviour policy,
    ``old_logprobs``; ``pi_ref`` = the frozen initial policy), so no PRM is trained. The reference
    code's task-specific token-amount reward is not reproduced. The reference forward pass is
    counted by the context provider.
    """

    name = "itpo"
    Config = ITPOConfig
    granularity = "turn"
    methodology = "Implicit"
    needs = frozenset({"ref_logprobs"})
    reference = "Wang et al. 2026 (ITPO: implicit turn-wise process rewards, Norm-ITPO); survey §5.1"

    def turn_rewards(self, tensors: BatchTensors, ctx: CreditContext) -> tuple[torch.Tensor, torch.Tensor, Segments]:
        """(B, K) implicit turn rewards, (B, K) ITPO turn rewards ``u`` (before the baseline), turns."""
        cfg: ITPOConfig = self.cfg  # type: ignore[assignment]
        seg = turn_segments(tensors)
        lr = ref_logratio(self.name, tensors, ctx)
        r = turn_implicit_rewards(lr, seg, cfg.beta)
        present = seg.present
        outcome = tensors.token_level_rewards.float().sum(-1)
        if cfg.normalization == "softmax":
            rho = turn_proportions(r, unit_sums(policy_token_mask(tensors), seg), present, cfg.temperature)
            u = outcome.unsqueeze(1) * rho
        else:
            u = r
        return r, u * present, seg

    def outcome_on_last_turn(self, tensors: BatchTensors, seg: Segments) -> torch.Tensor:
        """(B, K) ``outcome_coef * baseline(R_i)`` on each row's last turn (plain ITPO): the outcome's
        group baseline is over the rows' outcomes themselves (the reference code's ``reward_gt_coef``
        term, baselined on its own last-turn mask), not over their mean per turn."""
        cfg: ITPOConfig = self.cfg  # type: ignore[assignment]
        outcome = tensors.token_level_rewards.float().sum(-1, keepdim=True)
        ones = torch.ones_like(outcome, dtype=torch.bool)
        b = turn_group_baseline(outcome, ones, tensors.index, cfg.baseline, cfg.epsilon)
        last = (seg.count - 1).clamp(min=0)
        on_last = torch.nn.functional.one_hot(last, seg.K).to(b.dtype) * (seg.count > 0).unsqueeze(1)
        return cfg.outcome_coef * b * on_last

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: ITPOConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        r, u, seg = self.turn_rewards(tensors, ctx)
        u_b = turn_group_baseline(u, seg.present, tensors.index, cfg.baseline, cfg.epsilon)
        if cfg.normalization == "none" and cfg.outcome_coef > 0:
            u_b = u_b + self.outcome_on_last_turn(tensors, seg)
        returns_k = u_b.flip(-1).cumsum(-1).flip(-1) * seg.present
        returns = broadcast(returns_k, seg, mask)
        adv = returns
        if cfg.whiten and int(mask.sum()) >= 2:
            adv = masked_whiten(returns, mask) * mask
        present = seg.present
        n_turns = present.sum().clamp(min=1)
        stats = {
            "implicit_turn_reward_mean": float(r[present].mean()) if bool(present.any()) else 0.0,
            "implicit_turn_reward_abs_mean": float(r.abs().sum() / n_turns),
            "turn_reward_mean": float(u.sum() / n_turns),
            "turns_per_trajectory": float(present.sum(-1).float().mean()),
        }
        if cfg.normalization == "softmax":
            rho = turn_proportions(r, unit_sums(mask, seg), present, cfg.temperature)
            multi = seg.count > 1
            if bool(multi.any()):  # how far the split is from uniform: max share - 1/K (0 = uniform)
                top = rho.amax(-1)[multi]
                stats["proportion_max_mean"] = float(top.mean())
                stats["proportion_excess_over_uniform"] = float((top - 1.0 / seg.count[multi].float()).mean())
        return CreditResult(advantages=adv, granularity="turn", credit=r, returns=returns, stats=stats)


# --------------------------------------------------------------------------------------------
# Turn-PPO
# --------------------------------------------------------------------------------------------


@dataclass
class TurnPPOConfig(CreditConfig):
    method: str = param("turn_ppo", help="credit-assignment method (registry name; Turn-PPO, Li et al. 2025b)")
    gamma: float = param(0.99, help="discount per turn of the turn-level GAE (Li et al. 2025b: gamma~0.99 works best)", ge=0, le=1)
    lam: float = param(0.9, help="GAE lambda over turns (Li et al. 2025b: lambda~0.9 works best)", ge=0, le=1)
    whiten: bool = param(True, help="whiten the turn advantages over the batch's policy tokens (PPO's advantage normalization); false: raw GAE")


@register_method
class TurnPPO(CreditMethod):
    """Turn-PPO's turn-level advantage (Li et al. 2025b, EACL Findings 2026; survey §5.1, Appendix B
    row 23).

    The multi-turn episode is an MDP whose actions are whole turns: state ``s_k`` is the context
    before turn k's response (prompt, earlier turns and their observations), action ``a_k`` the
    turn's response, reward ``r_k`` what the turn collected (:func:`segment_rewards`; the outcome
    lands on the last turn). A critic scores turn states — ``V(s_k)`` is the learned value model
    (:mod:`stages.update.critic`, the GAE method's critic) read at the turn's boundary, its first
    policy token (the value of the state before that token) — and GAE runs over the turn index
    (:func:`turn_gae`), not over tokens. Every token of a turn gets the turn's advantage
    ``A_k`` and the turn's value target ``G_k = A_k + V(s_k)``.

    The importance ratio and clipping are per turn in the loss: the default update group of this
    method is ``update=turn_ppo`` (``update.loss=turn_ppo``), whose ratio is the **geometric
    mean** of the turn's token ratios (as the summaries of the paper and of SORL read here describe
    it; not the product, whose log grows with the turn length), see :mod:`stages.update.turn_losses`. Other losses that accept turn
    credit compose too (``sorl``, ``ppo``, ``grpo``).

    Limit: one turn per row, ``gamma`` and ``lam`` 1: ``A = R - V(s_0)``, REINFORCE with a learned
    state baseline; with ``V = 0`` and no whitening it is the raw return, GRPO without the group.

    Simplified: the value loss is applied on every policy token of a turn toward the turn's target
    ``G_k`` (the trainer's token-level value loss) rather than only at the boundary token; the
    values the advantages read are those at the boundary. One critic forward pass per trajectory.
    """

    name = "turn_ppo"
    Config = TurnPPOConfig
    granularity = "turn"
    methodology = "Turn-level MDP (critic, GAE over turns)"
    episode_level_baseline = False
    needs = frozenset({"critic"})
    default_update = "turn_ppo"
    reference = "Li et al. 2025b (Turn-PPO: turn-level MDP, critic over turn states, GAE over turns); survey §5.1"

    def turn_values(self, tensors: BatchTensors, ctx: CreditContext, seg: Segments) -> torch.Tensor:
        """(B, K) ``V(s_k)``: the critic's value at each turn's first policy token (0 where absent)."""
        assert ctx.critic is not None  # CreditMethod.__call__ checked ``needs``
        v = critic_values(self.name, ctx.critic, tensors).float().gather(1, seg.starts.clamp(min=0))
        return v * seg.present.to(v.dtype)

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: TurnPPOConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        seg = turn_segments(tensors)
        v_k = self.turn_values(tensors, ctx, seg)
        r_k = segment_rewards(tensors, seg).float() * seg.present
        adv_k, ret_k = turn_gae(r_k, v_k, seg.present, cfg.gamma, cfg.lam)
        adv = broadcast(adv_k, seg, mask)
        if cfg.whiten and int(mask.sum()) >= 2:
            adv = masked_whiten(adv, mask) * mask
        returns = broadcast(ret_k, seg, mask)
        values = broadcast(v_k, seg, mask)
        p = seg.present
        n = p.sum().clamp(min=1)
        stats = {"turn_value_mean": float(v_k.sum() / n), "turn_return_mean": float(ret_k.sum() / n),
                 "turn_adv_abs_mean": float(adv_k.abs().sum() / n),
                 "turns_per_trajectory": float(p.sum(-1).float().mean())}
        g = ret_k[p]
        if g.numel() > 1 and float(g.var()) > 0:  # share of the turn returns' variance the critic explains
            stats["explained_variance"] = float(1 - (g - v_k[p]).var() / g.var())
        # the critic's forward over the batch: one pass per trajectory, over its own (non-pad) tokens
        overhead = Overhead(extra_forward_passes=int(mask.shape[0]), forward_tokens=int(tensors.attention_mask.sum()))
        return CreditResult(advantages=adv, granularity="turn", credit=adv_k, overhead=overhead,
                            returns=returns, values=values, stats=stats)
