"""Episode-level baselines: GRPO, RLOO, REINFORCE++ (and its group baseline), PPO's GAE.

These are the baselines every finer-grained credit method is compared against (survey §2.3,
§2.5; Appendix C "episode-level baseline"). Each is a thin wrapper around the verl-exact,
vectorized estimators of :mod:`stages.credit.functional`; the wrappers pick the inputs out of
:class:`~stages.schema.BatchTensors`, zero the advantages outside ``response_mask`` and report
the credit at the method's native granularity ((B,) per episode, or (B, R) per token).

ReMax (Li et al. 2023) declares ``needs={"greedy_rollout"}``: the credit stage runs one extra
greedy (argmax) episode per task instance and hands its return to the method as the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.group_stats import group_ids
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, critic_values
from stages.credit.registry import register_method
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _inputs(tensors: BatchTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_level_rewards, binary response_mask)`` in the rewards' float dtype."""
    rewards = tensors.token_level_rewards
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards, (tensors.response_mask != 0).to(rewards.dtype)


def _need_tokens(name: str, mask: torch.Tensor) -> None:
    """Batch-whitened methods need >= 2 policy tokens (unbiased variance), as in verl."""
    n = int(mask.sum().item())
    if n < 2:
        raise ValueError(
            f"credit method {name!r} whitens advantages over the batch's policy tokens and needs at "
            f"least 2 of them, got {n} (response_mask sums to {n})"
        )


