"""DPO-family losses of stage 5 (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", eq. 7; survey §5.1 for the turn-level form).

For a pair (chosen w, rejected l) of responses to the same context::

    L_DPO = -log sigmoid( beta * [ (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) ] )

with ``log pi(y)`` the *sum* of the response's token log-probs under the policy (with grad) and
``pi_ref`` the frozen reference policy (``needs`` ``ref_logprobs``); ``beta`` is
``update.dpo_beta``. The mean is over the mini-batch's pairs.

* ``dpo`` — trajectory pairs (``needs`` ``trajectory_pairs``, :func:`stages.update.pairs.trajectory_pairs`):
  a whole episode's policy tokens are one response; per group, the highest- vs the lowest-advantage
  trajectory. Accepts only ``episode`` credit: a token- or turn-level advantage has no single
  trajectory score it could be ranked by without averaging the method's credit away.
* ``turn_dpo`` — turn pairs (``needs`` ``turn_pairs``, :func:`stages.update.pairs.turn_pairs`): one
  turn's action tokens are one response; per (group, anchor state), the highest- vs the
  lowest-advantage turn (SWEET-RL's actor update, Zhou et al. 2025 §4.2, ranks candidate turns
  by its critic's advantage the same way). Accepts ``episode`` and ``turn`` credit (one advantage
  per turn).

``update.dpo_nll_coef > 0`` adds the chosen responses' mean per-token negative log-likelihood
(RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1): DPO alone only
fixes the chosen-minus-rejected margin and can lower both likelihoods, moving probability to
tokens no pair contains (in the agentic benchmark: invalid actions).

A mini-batch holds whole groups (the trainer orders rows group by group for these losses;
``update.minibatch_size`` must be a multiple of ``rollout.group_size``), so no pair is split. The
behaviour log-probs are not used (DPO is not an importance-weighted surrogate); with
``update.epochs > 1`` the later epochs reuse the same pairs, as offline DPO does.

Simplified against the paper: the pairs are the policy's own rollouts ranked by the credit stage
(on-policy/"online" DPO), not a fixed human-preference data set, and the reference policy is the
frozen initial policy of the run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from stages.update.loss_registry import register_loss

TURN_CREDIT = ("episode", "turn")


def dpo_from_logratios(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
                       like: torch.Tensor, chosen_nll: "torch.Tensor | None" = None,
                       nll_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over pairs of ``-log sigmoid(beta * (chosen - rejected))`` (each a response's summed
    log pi - log pi_ref), plus ``nll_coef`` times the chosen responses' mean per-token negative
    log-likelihood ``chosen_nll`` (RPO's term); no pairs: a zero loss (``like.sum() * 0``)."""
    if chosen.numel() == 0:
        return like.sum() * 0.0, {"dpo_pairs": 0.0}
    margin = beta * (chosen - rejected)
    loss = -F.logsigmoid(margin).mean()
    if nll_coef > 0 and chosen_nll is not None:
        loss = loss + nll_coef * chosen_nll.mean()
    with torch.no_grad():
        stats = {"dpo_pairs": float(chosen.numel()), "dpo_margin": float(margin.mean()),
                 "dpo_accuracy": float((margin > 0).float().mean()),
                 "dpo_chosen_logratio": float(chosen.mean()), "dpo_rejected_logratio": float(rejected.mean())}
    return loss, stats


@register_loss("dpo", aggregation="seq-mean-token-mean", needs=("ref_logprobs", "trajectory_pairs"),
               accepts=("episode",), reads="ranks a group's trajectories by one advantage per trajectory",
               reference="Rafailov et al. 2023 (DPO, eq. 7) on trajectory pairs: best vs worst of a group",
               off_policy="none needed: an offline preference objective against the frozen reference (no behaviour log-probs)")
def dpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             cfg: Any, ref_logprobs: torch.Tensor, trajectory_pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on (chosen row, rejected row) pairs: each row's summed policy/reference log-ratio."""
    lr = ((logprobs - ref_logprobs.detach()) * mask).sum(-1)
    nll = -(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    p = trajectory_pairs.long()
    return dpo_from_logratios(lr[p[:, 0]], lr[p[:, 1]], cfg.dpo_beta, logprobs, nll[p[:, 0]],
                              getattr(cfg, "dpo_nll_coef", 0.0))


@register_loss("turn_dpo", aggregation="seq-mean-token-mean", needs=("ref_logprobs", "turn_ids", "turn_pairs"),
               accepts=TURN_CREDIT, reads="ranks turns at an anchor state by one advantage per turn",
               reference="Rafailov et al. 2023 (DPO) on turn pairs at the same anchor state (SWEET-RL's actor loss, Zhou et al. 2025)",
               off_policy="none needed: an offline preference objective against the frozen reference (no behaviour log-probs)")
def turn_dpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  cfg: Any, ref_logprobs: torch.Tensor, turn_ids: torch.Tensor,
                  turn_pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on (row, turn) pairs: each turn's summed policy/reference log-ratio over its tokens."""
    B, R = logprobs.shape
    tid = turn_ids[:, :R].long()
    valid = ((tid >= 0) & (mask != 0)).to(logprobs.dtype)
    p = turn_pairs.long()
    K = max(int(tid.max()) + 1 if tid.numel() else 1, int(p[:, [1, 3]].max()) + 1 if p.numel() else 1, 1)
    zeros = torch.zeros((B, K), dtype=logprobs.dtype)
    lr = zeros.scatter_add(1, tid.clamp(min=0), (logprobs - ref_logprobs.detach()) * valid)
    nll = -zeros.scatter_add(1, tid.clamp(min=0), logprobs * valid) / zeros.scatter_add(
        1, tid.clamp(min=0), valid).clamp(min=1)
    return dpo_from_logratios(lr[p[:, 0], p[:, 1]], lr[p[:, 2], p[:, 3]], cfg.dpo_beta, logprobs,
                              nll[p[:, 0], p[:, 1]], getattr(cfg, "dpo_nll_coef", 0.0))
