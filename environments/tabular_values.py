"""Exact finite-horizon values of a tabular MDP by backward induction (survey §9.3: ground truth).

The families built on Gymnasium environments with an enumerable state space (FrozenLake's
transition table ``env.unwrapped.P``; MiniGrid's reachable true states, enumerated by BFS) compute
their per-turn ground truth here, in the same recursion the oracle credit method runs under the
current policy (:mod:`stages.benchmark.oracle`), but stationary and in numpy:

    V_H(s)    = terminal(s)
    Q_t(s, a) = R(s, a) + sum_s' T(s, a, s') V_{t+1}(s')
    V_t(s)    = sum_a pi(a | s) Q_t(s, a)        (reference policy pi: uniform over valid actions)
              = max_a Q_t(s, a)                   (reference policy "optimal")

Vectorized over states and actions: one loop over the horizon only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_POLICIES = ("uniform", "optimal")


@dataclass
class FiniteHorizonValues:
    """``V`` (H + 1, S) and ``Q`` (H, S, A) of a stationary tabular MDP over horizon H."""

    V: np.ndarray
    Q: np.ndarray


def finite_horizon_values(transition: np.ndarray, reward: np.ndarray, horizon: int, n_valid: int,
                          reference_policy: str = "uniform", terminal: np.ndarray | None = None) -> FiniteHorizonValues:
    """Backward induction over ``horizon`` turns.

    ``transition`` (S, A, S) is stationary, or (S, A) integer next-state indices for a
    deterministic MDP (MiniGrid: a dense table would be S x A x S); ``reward`` (expected immediate reward) is (S, A), or
    (H, S, A) when it depends on the turn (MiniGrid's success reward shrinks with the step count);
    actions ``0..n_valid-1`` are the valid ones the reference policy mixes over (uniformly, or the
    max for ``"optimal"``); actions past ``n_valid`` (the invalid action) get a Q but no weight.
    ``terminal`` (S,) is the value after the last turn (default 0)."""
    if reference_policy not in REFERENCE_POLICIES:
        raise ValueError(f"reference_policy must be one of {REFERENCE_POLICIES}, got {reference_policy!r}")
    deterministic = transition.ndim == 2
    S, A = transition.shape[:2]
    S2 = S if deterministic else transition.shape[2]
    if reward.shape == (S, A):
        reward = np.broadcast_to(reward, (horizon, S, A))
    if S2 != S or reward.shape != (horizon, S, A) or not 1 <= n_valid <= A:
        raise ValueError(f"finite_horizon_values: shapes T{transition.shape} R{reward.shape}, n_valid={n_valid}")
    V = np.zeros((horizon + 1, S))
    Q = np.zeros((horizon, S, A))
    if terminal is not None:
        V[horizon] = terminal
    for t in reversed(range(horizon)):
        Q[t] = reward[t] + (V[t + 1][transition] if deterministic else transition @ V[t + 1])
        valid = Q[t, :, :n_valid]
        V[t] = valid.max(axis=1) if reference_policy == "optimal" else valid.mean(axis=1)
    return FiniteHorizonValues(V=V, Q=Q)


def played_credit(values: FiniteHorizonValues, states: list[int], actions: list[int], n_valid: int,
                  decisive_gap: float) -> tuple[list[float], list[float], list[float], list[bool]]:
    """(value, q_value, advantage, decisive) of the played turns: turn t in state ``states[t]``
    took action ``actions[t]``; a turn is *decisive* when the valid actions' Q-values at its state
    differ by at least ``decisive_gap`` (a bifurcation point, survey §4.6)."""
    t = np.arange(len(states))
    s = np.asarray(states, dtype=np.int64)
    a = np.asarray(actions, dtype=np.int64)
    v = values.V[t, s]
    q = values.Q[t, s, a]
    spread = values.Q[t, s, :n_valid].max(axis=1) - values.Q[t, s, :n_valid].min(axis=1)
    return v.tolist(), q.tolist(), (q - v).tolist(), (spread >= decisive_gap).tolist()
