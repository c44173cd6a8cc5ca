"""Exact credit under a given policy by dynamic programming on a task's tabular MDP (survey §9.3).

The upper bound of every credit comparison (issue "the credit-assignment benchmark"): on a task
whose MDP is known (:class:`stages.schema.TabularMDP`, exported by e.g. the bifurcation family)
the advantage of each played turn, ``A_t = Q^pi(s_t, a_t) - V^pi(s_t)``, is computed exactly by
backward induction under a policy given as per-turn action probabilities ``pi_t(a)``:

    V_H(s)    = terminal_value(s)
    Q_t(s, a) = r_t(s, a) + sum_s' P_t(s' | s, a) V_{t+1}(s')
    V_t(s)    = sum_a pi_t(a) Q_t(s, a)

Vectorized over the batch (one loop over the horizon, none over trajectories or tokens).
Deterministic MDPs given as next-state tables (``TabularMDP.next_state``: Sokoban) use
``sum_s' P V = V_{t+1}(next_t(s, a))``, a gather, and may differ in their number of states: the
batch is padded to the largest, padding states unreachable (self-loops, reward 0, terminal 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from environments.ground_truth import TabularMDP


@dataclass
class MDPTensors:
    """A batch of same-shaped tabular MDPs: reward (B, H, S, A), transition (B, H, S, A, S),
    terminal (B, S); deterministic ones carry ``next_state`` (B, H, S, A) long instead of
    ``transition`` (None)."""

    reward: torch.Tensor
    transition: Optional[torch.Tensor]
    terminal: torch.Tensor
    next_state: Optional[torch.Tensor] = None


def _rows_tensor(rows: list, dtype: torch.dtype, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """``torch.tensor(rows)`` of a per-turn table, converting each distinct row object once
    (tables repeated over turns are one list object: ``[row] * H``)."""
    out = []
    for r in rows:
        if id(r) not in memo:
            memo[id(r)] = torch.tensor(r, dtype=dtype)
        out.append(memo[id(r)])
    return torch.stack(out)


def _stack_deterministic(mdps: list[TabularMDP]) -> MDPTensors:
    S = max(m.num_states for m in mdps)
    B, H, A = len(mdps), mdps[0].horizon, len(mdps[0].actions)
    reward = torch.zeros(B, H, S, A, dtype=torch.float64)
    nxt = torch.arange(S).view(1, 1, S, 1).repeat(B, H, 1, A)  # padding states loop on themselves
    terminal = torch.zeros(B, S, dtype=torch.float64)
    memo: dict[int, torch.Tensor] = {}
    for b, m in enumerate(mdps):  # one copy per trajectory (data preparation, not credit math)
        n = m.num_states
        reward[b, :, :n] = _rows_tensor(m.reward, torch.float64, memo)
        nxt[b, :, :n] = _rows_tensor(m.next_state, torch.long, memo)
        terminal[b, :n] = torch.tensor(m.terminal_value, dtype=torch.float64)
    return MDPTensors(reward=reward, transition=None, terminal=terminal, next_state=nxt)


def stack_mdps(mdps: list[TabularMDP]) -> MDPTensors:
    """Stack the MDPs of a batch's trajectories; they must share horizon, states and actions
    (deterministic ones, all given by ``next_state``, only horizon and actions)."""
    if not mdps:
        raise ValueError("stack_mdps: no MDPs")
    if all(m.next_state is not None for m in mdps):
        shapes = {(m.horizon, len(m.actions)) for m in mdps}
        if len(shapes) != 1:
            raise ValueError(f"stack_mdps: the trajectories' MDPs differ in (horizon, actions): {sorted(shapes)}")
        return _stack_deterministic(mdps)
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
        Q[:, t] = _q_backup(mdp, t, V[:, t + 1])
        V[:, t] = torch.einsum("bsa,ba->bs", Q[:, t], probs[:, t])
    return V, Q


def _q_backup(mdp: MDPTensors, t: int, v_next: torch.Tensor) -> torch.Tensor:
    """(B, S, A) ``Q_t(s, a) = r_t(s, a) + E_{s'}[V_{t+1}(s')]`` from ``v_next`` (B, S)."""
    B, _, S, A = mdp.reward.shape
    if mdp.next_state is not None:  # deterministic: V_{t+1} at the next state
        nxt = mdp.next_state[:, t]
        return mdp.reward[:, t] + torch.gather(v_next, 1, nxt.reshape(B, -1)).view(B, S, A)
    return mdp.reward[:, t] + torch.einsum("bsan,bn->bsa", mdp.transition[:, t], v_next)


def optimal_values(mdp: MDPTensors, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward induction of the *optimal* policy over the first ``n_valid`` (valid) actions:
    ``V*_t(s) = max_{a < n_valid} Q*_t(s, a)``. Returns ``V*`` (B, H + 1, S) and ``Q*`` (B, H, S, A)
    (the invalid action keeps its Q but is never the max): the family's scripted optimal agent,
    the expert of StepAgent's inverse RL."""
    B, H, S, A = mdp.reward.shape
    if not 1 <= n_valid <= A:
        raise ValueError(f"optimal_values: n_valid must be in [1, {A}], got {n_valid}")
    V = torch.zeros(B, H + 1, S, dtype=torch.float64)
    Q = torch.zeros(B, H, S, A, dtype=torch.float64)
    V[:, H] = mdp.terminal
    for t in reversed(range(H)):  # the horizon, not trajectories or tokens
        Q[:, t] = _q_backup(mdp, t, V[:, t + 1])
        V[:, t] = Q[:, t, :, :n_valid].max(-1).values
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
