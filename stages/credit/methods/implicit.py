"""Token-level credit from the policy's own probabilities (survey §3.1.2–§3.1.3): implicit DPO
token credit ("From r to Q*") and T-REG's self-generated token rewards.

* :class:`DPOImplicit` (Rafailov et al. 2024) — a KL-regularized (DPO-trained) policy defines an
  implicit token-level reward ``beta * log pi/pi_ref`` per token whose sum is the sequence-level
  implicit reward; used as token credit on top of the outcome advantage.
* :class:`TREG` (Zhou et al. 2024) — token rewards from contrastive prompting of the policy
  itself (a "good" vs a "bad" instruction), added to the GRPO advantage as a regularizer.

Shared math: :func:`implicit_token_credit`, :func:`contrastive_token_rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, encode_text
from stages.credit.ref_logratio import ref_logratio
from stages.credit.registry import register_method
from stages.credit.segments import policy_token_mask
from stages.reward.judge import judge_overhead, usage
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# implicit DPO token credit ("From r to Q*")
# --------------------------------------------------------------------------------------------


def implicit_token_credit(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """(B, R) ``beta * (log pi(y_t|y_<t) - log pi_ref(y_t|y_<t))`` on policy tokens, 0 elsewhere.

    Its row sum is the sequence-level implicit reward ``beta * log pi(y|x) / pi_ref(y|x)`` of the
    policy's tokens (chain rule; observation tokens are the environment's, not the policy's)."""
    m = (response_mask != 0).to(logprobs.dtype)
    return beta * (logprobs - ref_logprobs) * m


@dataclass
class DPOImplicitConfig(CreditConfig):
    method: str = param("dpo_implicit", help="credit-assignment method (registry name; implicit token credit, Rafailov et al. 2024)")
    beta: float = param(0.1, help="DPO temperature beta of the implicit reward beta * log(pi/pi_ref) (Rafailov et al. 2024)", gt=0)
    credit_weight: float = param(1.0, help="weight of the implicit token credit added to the outcome advantage (0 = GRPO)")
    norm_adv_by_std: bool = param(True, help="outcome advantage: divide by the group std (GRPO); false: Dr. GRPO")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class DPOImplicit(CreditMethod):
    """Implicit token-level credit of a KL-regularized policy ("From r to Q*: Your Language Model
    is Secretly a Q-Function", Rafailov et al. 2024; survey §3.1.3, Appendix B row 4).

    In the token-level MDP of a language model (deterministic transitions: the next state is the
    prefix plus the token), the KL-regularized optimum satisfies the soft Bellman equation
    ``beta log pi*(y_t|s_t)/pi_ref(y_t|s_t) = Q*(s_t, y_t) - V*(s_t) = V*(s_{t+1}) - V*(s_t)``:
    the token log-ratio *is* the token's advantage, and the tokens' credits telescope to the
    sequence-level implicit reward ``beta log pi/pi_ref(y|x) = r(x,y) - V*(s_0)``. With
    pi = the behaviour policy (the current policy at rollout time, ``old_logprobs``) and pi_ref the
    frozen initial policy::

        c_{i,t} = beta * (log pi(y_t|y_<t) - log pi_ref(y_t|y_<t))          # native token credit
        A_{i,t} = A^GRPO_i + credit_weight * c_{i,t}

    The survey (§2.6) places DPO's implicit credit as the token-level refinement of an
    episode-level signal; here the episode-level signal is the group-relative outcome advantage
    (GRPO), and the implicit credit redistributes along the response: tokens the policy has
    learned to prefer over the reference gain, the others lose. ``credit_weight = 0`` is GRPO.
    The reference forward pass is counted by the context provider.
    """

    name = "dpo_implicit"
    Config = DPOImplicitConfig
    granularity = "token"
    methodology = "Implicit"
    needs = frozenset({"ref_logprobs"})
    reference = "Rafailov et al. 2024 (From r to Q*: implicit token-level credit of DPO); survey §3.1.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: DPOImplicitConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        lr = ref_logratio(self.name, tensors, ctx)  # validated (B, R) log-ratio, 0 off-policy
        credit = cfg.beta * lr
        rewards = tensors.token_level_rewards.float()
        a_out = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        adv = (a_out.unsqueeze(1) + cfg.credit_weight * credit) * mask
        seq = credit.sum(-1)
        n = mask.sum().clamp(min=1)
        stats = {
            "sequence_implicit_reward_mean": float(seq.mean()),
            "token_credit_abs_mean": float(credit.abs().sum() / n),
            "outcome_adv_abs_mean": float(a_out.abs().mean()),
        }
        if seq.numel() > 1 and float(seq.std()) > 0 and float(tensors.episode_rewards.std()) > 0:
            stats["implicit_outcome_corr"] = float(torch.corrcoef(torch.stack([seq, tensors.episode_rewards.float()]))[0, 1])
        return CreditResult(advantages=adv, granularity="token", credit=credit, stats=stats)


