"""POAD: Policy Optimization with Action Decomposition (Wen et al. 2024, "Reinforcing LLM Agents
via Policy Optimization with Action Decomposition", NeurIPS 2024; survey §5.3, Appendix B row 18).

A turn's action is a sequence of tokens; BAD (Bellman backup with Action Decomposition) backs the
value up token by token inside the action and across actions at its last token:

* :func:`bad_td_errors` — the token TD errors of BAD;
* :func:`bad_gae` — their GAE (lambda per token, gamma only between turns), vectorized: an
  intra-turn gated reverse scan plus an exact turn-level carry (a (B, K, K) log-space matrix);
* :class:`POAD` — the credit method on the update stage's critic (:mod:`stages.update.critic`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, critic_values
from stages.credit.masked_stats import masked_whiten
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import Segments, broadcast, policy_token_mask, segment_rewards, turn_segments, unit_ends
from stages.schema import Batch, BatchTensors, CreditResult, Overhead


def bad_td_errors(values: torch.Tensor, rewards: torch.Tensor, seg: Segments, gamma: float) -> torch.Tensor:
    """(B, R) BAD token TD errors on the turns' policy tokens (0 elsewhere). ``values`` (B, R):
    ``V(o_t, w_{1:j-1})``, the value before token j; ``rewards`` (B, K): turn k's reward::

        j inside turn k, not its last token:  delta_j = V_{j+1} - V_j           (no reward, no discount)
        j the last token of turn k:           delta_j = r_k + gamma * V(s_{k+1}) - V_j

    with ``V(s_{k+1})`` the value at turn k+1's first token (0 after the last turn). Summed over
    a turn the errors telescope to the turn-level TD error ``r_k + gamma V(s_{k+1}) - V(s_k)``."""
    B, R = values.shape
    on = seg.seg_id >= 0
    v = values.float() * on
    pos = torch.arange(R, device=v.device).expand(B, R)
    is_end = on & (pos == unit_ends(seg).gather(1, seg.seg_id.clamp(min=0)))
    v_next_tok = torch.nn.functional.pad(v[:, 1:], (0, 1))  # inside a turn, the next token is the next position
    v_first = v.gather(1, seg.starts.clamp(min=0)) * seg.present  # V(s_k)
    v_first_next = torch.nn.functional.pad(v_first[:, 1:], (0, 1))  # V(s_{k+1}); 0 after the last turn
    end_target = broadcast(rewards.float() + gamma * v_first_next, seg, on.float())
    target = torch.where(is_end, end_target, v_next_tok)
    return (target - v) * on


def bad_gae(values: torch.Tensor, rewards: torch.Tensor, seg: Segments, gamma: float,
            lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over BAD's token sequence: ``A_j = delta_j + c_j * A_{j+1}`` along each row's policy
    tokens, ``c_j = lam`` inside a turn and ``gamma * lam`` from a turn's last token to the next
    turn's first. Returns (advantages, returns = A + V), (B, R), 0 off the turns.

    Computed as ``A_j = I_j + lam^(e_k - j) * gamma * lam * Y_{k+1}``: ``I`` the intra-turn
    lambda-scan (reset at each turn's end), ``Y_k = A`` at turn k's first token, solved over turns
    with the per-turn coefficient ``rho_k = gamma * lam^{L_k}`` as a (B, K, K) matrix of
    ``prod rho`` built in log space (no under/overflow)."""
    on = (seg.seg_id >= 0)
    delta = bad_td_errors(values, rewards, seg, gamma)
    ends = unit_ends(seg)
    B, R = delta.shape
    pos = torch.arange(R, device=delta.device).expand(B, R)
    end_of_tok = ends.gather(1, seg.seg_id.clamp(min=0))
    keep = (on & (pos != end_of_tok)).float()
    intra = reverse_discounted_scan(delta.double(), lam, keep.double()) * on
    K = seg.K
    first_intra = intra.gather(1, seg.starts.clamp(min=0)) * seg.present  # I at each turn's first token
    length = (ends - seg.starts + 1).clamp(min=0).double() * seg.present
    log_lam = torch.log(torch.tensor(lam, dtype=torch.float64)).clamp(min=-1e4)
    log_gamma = torch.log(torch.tensor(gamma, dtype=torch.float64)).clamp(min=-1e4)
    log_rho = (log_gamma + length * log_lam).clamp(min=-1e4) * seg.present  # absent turns: never reached
    cum = torch.nn.functional.pad(log_rho.cumsum(-1), (1, 0))[:, :K]  # exclusive prefix sums
    expo = cum.unsqueeze(1) - cum.unsqueeze(2)  # [b, k, k'] = sum_{k <= k'' < k'} log rho_k''
    upper = torch.ones((K, K), dtype=torch.bool, device=delta.device).triu()
    mat = torch.where(upper, expo.clamp(max=0).exp(), torch.zeros_like(expo))
    Y = torch.einsum("bkj,bj->bk", mat, first_intra) * seg.present
    Y_next = torch.nn.functional.pad(Y[:, 1:], (0, 1))
    steps_to_end = (end_of_tok - pos).clamp(min=0).double()
    carry = torch.pow(torch.tensor(lam, dtype=torch.float64), steps_to_end) * gamma * lam
    adv = (intra + carry * broadcast(Y_next, seg, on.double())) * on
    adv = adv.float()
    return adv, (adv + values.float() * on) * on


