"""The ground-truth credit a benchmark environment computes for an episode (survey §9.3).

Environments with a known MDP (the bifurcation tasks, math with exhaustive Monte Carlo) return
it from :meth:`environments.base.Environment.ground_truth`; :class:`stages.schema.Trajectory`
carries it to the credit stage and the benchmark metrics. It lives here, below the stages, so
that environments need nothing from ``stages`` but the config fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class GroundTruthCredit:
    """Exact credit of each turn on a benchmark task with a known MDP (survey §9.3).

    ``advantage[t] = Q(s_t, a_t) - V(s_t)`` under ``reference_policy``; ``value[t] = V(s_t)``.
    """

    value: list[float]
    q_value: list[float]
    advantage: list[float]
    decisive: list[bool]
    reference_policy: str = "uniform"
    #: the task's exact finite-horizon MDP, for credit under *other* policies (the oracle-credit
    #: method evaluates it under the current policy); None where the task does not export it
    mdp: Optional["TabularMDP"] = None
    #: per turn: a *mistake* the task can let a later action repair (bifurcation
    #: ``variant=recovery``: a wrong decisive letter taken on track); None where the task has none.
    #: Scored by ``credit.gt_repaired_mistake_credit`` on successful (repaired) episodes.
    mistake: Optional[list[bool]] = None
    #: standard error of each ``value`` (and of the value after the last turn, so ``len = turns + 1``)
    #: where the values are Monte Carlo estimates (math with ``env.ground_truth_mc``); None where exact
    value_se: Optional[list[float]] = None


@dataclass
class MCGroundTruth(GroundTruthCredit):
    """Ground truth estimated from rollouts (``value``/``q_value``/``advantage``/``value_se`` as in
    :class:`GroundTruthCredit`), with the advantages' standard errors and the estimate's cost (the textgame
    family; MiniGrid with ``env.ground_truth=mc``)."""

    advantage_stderr: list[float] = field(default_factory=list)
    rollouts: int = 0
    env_steps: int = 0


@dataclass
class TabularMDP:
    """A finite-horizon tabular MDP of one episode's task, in a family-independent form.

    Horizon H, S states, A actions (the last action may be the *invalid* action, label None).
    ``reward[t][s][a]`` is the expected immediate reward of action a in state s at turn t (the
    terminal reward is in ``terminal_value``), ``transition[t][s][a]`` the distribution over the
    next states (S probabilities), ``terminal_value[s]`` the value of state s after turn H-1.
    ``states[t]`` is the state the episode was actually in at each played turn (its realized
    stochastic transitions), ``action_texts[a]`` the canonical text of valid action a (what a
    policy emits to take it; used to score the policy's probability of each action).

    A *deterministic* MDP may give ``next_state[t][s][a]`` (the index of the next state) instead
    and leave ``transition`` empty: the dense table is H x S x A x S, too large for a game's
    thousands of states (Sokoban), while ``next_state`` is H x S x A. Rows repeated over turns
    may be the same list object (``[row] * H``): pickling then stores them once.
    """

    reward: list[list[list[float]]]
    transition: list[list[list[list[float]]]]
    terminal_value: list[float]
    states: list[int]
    actions: list[Optional[str]]
    action_texts: list[str]
    next_state: Optional[list[list[list[int]]]] = None

    @property
    def horizon(self) -> int:
        return len(self.reward)

    @property
    def num_states(self) -> int:
        return len(self.terminal_value)