# --------------------------------------------------------------------------------------------
# T-REG
# --------------------------------------------------------------------------------------------


def contrastive_token_rewards(lp_good: torch.Tensor, lp_bad: torch.Tensor, response_mask: torch.Tensor,
                              squash: str = "sigmoid") -> torch.Tensor:
    """T-REG's self-generated token rewards from contrastive prompting (B, R), 0 off-policy::

        d_t = log pi(y_t | good instruction, x, y_<t) - log pi(y_t | bad instruction, x, y_<t)
        r_t = sigmoid(d_t) - 1/2      (squash="sigmoid", bounded in (-1/2, 1/2))
        r_t = d_t                     (squash="none")
    """
    d = lp_good - lp_bad
    if squash == "sigmoid":
        r = torch.sigmoid(d) - 0.5
    elif squash == "none":
        r = d
    else:
        raise ValueError(f"config key 'credit.squash' must be 'sigmoid' or 'none', got {squash!r}")
    return r * (response_mask != 0).to(r.dtype)


def _pad_rows(rows: list[torch.Tensor], R: int) -> torch.Tensor:
    out = torch.nn.utils.rnn.pad_sequence([r.float().reshape(-1) for r in rows] or [torch.zeros(0)], batch_first=True)
    if out.shape[1] < R:
        out = torch.nn.functional.pad(out, (0, R - out.shape[1]))
    return out[:, :R]


