"""Exact solver of small Sokoban levels: the reachable state space, shortest solutions,
deadlocks and the finite-horizon values of every turn (survey §4.6, §9.3).

Sokoban is deterministic, so a level's whole game is a finite graph over the states
``(player, boxes)`` reachable from its start (:func:`enumerate_space`: breadth-first search with
the game's own rules, :mod:`environments.tasks.sokoban_rules`). A move that solves the level
leads to one absorbing state ``END`` (the episode is over). On that graph:

* **Distance to the goal** ``dist[s]`` (fewest moves that solve the level from ``s``): backward
  relaxation ``dist[s] = 1 + min_a dist[next(s, a)]``, ``dist[END] = 0``, vectorized over the
  states. The start's distance is the optimal solution length; :func:`optimal_plan` follows it
  (a scripted optimal agent).
* **Deadlock**: ``dist[s] = inf``, a state from which no sequence of moves solves the level
  (a box pushed into a corner or against a wall away from the targets, boxes blocking each
  other...). Pushes are irreversible, so these are exactly the bifurcation points of §4.6: a
  turn is **decisive** when its state is still solvable and some move leads to a deadlock
  (whether the policy then makes the mistake or avoids it).
* **Values** under a reference policy over the horizon H (``max_turns``), by backward induction
  over the enumerated states (:func:`finite_horizon_values`)::

      V_H(s) = 0,   V_t(END) = 0
      Q_t(s, a) = 1[next(s, a) = END] + V_{t+1}(next(s, a))
      V_t(s) = mean_{a in moves} Q_t(s, a)          (uniform reference policy)
             | max_{a in moves} Q_t(s, a)           (optimal: 1 iff dist[s] <= H - t)

  The return is the terminal reward (1 on solving within the horizon, else 0). The invalid
  action (text that is not a move) leaves the state unchanged and uses up the turn, so its
  ``Q_t(s, None) = V_{t+1}(s)``.

numpy only (environments/ never imports the orchestration layers).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from environments.tasks import sokoban_rules as rules

#: action columns of the tables: the four moves, then the invalid action
ACTION_COLUMNS: tuple[Optional[str], ...] = (*rules.ACTIONS, None)
REFERENCE_POLICIES = ("uniform", "optimal")


class StateSpaceTooLarge(ValueError):
    """The level's reachable state space exceeds the solver's bound."""


@dataclass
class StateSpace:
    """A level's reachable states (index ``i < S``; ``END = S`` is the absorbing solved state).

    ``next_state`` (S + 1, 5) int: next state of each action column (moves, then invalid);
    ``reward`` (S + 1, 5): 1.0 where the action solves the level; ``pushed`` (S + 1, 5) bool;
    ``dist`` (S + 1,) float: moves to the goal (``inf`` = deadlock, ``dist[END] = 0``)."""

    width: int
    height: int
    walls: frozenset
    targets: frozenset
    states: list
    index: dict
    next_state: np.ndarray
    reward: np.ndarray
    pushed: np.ndarray
    dist: np.ndarray

    @property
    def num_states(self) -> int:
        """S + 1 (the reachable states and END)."""
        return len(self.states) + 1

    @property
    def end(self) -> int:
        return len(self.states)

    @property
    def deadlocked(self) -> np.ndarray:
        """(S + 1,) bool: no sequence of moves solves the level from the state."""
        return np.isinf(self.dist)

    @property
    def decisive(self) -> np.ndarray:
        """(S + 1,) bool: solvable, and some move leads to a deadlock (an irreversible mistake)."""
        dead_next = self.deadlocked[self.next_state[:, : len(rules.ACTIONS)]].any(axis=1)
        return ~self.deadlocked & dead_next

    def optimal_length(self, state: int = 0) -> int:
        """Fewest moves that solve the level from ``state`` (-1: deadlocked)."""
        d = self.dist[state]
        return -1 if np.isinf(d) else int(d)


def enumerate_space(rows: list[str], max_states: int = 20000) -> StateSpace:
    """Breadth-first enumeration of the states reachable from the level's start (index 0);
    :class:`StateSpaceTooLarge` beyond ``max_states``."""
    width, height, walls, targets, start = rules.parse_level(rows)
    if rules.is_solved(targets, start):
        raise ValueError("the level is solved at its start")
    states, index = [start], {start: 0}
    succ: list[list[int]] = []
    solves: list[list[bool]] = []
    pushes: list[list[bool]] = []
    queue = deque([start])
    END = -1  # placeholder until S is known
    while queue:
        s = queue.popleft()
        row, sol, psh = [], [], []
        for a in rules.ACTIONS:
            nxt, pushed = rules.move(width, walls, s, a)
            psh.append(pushed)
            if rules.is_solved(targets, nxt):
                row.append(END)
                sol.append(True)
                continue
            sol.append(False)
            j = index.get(nxt)
            if j is None:
                if len(states) >= max_states:
                    raise StateSpaceTooLarge(f"more than {max_states} reachable states")
                j = index[nxt] = len(states)
                states.append(nxt)
                queue.append(nxt)
            row.append(j)
        succ.append(row)
        solves.append(sol)
        pushes.append(psh)
    S = len(states)
    nm = len(rules.ACTIONS)
    nxt_arr = np.empty((S + 1, nm + 1), dtype=np.int64)
    moves = np.asarray(succ, dtype=np.int64)
    nxt_arr[:S, :nm] = np.where(moves == END, S, moves)
    nxt_arr[:S, nm] = np.arange(S)  # the invalid action: nothing moves
    nxt_arr[S, :] = S  # END is absorbing
    reward = np.zeros((S + 1, nm + 1))
    reward[:S, :nm] = np.asarray(solves, dtype=float)
    pushed = np.zeros((S + 1, nm + 1), dtype=bool)
    pushed[:S, :nm] = np.asarray(pushes, dtype=bool)
    space = StateSpace(width, height, walls, targets, states, index, nxt_arr, reward, pushed,
                       np.zeros(S + 1))
    space.dist = distances(space.next_state[:, :nm], S)
    return space


def distances(next_moves: np.ndarray, end: int) -> np.ndarray:
    """Moves to the goal from every state (``inf`` where unreachable) by backward relaxation,
    ``dist[s] = 1 + min_a dist[next(s, a)]`` from ``dist[END] = 0`` until nothing changes."""
    dist = np.full(next_moves.shape[0], np.inf)
    dist[end] = 0.0
    while True:
        new = np.minimum(dist, 1.0 + dist[next_moves].min(axis=1))
        new[end] = 0.0
        if np.array_equal(new, dist):
            return dist
        dist = new


def optimal_plan(space: StateSpace, state: int = 0) -> list[str]:
    """A shortest solution from ``state`` (moves, ties broken in ``up, down, left, right``
    order); empty when the state is deadlocked or solved."""
    plan: list[str] = []
    s = state
    while s != space.end and not np.isinf(space.dist[s]):
        for k, a in enumerate(rules.ACTIONS):
            n = int(space.next_state[s, k])
            if space.dist[n] == space.dist[s] - 1:
                plan.append(a)
                s = n
                break
    return plan


def finite_horizon_values(space: StateSpace, horizon: int, policy: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """``V`` (H + 1, S + 1) and ``Q`` (H, S + 1, 5) of the reference ``policy`` (module docstring)."""
    if policy not in REFERENCE_POLICIES:
        raise ValueError(f"unknown reference policy {policy!r}; expected one of {', '.join(REFERENCE_POLICIES)}")
    n, nm = space.num_states, len(rules.ACTIONS)
    V = np.zeros((horizon + 1, n))
    Q = np.zeros((horizon, n, nm + 1))
    for t in reversed(range(horizon)):
        Q[t] = space.reward + V[t + 1][space.next_state]
        V[t] = Q[t, :, :nm].mean(axis=1) if policy == "uniform" else Q[t, :, :nm].max(axis=1)
        V[t, space.end] = 0.0
    return V, Q


@dataclass
class LevelTables:
    """A level's solved game: state space, reference values, and its TabularMDP tables."""

    space: StateSpace
    V: np.ndarray
    Q: np.ndarray
    reward_rows: list
    next_rows: list
    terminal: list


def level_tables(rows: list[str], horizon: int, policy: str, max_states: int) -> LevelTables:
    space = enumerate_space(rows, max_states=max_states)
    V, Q = finite_horizon_values(space, horizon, policy)
    return LevelTables(space, V, Q, space.reward.tolist(), space.next_state.tolist(), [0.0] * space.num_states)
