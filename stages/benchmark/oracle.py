"""Exact credit under a given policy by dynamic programming on a task's tabular MDP (survey §9.3).

The upper bound of every credit comparison (issue "the credit-assignment benchmark"): on a task
whose MDP is known (:class:`stages.schema.TabularMDP`, exported by e.g. the bifurcation family)
the advantage of each played turn, ``A_t = Q^pi(s_t, a_t) - V^pi(s_t)``, is computed exactly by
backward induction under a policy given as per-turn action probabilities ``pi_t(a)``:

    V_H(s)    = terminal_value(s)
    Q_t(s, a) = r_t(s, a) + sum_s' P_t(s' | s, a) V_{t+1}(s')
    V_t(s)    = sum_a pi_t(a) Q_t(s, a)

Vectorized over the batch (one loop over the horizon, none over trajectories or tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from environments.ground_truth import TabularMDP


@dataclass
class MDPTensors:
    """A batch of same-shaped tabular MDPs: reward (B, H, S, A), transition (B, H, S, A, S),
    terminal (B, S)."""

    reward: torch.Tensor
    transition: torch.Tensor
    terminal: torch.Tensor


def stack_mdps(mdps: list[TabularMDP]) -> MDPTensors:
    """Stack the MDPs of a batch's trajectories; they must share horizon, states and actions."""
    if not mdps:
        raise ValueError("stack_mdps: no MDPs")
    shapes = {(m.horizon, m.num_states, len(m.actions)) for m in mdps}
    if len(shapes) != 1:
        raise ValueError(f"stack_mdps: the trajectories' MDPs differ in (horizon, states, actions): {sorted(shapes)}")
    return MDPTensors(
        reward=torch.tensor([m.reward for m in mdps], dtype=torch.float64),
        transition=torch.tensor([m.transition for m in mdps], dtype=torch.float64),
        terminal=torch.tensor([m.terminal_value for m in mdps], dtype=torch.float64),
    )


def policy_values(mdp: MDPTensors, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward induction under per-turn action probabilities ``probs`` (B, H, A) (rows sum to 1;
    the same distribution in every state of a turn). Returns ``V`` (B, H + 1, S) and ``Q``
    (B, H, S, A)."""
    B, H, S, A = mdp.reward.shape
    if probs.shape != (B, H, A):
        raise ValueError(f"policy_values: probs has shape {tuple(probs.shape)}, expected {(B, H, A)}")
    probs = probs.double()
    V = torch.zeros(B, H + 1, S, dtype=torch.float64)
    Q = torch.zeros(B, H, S, A, dtype=torch.float64)
    V[:, H] = mdp.terminal
    for t in reversed(range(H)):
        Q[:, t] = mdp.reward[:, t] + torch.einsum("bsan,bn->bsa", mdp.transition[:, t], V[:, t + 1])
        V[:, t] = torch.einsum("bsa,ba->bs", Q[:, t], probs[:, t])
    return V, Q


def played_advantages(V: torch.Tensor, Q: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``Q_t(s_t, a_t) - V_t(s_t)`` of the played turns: ``states``/``actions`` (B, H) long with
    -1 on turns not played; returns (B, H) float64 with nan there."""
    B, H = states.shape
    played = states >= 0
    s, a = states.clamp(min=0), actions.clamp(min=0)
    b = torch.arange(B)[:, None].expand(B, H)
    t = torch.arange(H)[None, :].expand(B, H)
    adv = Q[b, t, s, a] - V[b, t, s]
    return torch.where(played, adv, torch.full_like(adv, float("nan")))