@dataclass
class TREGConfig(CreditConfig):
    method: str = param("t_reg", help="credit-assignment method (registry name; T-REG, Zhou et al. 2024)")
    reg_weight: float = param(0.1, help="weight of the self-generated token rewards (centred per response when redistribute) added to the GRPO advantage (0 = GRPO exactly)")
    good_instruction: str = param("Solve this correctly, checking every step.\n", help="contrastive prompt that elicits good responses (Zhou et al. 2024, contrastive self-prompting)")
    bad_instruction: str = param("Solve this carelessly, with mistakes.\n", help="contrastive prompt that elicits bad responses (Zhou et al. 2024)")
    squash: str = param("sigmoid", help="token reward from the log-prob difference d: sigmoid (sigmoid(d) - 1/2, bounded) | none (d)", choices=("sigmoid", "none"))
    redistribute: bool = param(True, help="centre the token rewards on each response's policy tokens, so they redistribute the sequence-level (GRPO) advantage along the response and its row sum stays GRPO's (T-REG guides how the sequence-level reward is distributed over tokens, Zhou et al. 2024); false: add them uncentred")
    norm_adv_by_std: bool = param(True, help="GRPO base advantage: divide by the group std; false: Dr. GRPO")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class TREG(CreditMethod):
    """T-REG: token-level reward regularization with self-generated token rewards (Zhou et al.
    2024, "T-REG: Preference Optimization with Token-Level Reward Regularization"; survey §3.1.2,
    Appendix B row 3).

    The policy itself labels the tokens of its responses, without a reward model, critic or extra
    rollouts: each response is re-scored after the prompt prefixed with a *good* instruction and
    with a *bad* one (contrastive prompting), and a token that the good instruction makes more
    likely than the bad one earns a positive reward (:func:`contrastive_token_rewards`). In T-REG
    the token rewards are weak supervision for *how the sequence-level reward is distributed over
    the tokens* (they regularize DPO's implicit token rewards); here the sequence-level signal is
    GRPO's advantage and the token rewards redistribute it along the response::

        A_{i,t} = A^GRPO_i + reg_weight * (r_{i,t} - mean_{t' in y_i} r_{i,t'})     # redistribute=true
        A_{i,t} = A^GRPO_i + reg_weight * r_{i,t}                                  # redistribute=false

    With ``redistribute`` (the default) every response's advantages sum to GRPO's over its policy
    tokens, ``sum_t A_{i,t} = |y_i| A^GRPO_i``: the outcome fixes each response's total credit
    and the self-generated rewards only move it between tokens, so a prompt-wide bias of the
    contrastive scores (every token slightly likelier under the good instruction) is not credit.
    ``reg_weight = 0`` is exactly GRPO. Cost: the scorer's forward passes over the ``2B``
    contrastive contexts (one batched call), recorded as overhead.
    """

    name = "t_reg"
    Config = TREGConfig
    granularity = "token"
    methodology = "Self-generated"
    needs = frozenset({"scorer", "tokenizer"})
    reference = "Zhou et al. 2024 (T-REG: token-level reward regularization, contrastive self-prompting); survey §3.1.2"

    def token_rewards(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> tuple[torch.Tensor, Overhead]:
        """(B, R) token rewards and the scorer overhead they cost (forward passes and their tokens)."""
        cfg: TREGConfig = self.cfg  # type: ignore[assignment]
        assert ctx.scorer is not None and ctx.tokenizer is not None
        good = encode_text(ctx.tokenizer, cfg.good_instruction)
        bad = encode_text(ctx.tokenizer, cfg.bad_instruction)
        trajs = batch.trajectories
        contexts = [good + list(t.prompt_ids) for t in trajs] + [bad + list(t.prompt_ids) for t in trajs]
        targets = [list(t.response_ids) for t in trajs] * 2
        before = usage(ctx.scorer)
        lps = ctx.scorer(contexts, targets)
        passes = judge_overhead(ctx.scorer, before)
        if len(lps) != len(contexts):
            raise ValueError(f"credit method 't_reg': scorer returned {len(lps)} rows for {len(contexts)} contexts")
        R = tensors.response_ids.shape[1]
        B = len(trajs)
        lp = _pad_rows(list(lps), R)
        return contrastive_token_rewards(lp[:B], lp[B:], tensors.response_mask, cfg.squash), passes

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: TREGConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        rewards = tensors.token_level_rewards.float()
        a_out = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        base = a_out.unsqueeze(1) * mask
        if cfg.reg_weight == 0:  # exactly GRPO, and no scorer call
            return CreditResult(advantages=base, granularity="token", credit=torch.zeros_like(base),
                                stats={"reg_weight": 0.0})
        tok, passes = self.token_rewards(tensors, batch, ctx)
        shift = tok
        if cfg.redistribute:  # centre per response: the row's policy tokens keep GRPO's total
            row_mean = tok.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
            shift = (tok - row_mean) * mask
        adv = base + cfg.reg_weight * shift * mask
        n = mask.sum().clamp(min=1)
        stats = {
            "token_reward_mean": float(tok.sum() / n),
            "token_reward_abs_mean": float(tok.abs().sum() / n),
            "positive_token_fraction": float(((tok > 0) & (mask > 0)).sum() / n),
            "reg_weight": float(cfg.reg_weight),
            # how far a response's summed advantage moved from GRPO's (0 with redistribute)
            "row_sum_shift_max": float(((adv - base) * mask).sum(-1).abs().max()),
        }
        n_tokens = int(sum(len(t.prompt_ids) + len(t.response_ids) for t in batch.trajectories))
        overhead = passes
        stats["scored_tokens"] = float(2 * n_tokens)
        return CreditResult(advantages=adv, granularity="token", credit=tok, overhead=overhead, stats=stats)