def _group_diagnostics(scores: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
    """Group diagnostics: number of groups, fraction of singleton groups, and fraction of
    multi-rollout groups whose scores are all equal (zero learning signal for group baselines)."""
    gid, G = group_ids(index, scores.shape[0], device=scores.device)
    if G == 0:
        return {"groups": 0.0}
    kw = {"dtype": scores.dtype, "device": scores.device}
    count = torch.zeros(G, **kw).index_add_(0, gid, torch.ones_like(scores))
    hi = torch.full((G,), -float("inf"), **kw).scatter_reduce_(0, gid, scores, "amax")
    lo = torch.full((G,), float("inf"), **kw).scatter_reduce_(0, gid, scores, "amin")
    multi = count > 1
    n_multi = int(multi.sum())
    flat = multi & (hi == lo)
    return {
        "groups": float(G),
        "singleton_group_fraction": float((~multi).sum()) / G,
        "flat_group_fraction": float(flat.sum()) / n_multi if n_multi else 0.0,
        "score_mean": float(scores.mean()),
    }


def _episode_result(scalars: torch.Tensor, mask: torch.Tensor, stats: dict[str, float]) -> CreditResult:
    adv = scalars.unsqueeze(-1) * mask
    stats = dict(stats)
    stats["episode_credit_abs_mean"] = float(scalars.abs().mean()) if scalars.numel() else 0.0
    return CreditResult(advantages=adv, granularity="episode", credit=scalars, stats=stats)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig(CreditConfig):
    method: str = param("grpo", help="credit-assignment method (registry name)")
    norm_adv_by_std: bool = param(True, help="divide by the group std (GRPO, Shao et al. 2024; §2.3 eq. 2); false: Dr. GRPO")
    epsilon: float = param(1e-6, help="added to the group std before dividing (Shao et al. 2024; verl's epsilon)", ge=0)


@register_method
class GRPO(CreditMethod):
    """Group-relative advantage ``(R_i - mean_g) / (std_g + eps)`` of each episode's total reward,
    broadcast to all its policy tokens (Shao et al. 2024; survey §2.3 eq. 2).

    ``credit.norm_adv_by_std=false`` gives the unscaled ``R_i - mean_g`` (Dr. GRPO); it is an
    option of this method, not a separate one.
    """

    name = "grpo"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = GRPOConfig
    granularity = "episode"
    methodology = "MC (group baseline)"
    episode_level_baseline = True
    reference = "Shao et al. 2024 (DeepSeekMath, GRPO); survey §2.3 eq. 2"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: GRPOConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        scalars = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        return _episode_result(scalars, mask, _group_diagnostics(rewards.sum(-1), tensors.index))


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


@dataclass
class RLOOConfig(CreditConfig):
    method: str = param("rloo", help="credit-assignment method (registry name; leave-one-out baseline, Ahmadian et al. 2024)")


@register_method
class RLOO(CreditMethod):
    """REINFORCE with a leave-one-out baseline: ``R_i - mean_{j != i} R_j`` within the group
    (Ahmadian et al. 2024; group baselines, survey §2.3). Singleton groups keep ``R_i`` (verl)."""

    name = "rloo"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = RLOOConfig
    granularity = "episode"
    methodology = "MC (leave-one-out baseline)"
    episode_level_baseline = True
    reference = "Ahmadian et al. 2024 (Back to Basics: REINFORCE-style optimization, RLOO); survey §2.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        rewards, mask = _inputs(tensors)
        scalars = F._rloo_scalars(rewards, mask, tensors.index)
        return _episode_result(scalars, mask, _group_diagnostics(rewards.sum(-1), tensors.index))


# --------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------


@dataclass
class ReinforcePPConfig(CreditConfig):
    method: str = param("reinforce_pp", help="credit-assignment method (registry name; REINFORCE++, Hu 2025)")
    gamma: float = param(1.0, help="discount of the per-token return-to-go (Hu 2025, REINFORCE++)", ge=0, le=1)


@register_method
class ReinforcePP(CreditMethod):
    """REINFORCE++: discounted return-to-go over policy tokens, whitened over the batch
    (Hu 2025; survey §2.3). Token-level because, with turn rewards or ``gamma < 1``, the return
    differs from token to token; observation tokens are skipped (verl 0.9 semantics)."""

    name = "reinforce_pp"
    Config = ReinforcePPConfig
    granularity = "token"
    methodology = "MC (return-to-go, batch normalization)"
    episode_level_baseline = True
    reference = "Hu 2025 (REINFORCE++); survey §2.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: ReinforcePPConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        _need_tokens(self.name, mask)
        adv, returns = F.reinforce_pp(rewards, mask, cfg.gamma)
        n = mask.sum().clamp(min=1)
        stats = {"return_mean": float((returns * mask).sum() / n)}
        return CreditResult(advantages=adv, granularity="token", credit=adv, returns=returns, stats=stats)


@dataclass
class ReinforcePPBaselineConfig(CreditConfig):
    method: str = param("reinforce_pp_baseline", help="credit-assignment method (registry name; REINFORCE++-baseline, Hu 2025)")
    epsilon: float = param(1e-6, help="accepted for verl parity and unused, as in verl (Hu 2025, REINFORCE++-baseline)", ge=0)


@register_method
class ReinforcePPBaseline(CreditMethod):
    """REINFORCE++-baseline: episode reward minus its group mean, then whitened over all policy
    tokens of the batch (Hu 2025; survey §2.3)."""

    name = "reinforce_pp_baseline"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = ReinforcePPBaselineConfig
    granularity = "episode"
    methodology = "MC (group-mean baseline, batch normalization)"
    episode_level_baseline = True
    reference = "Hu 2025 (REINFORCE++-baseline); survey §2.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        rewards, mask = _inputs(tensors)
        _need_tokens(self.name, mask)
        adv, scalars = F._reinforce_pp_baseline_impl(rewards, mask, tensors.index)
        result = _episode_result(scalars, mask, _group_diagnostics(rewards.sum(-1), tensors.index))
        result.advantages = adv
        return result


# --------------------------------------------------------------------------------------------
# GAE (PPO)
# --------------------------------------------------------------------------------------------


@dataclass
class GAEConfig(CreditConfig):
    method: str = param("gae", help="credit-assignment method (registry name; PPO with GAE, Schulman et al. 2016/2017)")
    gamma: float = param(1.0, help="discount factor of the TD errors (Schulman et al. 2016, GAE)", ge=0, le=1)
    lam: float = param(1.0, help="GAE lambda: 0 = one-step TD, 1 = Monte-Carlo return minus value (Schulman et al. 2016); 1 as verl's default: with a fresh critic lam<1 starves early turns and PPO collapsed at H=20 (GAE class doc)", ge=0, le=1)


@register_method
class GAE(CreditMethod):
    """PPO's Generalized Advantage Estimation with a learned critic (Schulman et al. 2016;
    survey §2.5). Observation tokens are skipped (verl's masked multi-turn GAE); advantages are
    whitened over the batch's policy tokens. One critic forward pass per trajectory.

    Why ``lam`` defaults to 1 (verl's ``algorithm.lam: 1.0``), measured on bifurcation
    H=20, 2 decisive turns, PPO, seed 1 (issue 13): the zero-initialised value head predicts 0
    at the first iteration, so with ``lam=0.95`` a successful episode's advantage decays as
    ``0.95**k`` with the k policy tokens to its end (~0.13 at the first of 20 turns, 2 tokens
    per turn) while whitening's mean subtraction gives *every* token of a failed episode the
    same negative advantage. The net push is down on the early turns' format tokens: after
    the first update the batch success fell 0.16 -> 0.00 (approx KL 0.26, clip fraction 0.26,
    entropy 0.43 -> 0.70, episodes ended by invalid actions: policy tokens 2576 -> 1648) and
    the critic, now fitting all-zero returns, never recovered. With ``lam=1`` the first
    advantages are the whitened episode return on every token (REINFORCE with a batch-mean
    baseline) and later ones ``G - V(s_t)``; the same seed went 0.16 -> 0.70 (eval). Lower
    ``lam`` only once the critic explains the returns (``explained_variance`` in the stats)."""

    name = "gae"
    Config = GAEConfig
    granularity = "token"
    methodology = "TD (GAE, learned critic)"
    episode_level_baseline = True
    needs = frozenset({"critic"})
    reference = "Schulman et al. 2016 (GAE), PPO; survey §2.5"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: GAEConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        _need_tokens(self.name, mask)
        assert ctx.critic is not None  # CreditMethod.__call__ checked ``needs``
        values = critic_values(self.name, ctx.critic, tensors).to(dtype=rewards.dtype, device=rewards.device)
        adv, returns = F.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = adv * mask
        n = mask.sum().clamp(min=1)
        v_mean = (values * mask).sum() / n
        r_mean = (returns * mask).sum() / n
        var_r = (((returns - r_mean) * mask) ** 2).sum() / n
        resid = returns - values
        var_resid = (((resid - (resid * mask).sum() / n) * mask) ** 2).sum() / n
        stats = {"value_mean": float(v_mean), "return_mean": float(r_mean)}
        if float(var_r) > 0:  # share of the returns' variance the critic explains
            stats["explained_variance"] = float(1 - var_resid / var_r)
        # the critic's forward over the batch: one pass per trajectory, over its own (non-pad) tokens
        overhead = Overhead(extra_forward_passes=int(rewards.shape[0]), forward_tokens=int(tensors.attention_mask.sum()))
        return CreditResult(
            advantages=adv,
            granularity="token",
            credit=adv,
            overhead=overhead,
            returns=returns,
            values=values,
            stats=stats,
        )


# --------------------------------------------------------------------------------------------
# ReMax
# --------------------------------------------------------------------------------------------


@dataclass
class ReMaxConfig(CreditConfig):
    method: str = param("remax", help="credit-assignment method (registry name; ReMax, Li et al. 2023)")


@register_method
class ReMax(CreditMethod):
    """ReMax (Li et al. 2023; survey §2.3): REINFORCE with the return of a greedy (argmax)
    rollout of the same task instance as the baseline, ``A_t = G_t - R(greedy)`` (verl
    ``compute_remax_outcome_advantage``). The greedy episodes are an extra rollout per task
    instance, recorded as overhead (extra tokens, forward passes, environment resets/steps)."""

    name = "remax"
    Config = ReMaxConfig
    granularity = "episode"
    methodology = "MC (greedy-rollout baseline)"
    episode_level_baseline = True
    needs = frozenset({"greedy_rollout"})
    reference = "Li et al. 2023 (ReMax); survey §2.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        rewards, mask = _inputs(tensors)
        assert ctx.greedy_rollout is not None  # CreditMethod.__call__ checked ``needs``
        baselines, overhead = ctx.greedy_rollout(batch)
        baselines = torch.as_tensor(baselines, dtype=rewards.dtype)
        if tuple(baselines.shape) != (rewards.shape[0],):
            raise ValueError(f"credit method 'remax': greedy baselines must have shape ({rewards.shape[0]},), "
                             f"got {tuple(baselines.shape)}")
        adv, returns = F.remax(rewards, baselines, mask)
        adv = adv * mask
        scalars = (rewards * mask).sum(-1) - baselines
        result = _episode_result(scalars, mask, {"greedy_return_mean": float(baselines.mean())})
        result.advantages, result.returns, result.overhead = adv, returns, overhead
        return result