@dataclass
class POADConfig(CreditConfig):
    method: str = param("poad", help="credit-assignment method (registry name; POAD, Wen et al. 2024)")
    gamma: float = param(0.99, help="discount between turns (BAD: no discount between the tokens of one action)", ge=0, le=1)
    lam: float = param(0.95, help="GAE lambda per token of BAD's token sequence", ge=0, le=1)
    whiten: bool = param(True, help="whiten the token advantages over the batch's policy tokens (PPO's advantage normalization); false: raw")


@register_method
class POAD(CreditMethod):
    """POAD (Wen et al. 2024, NeurIPS; survey §5.3, Appendix B row 18): token-level credit inside
    a turn from a token-level critic trained with BAD.

    The critic (the update stage's value model, :mod:`stages.update.critic`) values every
    intermediate state of an action: ``V_j = V(o_t, w_{1:j-1})``. BAD backs it up token by token
    (:func:`bad_td_errors`): inside the action the target of token j is ``V_{j+1}`` (no reward, no
    discount); at the action's last token it is ``r_t + gamma * V(o_{t+1})``, the next turn's
    first token's value. So at the turn boundaries the token values are the turn-level values and
    a turn's token TD errors sum to the turn-level TD error of Turn-PPO's MDP
    (tests/test_credit_poad.py). Advantages are GAE over those errors (:func:`bad_gae`); the
    returns ``A + V`` are the critic's token targets (the trainer's value loss). Limit
    ``lam = 1``: every token's advantage is the discounted return-to-go (gamma per turn) minus
    ``V_j``; at a turn's first token that is Turn-PPO's ``lam = 1`` advantage.

    Simplified: the paper's BAD for the policy is derived on Q-values with a max/soft backup; here
    the backup is the on-policy one for V (as its PPO variant uses), and the policy loss is the
    run's ``update.loss`` (token-level PPO/GRPO clip). One critic forward pass per trajectory.
    """

    name = "poad"
    Config = POADConfig
    granularity = "token"
    methodology = "Action Decomp."
    needs = frozenset({"critic"})
    default_update = "ppo"
    reference = "Wen et al. 2024 (POAD: Bellman backup with action decomposition, token-level critic); survey §5.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: POADConfig = self.cfg  # type: ignore[assignment]
        assert ctx.critic is not None  # CreditMethod.__call__ checked ``needs``
        mask = policy_token_mask(tensors)
        seg = turn_segments(tensors)
        values = critic_values(self.name, ctx.critic, tensors).float() * (seg.seg_id >= 0)
        r_k = segment_rewards(tensors, seg).float() * seg.present
        adv, returns = bad_gae(values, r_k, seg, cfg.gamma, cfg.lam)
        raw = adv
        if cfg.whiten and int(mask.sum()) >= 2:
            adv = masked_whiten(adv, mask) * mask
        delta = bad_td_errors(values, r_k, seg, cfg.gamma)
        n = mask.sum().clamp(min=1)
        stats = {"value_mean": float((values * mask).sum() / n), "td_abs_mean": float(delta.abs().sum() / n),
                 "adv_abs_mean": float(raw.abs().sum() / n),
                 "turns_per_trajectory": float(seg.present.sum(-1).float().mean())}
        overhead = Overhead(extra_forward_passes=int(mask.shape[0]), forward_tokens=int(tensors.attention_mask.sum()))
        return CreditResult(advantages=adv, granularity="token", credit=raw, overhead=overhead, returns=returns,
                            values=values, stats=stats)
