"""Step-level credit from process rewards in reasoning RL (survey §3.3.1): PURE, SPRO, PRL.

A *step* is one reasoning step; in creditflow's reasoning families step ``k`` is turn ``k``
(``BatchTensors.turn_ids`` maps each policy token to its step), so step credit is ``(B, K)`` and
is broadcast to the step's policy tokens. Process rewards come from the source a method's config
names (:mod:`stages.reward.process`: procedural step checks, Math-Shepherd MC estimates, a PRM
trained here).

* :class:`PURE` (Cheng et al. 2025) — min-form credit: a step's return is the *minimum* of the
  process rewards from that step on, not their sum.
* :class:`SPRO` (Fei et al. 2025) — self-guided cumulative process rewards
  ``beta * sum log pi/pi_ref`` and the Masked Step Advantage.
* :class:`PRL` (Yao et al. 2026) — process rewards from the decomposition of the
  entropy-regularized (KL-regularized) RL objective.

FinePO (Huang et al. 2026; Appendix B row 15) is *not* implemented: it is the sub-step PRM of
SketchVL, whose sub-steps are drawing operations on a chart image scored by a multimodal PRM; its
only benchmarks are visual and the survey gives no modality-independent specification, so the
inventory records it as not applicable (creditflow has no vision modality).

Shared math lives in plain functions (:func:`min_form_returns`, :func:`softmin_transform`,
:func:`masked_step_advantage`, :func:`prl_process_rewards`), each vectorized over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.group_stats import group_ids, group_stats
from stages.credit.reverse_scan import pack_left, pack_slots
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.ref_logratio import ref_logratio
from stages.credit.registry import register_method
from stages.credit.segments import policy_token_mask, steps_to_tokens
from stages.reward.process import ProcessRewardConfig
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _step_valid(step_values: torch.Tensor, num_turns: torch.Tensor) -> torch.Tensor:
    K = step_values.shape[1]
    present = torch.arange(K).unsqueeze(0) < num_turns.unsqueeze(1)
    return present & torch.isfinite(step_values)


def _get_process_rewards(name: str, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> tuple[torch.Tensor, Overhead]:
    assert ctx.process_rewards is not None  # CreditMethod.__call__ checked ``needs``
    rewards, overhead = ctx.process_rewards(batch)
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    B, K = tensors.response_ids.shape[0], max(tensors.max_turns, 1)
    if rewards.dim() != 2 or rewards.shape[0] != B or rewards.shape[1] < K:
        raise ValueError(
            f"credit method {name!r}: process rewards must have shape (B, K) = ({B}, {K}), got {tuple(rewards.shape)}"
        )
    return rewards[:, :K], overhead


def _outcome(tensors: BatchTensors) -> torch.Tensor:
    """(B,) total reward of each episode (terminal + turn rewards), as GRPO scores it."""
    return (tensors.token_level_rewards.float() * policy_token_mask(tensors)).sum(-1)


def _loo_mean(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``x`` over the *other* rows of each row's group (0 for singleton groups)."""
    gid, G = group_ids(index, x.shape[0], device=x.device)
    n = torch.zeros(G, dtype=x.dtype).index_add_(0, gid, torch.ones_like(x))[gid]
    tot = torch.zeros(G, dtype=x.dtype).index_add_(0, gid, x)[gid]
    return torch.where(n > 1, (tot - x) / (n - 1).clamp(min=1), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# PURE
# --------------------------------------------------------------------------------------------


def min_form_returns(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``G[b, k] = min_{j >= k, valid} r[b, j]`` (nan where step k is not valid).

    Vectorized: invalid steps become +inf, then a cumulative minimum over the flipped step axis.
    """
    inf = torch.full_like(rewards, float("inf"))
    r = torch.where(valid, rewards, inf)
    g = torch.cummin(r.flip(-1), dim=-1).values.flip(-1)
    return torch.where(valid, g, torch.full_like(g, float("nan")))


def softmin_transform(rewards: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """PURE's practical transform: ``r*_k = softmax_k(-r / T) * r_k`` over a trajectory's valid
    steps, so that the ordinary sum-form return ``sum_{j>=k} r*_j`` from the first step is a
    softmin-weighted average that tends to ``min_k r_k`` as ``T -> 0`` (nan on invalid steps)."""
    logits = torch.where(valid, -rewards / temperature, torch.full_like(rewards, float("-inf")))
    w = torch.softmax(logits, dim=-1)
    w = torch.nan_to_num(w, nan=0.0)  # rows with no valid step
    out = w * torch.nan_to_num(rewards, nan=0.0)
    return torch.where(valid, out, torch.full_like(out, float("nan")))


def softmin_returns(rewards: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum-form returns of the softmin-transformed rewards (nan where step k is not valid)."""
    t = torch.nan_to_num(softmin_transform(rewards, valid, temperature), nan=0.0)
    g = t.flip(-1).cumsum(-1).flip(-1)
    return torch.where(valid, g, torch.full_like(g, float("nan")))


@dataclass
class PUREConfig(ProcessRewardConfig, CreditConfig):
    method: str = param("pure", help="credit-assignment method (registry name; PURE, Cheng et al. 2025)")
    temperature: float = param(0.0, help="0: exact min-form return min_{j>=k} r_j; >0: PURE's softmin transform r*_k = softmax(-r/T)_k * r_k summed (Cheng et al. 2025, §4)", ge=0)
    process_weight: float = param(1.0, help="weight of the min-form process advantage (PURE's PRM term)")
    outcome_weight: float = param(1.0, help="weight of the verifiable-reward RLOO advantage added to it (PURE-VR mixes PRM and verifiable rewards; 0 = PRM only)")


@register_method
class PURE(CreditMethod):
    """PURE: min-form credit assignment for process rewards (Cheng et al. 2025, "Stop Summation:
    Min-Form Credit Assignment Is All Process Reward Model Needs for Reasoning"; survey §3.3.1,
    Appendix B row 8).

    With process rewards ``r_{i,k}`` of the steps of response ``i`` (from ``credit.process_reward``)::

        G_{i,k}  = min_{j >= k} r_{i,j}                       # min-form return (not sum_{j>=k} r_j)
        A^p_{i,k} = G_{i,k} - mean_{i' != i in group} G_{i',0} # leave-one-out baseline: other rollouts' values
        A^o_i    = R_i - mean_{i' != i in group} R_{i'}        # RLOO advantage of the verifiable outcome
        A_{i,t}  = process_weight * A^p_{i,k(t)} + outcome_weight * A^o_i   on the tokens of step k(t)

    A single bad step caps the return of every earlier step, so a response cannot "hide" an error
    behind many high-scoring steps (the reward hacking of sum-form credit the paper reports).
    ``temperature > 0`` uses the paper's practical transform instead: the rewards are re-weighted
    by ``softmax(-r/T)`` over the response's steps and summed as usual (``T -> 0`` recovers the
    min at the first step). PURE uses RLOO baselines for both the PRM and the verifiable reward
    and adds the two advantages (PURE-VR); singleton groups keep the raw values (no baseline).
    Steps whose process reward is nan (absent) are skipped by the min; their tokens get only the
    outcome term.
    """

    name = "pure"
    Config = PUREConfig
    granularity = "step"
    methodology = "Min-form PRM"
    needs = frozenset({"process_rewards"})
    reference = "Cheng et al. 2025 (PURE: Stop Summation, min-form credit assignment); survey §3.3.1"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: PUREConfig = self.cfg  # type: ignore[assignment]
        rewards, overhead = _get_process_rewards(self.name, tensors, batch, ctx)
        valid = _step_valid(rewards, tensors.num_turns)
        if cfg.temperature > 0:
            G = softmin_returns(rewards, valid, cfg.temperature)
        else:
            G = min_form_returns(rewards, valid)
        first = valid.float().argmax(-1)  # first valid step of each row
        has = valid.any(-1)
        value0 = torch.where(has, G.gather(1, first.unsqueeze(1)).squeeze(1), torch.zeros(G.shape[0]))
        baseline = _loo_mean(value0, tensors.index)
        step_adv = torch.where(valid, G - baseline.unsqueeze(1), torch.zeros_like(G))
        outcome = _outcome(tensors)
        a_out = outcome - _loo_mean(outcome, tensors.index)
        mask = policy_token_mask(tensors)
        adv = (cfg.process_weight * steps_to_tokens(step_adv, tensors.turn_ids) + cfg.outcome_weight * a_out.unsqueeze(1)) * mask
        credit = cfg.process_weight * step_adv + cfg.outcome_weight * a_out.unsqueeze(1)
        present = torch.arange(G.shape[1]).unsqueeze(0) < tensors.num_turns.unsqueeze(1)
        credit = torch.where(present, credit, torch.full_like(credit, float("nan")))
        n_valid = valid.sum().clamp(min=1)
        summed = torch.where(valid, rewards, torch.zeros_like(rewards)).flip(-1).cumsum(-1).flip(-1)
        stats = {
            "process_reward_mean": float(torch.where(valid, rewards, torch.zeros_like(rewards)).sum() / n_valid),
            "min_form_return_mean": float(torch.nan_to_num(G, nan=0.0).sum() / n_valid),
            # share of steps whose min-form return is below their own reward: capped by a later step
            "capped_step_fraction": float(((G < rewards) & valid).sum() / n_valid),
            "sum_form_return_mean": float((summed * valid).sum() / n_valid),
            "valid_step_fraction": float(valid.sum() / present.sum().clamp(min=1)),
        }
        returns = steps_to_tokens(G, tensors.turn_ids) * mask
        return CreditResult(advantages=adv, granularity="step", credit=credit, overhead=overhead,
                            returns=returns, stats=stats)


# --------------------------------------------------------------------------------------------
# SPRO
# --------------------------------------------------------------------------------------------


def masked_step_advantage(cum_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """SPRO's Masked Step Advantage (Fei et al. 2025), vectorized.

    ``cum_rewards`` (B, R) holds the cumulative process reward at each policy token. Policy tokens
    are counted per row (the t-th policy token is "step" t of the token-level MDP; observation
    tokens between turns are skipped), and::

        MSA_{i,t} = R_{i,t} - mean_{j in group(i), |y_j| > t} R_{j,t}

    i.e. the baseline at step t is the mean over the group members *still active* at t. Returns
    (B, R), 0 off the policy tokens. Implementation: pack each row's policy tokens to the left,
    segment-mean per (group, step) with ``index_add_``, gather back."""
    B, R = cum_rewards.shape
    m, excl, slot = pack_slots(response_mask)
    x = pack_left(cum_rewards.float(), slot, R + 1)[:, :R]
    n_pol = m.sum(-1)
    active = (torch.arange(R).unsqueeze(0) < n_pol.unsqueeze(1)).float()
    gid, G = group_ids(index, B)
    sums = torch.zeros(G, R).index_add_(0, gid, x * active)
    counts = torch.zeros(G, R).index_add_(0, gid, active)
    base = (sums / counts.clamp(min=1))[gid]
    msa_p = (x - base) * active
    msa_p = torch.nn.functional.pad(msa_p, (0, 1))
    return torch.gather(msa_p, 1, excl.clamp(max=R)) * m.float()


@dataclass
class SPROConfig(CreditConfig):
    method: str = param("spro", help="credit-assignment method (registry name; SPRO, Fei et al. 2025)")
    beta: float = param(0.05, help="scale of the self-guided process reward beta * log(pi/pi_ref) (Fei et al. 2025; implicit-reward beta)", ge=0)
    outcome_weight: float = param(1.0, help="weight of the GRPO outcome advantage added to the masked step advantage (Fei et al. 2025)")
    norm_adv_by_std: bool = param(True, help="divide the outcome advantage by the group std (GRPO); false: Dr. GRPO")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class SPRO(CreditMethod):
    """SPRO: Self-Guided Process Reward Optimization with the Masked Step Advantage (Fei et al.
    2025; survey §3.3.1, Appendix B row 9).

    The policy is its own process reward model (the r -> Q* view of Rafailov et al. 2024): the
    *cumulative process reward* of response ``i`` at its t-th policy token is::

        R_{i,t} = beta * sum_{t' <= t} log pi(y_{t'} | y_<t') / pi_ref(y_{t'} | y_<t')

    (pi = the behaviour policy, ``old_logprobs``; pi_ref = the frozen initial policy). The
    Masked Step Advantage compares it with the group members that are still generating at t::

        MSA_{i,t} = R_{i,t} - mean_{j in group, |y_j| > t} R_{j,t}
        A_{i,t}   = outcome_weight * A^GRPO_i + MSA_{i,t}

    Per position the MSA of the active group members sums to zero; at the last position of
    equally long responses it is the sequence-level implicit reward minus its group mean (a group
    baseline). The survey's one-line summary describes SPRO as masking (removing) a step; the
    paper's mechanism, implemented here, masks *inactive group members* out of the per-step
    baseline. The steps of SPRO's token-level MDP are the policy tokens, so the native credit is
    (B, R). The reference forward pass is counted by the context provider.
    """

    name = "spro"
    Config = SPROConfig
    granularity = "step"
    methodology = "Masked Adv."
    needs = frozenset({"ref_logprobs"})
    reference = "Fei et al. 2025 (SPRO, Self-Guided Process Reward Optimization, Masked Step Advantage); survey §3.3.1"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SPROConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        lr = ref_logratio(self.name, tensors, ctx)
        cum = cfg.beta * lr.cumsum(-1) * mask  # masked positions add 0, so this is the sum over policy tokens <= t
        msa = masked_step_advantage(cum, mask, tensors.index)
        rewards = tensors.token_level_rewards.float()
        a_out = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        adv = (cfg.outcome_weight * a_out.unsqueeze(1) + msa) * mask
        n = mask.sum().clamp(min=1)
        stats = {
            "implicit_reward_mean": float((cfg.beta * lr).sum() / n),
            "sequence_implicit_reward_mean": float((cfg.beta * lr).sum(-1).mean()),
            "msa_abs_mean": float(msa.abs().sum() / n),
            "outcome_adv_abs_mean": float(a_out.abs().mean()),
        }
        return CreditResult(advantages=adv, granularity="step", credit=msa, returns=cum, stats=stats)


# --------------------------------------------------------------------------------------------
# PRL
# --------------------------------------------------------------------------------------------


def fixed_length_steps(response_mask: torch.Tensor, step_tokens: int) -> torch.Tensor:
    """(B, R) step index of each policy token when steps are ``step_tokens`` policy tokens long
    (PRL's fixed-length split); -1 off the policy tokens."""
    m = response_mask != 0
    ordinal = torch.cumsum(m.long(), -1) - 1
    return torch.where(m, ordinal // step_tokens, torch.full_like(ordinal, -1))


def prl_process_rewards(outcome: torch.Tensor, logratio: torch.Tensor, step_ids: torch.Tensor, beta: float,
                        num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PRL's entropy-regularized process rewards (Yao et al. 2026).

    ``r_{i,l} = R_i - beta * sum_{tokens t in steps <= l} log pi/pi_ref (y_t | y_<t)``: the outcome
    minus the KL "spent" up to the end of step l. Returns ``(r, present)``, both (B, K), ``r`` nan
    where step l does not exist. At the last step ``r_{i,L} = R_i - beta log pi/pi_ref(y_i|x)``,
    which under the optimal policy ``pi* ∝ pi_ref exp(R / beta)`` equals ``beta log Z(x)`` for every
    response (PRL's Corollary: ``r*(x,a) - (1/eta) ln pi*/pi_0 (a|x) = C``)."""
    B = logratio.shape[0]
    K = max(int(num_steps), 1)
    valid = step_ids >= 0
    idx = step_ids.clamp(min=0, max=K - 1)
    per_step = torch.zeros(B, K, dtype=logratio.dtype).scatter_add_(1, idx, logratio * valid)
    counts = torch.zeros(B, K, dtype=logratio.dtype).scatter_add_(1, idx, valid.to(logratio.dtype))
    present = counts > 0
    r = outcome.unsqueeze(1) - beta * per_step.cumsum(-1)
    return torch.where(present, r, torch.full_like(r, float("nan"))), present


@dataclass
class PRLConfig(CreditConfig):
    method: str = param("prl", help="credit-assignment method (registry name; PRL, Yao et al. 2026)")
    beta: float = param(0.05, help="KL coefficient 1/eta of the entropy-regularized objective E[r] - (1/eta) KL(pi || pi_ref) (Yao et al. 2026); 0 = GRPO exactly", ge=0)
    step_unit: str = param("turn", help="what a step is: turn (one reasoning step per turn) | tokens (fixed-length chunks of step_tokens policy tokens, PRL's default split)", choices=("turn", "tokens"))
    step_tokens: int = param(256, help="step_unit=tokens: policy tokens per step (PRL splits by fixed length, e.g. 256)", ge=1)
    norm_adv_by_std: bool = param(True, help="divide by the group std of the entropy-regularized returns (GRPO-style); false: centre only")
    epsilon: float = param(1e-6, help="added to the group std", ge=0)


@register_method
class PRL(CreditMethod):
    """PRL: Process Reward Learning from the entropy-regularized RL objective (Yao et al. 2026;
    survey §3.3.1, Appendix B row 13).

    The objective ``E[r(x,y)] - beta KL(pi || pi_ref)`` (``beta = 1/eta``) has the optimal policy
    ``pi* ∝ pi_ref exp(r / beta)``, hence ``r(x,y) - beta log pi*/pi_ref (y|x) = beta log Z(x)``
    for every response. PRL decomposes this over the steps of a response: the process reward of
    step l is the outcome minus the log-ratio accumulated up to the end of step l::

        r_{i,l} = R_i - beta * sum_{t in steps <= l} log pi(y_t|y_<t) / pi_ref(y_t|y_<t)
        A_{i,l} = (r_{i,l} - mean_g r_{.,L}) / (std_g r_{.,L} + eps)       # group of i, L = last step

    so the baseline is the group's entropy-regularized return ``R - beta log pi/pi_ref(y|x)``; at
    the optimum every response's final-step reward equals ``beta log Z(x)`` and its advantage
    vanishes, while an early step whose tokens the policy over-weights against the reference gets
    a larger process reward for the steps after it. ``beta = 0`` reduces exactly to GRPO. Steps
    are turns (``step_unit=turn``) or fixed-length chunks of policy tokens (``step_unit=tokens``,
    the split the paper found to work well). The reference forward pass is counted by the
    context provider.
    """

    name = "prl"
    Config = PRLConfig
    granularity = "step"
    methodology = "Entropy-RL"
    needs = frozenset({"ref_logprobs"})
    reference = "Yao et al. 2026 (PRL: Process Reward Learning, entropy-regularized process rewards); survey §3.3.1"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: PRLConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        lr = ref_logratio(self.name, tensors, ctx)
        if cfg.step_unit == "turn":
            step_ids = tensors.turn_ids
            K = max(tensors.max_turns, 1)
        elif cfg.step_unit == "tokens":
            step_ids = fixed_length_steps(tensors.response_mask, cfg.step_tokens)
            K = max(int(step_ids.max().item()) + 1, 1)
        else:
            raise ValueError(f"config key 'credit.step_unit' must be 'turn' or 'tokens', got {cfg.step_unit!r}")
        outcome = _outcome(tensors)
        r, present = prl_process_rewards(outcome, lr, step_ids, cfg.beta, K)
        final = outcome - cfg.beta * lr.sum(-1)  # entropy-regularized return of each response
        _, mean, std, _ = group_stats(final, tensors.index, with_std=cfg.norm_adv_by_std)
        step_adv = r - mean.unsqueeze(1)
        if cfg.norm_adv_by_std:
            step_adv = step_adv / (std.unsqueeze(1) + cfg.epsilon)
        adv = steps_to_tokens(step_adv, step_ids) * mask
        n = present.sum().clamp(min=1)
        stats = {
            "process_reward_mean": float(torch.nan_to_num(r, nan=0.0).sum() / n),
            "regularized_return_mean": float(final.mean()),
            "kl_mean": float(lr.sum(-1).mean()),
            "steps_mean": float(present.sum(-1).float().mean()),
        }
        returns = steps_to_tokens(r, step_ids) * mask
        return CreditResult(advantages=adv, granularity="step", credit=step_adv, returns=returns, stats=stats)
