"""Dynamics and exact values of a bifurcation instance (survey §9.3; see
:mod:`environments.tasks.bifurcation` for the task, its variants and the text protocol).

One deterministic transition function, :meth:`Dynamics.step` ``(t, s, a, slipped) -> (s', r,
ended)``, defines every variant. The episode (:class:`~environments.tasks.bifurcation_env.BifurcationEnv`)
applies it with the slip its episode drew for the turn; the exact DP (:func:`exact_tables`,
rational arithmetic, so routine advantages are exactly 0) and the family-independent MDP
(:func:`tabular_mdp`, floats, for the oracle under any policy) take its expectation over the
slip (probability ``slip_prob``), so the three cannot disagree about the dynamics.

States: ``OFF`` (off track for good), ``ON`` (on track), ``END`` (the episode has ended before
turn H; absorbing, value 0) and, with ``variant=recovery``, ``REPAIR`` (a wrong decisive
action was just taken on track: the next turn can repair it).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

from environments.ground_truth import TabularMDP
from environments.tasks.bifurcation_config import STOP_ACTION, format_action, valid_actions

OFF, ON, END, REPAIR = 0, 1, 2, 3
#: how a state reads in state keys (``on=...``)
STATE_LABELS = {OFF: "0", ON: "1", END: "0", REPAIR: "r"}


class Dynamics:
    """The transition function of one instance under one config (all variants)."""

    def __init__(self, spec: dict[str, Any], cfg: Any):
        self.horizon = int(spec["horizon"])
        self.variant = str(getattr(cfg, "variant", "decisive"))
        self.letters: list[str] = list(valid_actions(int(spec["num_actions"]), self.variant))
        self.decisive = set(spec["decisive"])
        self.answers: list[Optional[str]] = list(spec["answers"])
        #: recovery: the action that repairs a mistake of the previous turn (the rule's action for the cue)
        self.repair: list[Optional[str]] = list(spec.get("repair") or [None] * self.horizon)
        #: varh: the turn at which S succeeds
        self.stop_turn: Optional[int] = spec.get("stop_turn")
        self.slip = Fraction(cfg.slip_prob)
        self.decisive_reward = Fraction(cfg.decisive_reward)
        self.continue_cost = Fraction(getattr(cfg, "continue_cost", 0.0))
        self.terminate = bool(cfg.terminate_on_error)
        self.states = [OFF, ON, END] + ([REPAIR] if self.variant == "recovery" else [])

    def is_bifurcation(self, t: int, s: int) -> bool:
        """Whether turn ``t`` in state ``s`` is a decisive point (the ground truth's ``decisive``
        flag): a decisive turn, the stop turn (varh), or a repair turn (recovery)."""
        return t in self.decisive or t == self.stop_turn or s == REPAIR

    def is_mistake(self, t: int, s: int, a: Optional[str]) -> bool:
        """A wrong valid letter at a decisive turn taken on track (repairable with ``variant=recovery``)."""
        return s == ON and t in self.decisive and a is not None and a != STOP_ACTION and a != self.answers[t]

    def step(self, t: int, s: int, a: Optional[str], slipped: bool) -> tuple[int, Fraction, bool]:
        """(next state, turn reward, ended before turn H) of action ``a`` (a valid letter or None)
        in state ``s`` at turn ``t``, given whether this turn's slip happened. An episode that
        ends (here or at turn H) succeeds iff its last state is ``ON``."""
        if a is None:  # invalid: off track on any turn
            return OFF, Fraction(0), self.terminate
        if a == STOP_ACTION:  # varh: stopping succeeds only on track at the stop turn
            return (ON if s == ON and t == self.stop_turn else OFF), Fraction(0), True
        correct = t in self.decisive and a == self.answers[t]
        r = (self.decisive_reward if correct else Fraction(0)) - (self.continue_cost if self.variant == "varh" else 0)
        if self.stop_turn is not None and t >= self.stop_turn:  # continued past the stop turn
            return OFF, r, False
        if s == REPAIR:
            if a != self.repair[t]:
                return OFF, r, self.terminate
            s = ON  # repaired; a decisive turn's rule still applies below
        if t in self.decisive and not correct:
            if s == ON and self.variant == "recovery" and t + 1 < self.horizon:
                return REPAIR, r, False
            return OFF, r, self.terminate
        if correct and slipped:
            return OFF, r, False
        return s, r, False

    def outcomes(self, t: int, s: int, a: Optional[str]) -> list[tuple[Fraction, int, Fraction, bool]]:
        """The distribution of :meth:`step` over the slip: ``[(probability, s', r, ended), ...]``."""
        out = []
        for slipped, p in ((False, 1 - self.slip), (True, self.slip)):
            if p:
                out.append((p, *self.step(t, s, a, slipped)))
        return out


def terminal_value(s: int) -> Fraction:
    """Terminal reward of an episode whose last state is ``s``: 1 on track, else 0."""
    return Fraction(1 if s == ON else 0)


def exact_tables(spec: dict[str, Any], cfg: Any) -> tuple[list[list[Fraction]], list[list[dict[Optional[str], Fraction]]]]:
    """Backward induction in exact rational arithmetic (so routine advantages are exactly 0).

    ``V[t][s]`` for t = 0..H and every state code s (``END``: 0), ``Q[t][s][a]`` for every valid
    letter and ``None``; under the uniform reference policy V averages over the valid letters
    (``S`` included with ``variant=varh``), under the optimal one it takes their max."""
    dyn = Dynamics(spec, cfg)
    H, S = dyn.horizon, max(dyn.states) + 1
    optimal = cfg.reference_policy == "optimal"
    V: list[list[Fraction]] = [[Fraction(0)] * S for _ in range(H + 1)]
    V[H] = [terminal_value(s) if s != END else Fraction(0) for s in range(S)]
    Q: list[list[dict[Optional[str], Fraction]]] = [[{} for _ in range(S)] for _ in range(H)]
    for t in reversed(range(H)):
        for s in dyn.states:
            if s == END:
                continue
            q: dict[Optional[str], Fraction] = {}
            for a in dyn.letters + [None]:
                q[a] = sum((p * (r + (terminal_value(s2) if ended else V[t + 1][s2]))
                            for p, s2, r, ended in dyn.outcomes(t, s, a)), Fraction(0))
            Q[t][s] = q
            vals = [q[a] for a in dyn.letters]
            V[t][s] = max(vals) if optimal else sum(vals, Fraction(0)) / len(vals)
    return V, Q


def exact_values(spec: dict[str, Any], cfg: Any) -> tuple[list[list[float]], list[list[dict[Optional[str], float]]]]:
    """Exact V and Q of an instance under ``cfg.reference_policy``, by backward induction.

    ``V[t][s]`` for t = 0..H (``V[H]`` = terminal reward) and s a state code (``OFF`` = 0,
    ``ON`` = 1, ``END`` = 2: 0, ``REPAIR`` = 3 with ``variant=recovery``); ``Q[t][s][a]`` for
    t = 0..H-1 and ``a`` each valid letter or ``None`` (an invalid action). Values are expected
    returns (turn rewards + terminal reward) from the state onwards.
    """
    V, Q = exact_tables(spec, cfg)
    return (
        [[float(v) for v in row] for row in V],
        [[{a: float(x) for a, x in q.items()} for q in row] for row in Q],
    )


def tabular_mdp(spec: dict[str, Any], cfg: Any, states: list[int]) -> TabularMDP:
    """The instance's MDP in the family-independent form of :class:`TabularMDP`: states are the
    state codes (``END`` absorbing; an early end's terminal reward is folded into the reward of the
    action that ends the episode), actions the valid letters then None = invalid; ``states`` are
    the realized states of the played turns. The same dynamics as :func:`exact_tables`."""
    dyn = Dynamics(spec, cfg)
    H, S = dyn.horizon, max(dyn.states) + 1
    actions: list[Optional[str]] = [*dyn.letters, None]
    reward: list[list[list[float]]] = []
    trans: list[list[list[list[float]]]] = []
    for t in range(H):
        r_t, p_t = [], []
        for s in range(S):
            r_s, p_s = [], []
            for a in actions:
                nxt = [0.0] * S
                if s == END:
                    r_s.append(0.0)
                    nxt[END] = 1.0
                    p_s.append(nxt)
                    continue
                r = Fraction(0)
                for p, s2, r2, ended in dyn.outcomes(t, s, a):
                    r += p * (r2 + (terminal_value(s2) if ended else 0))
                    nxt[END if ended else s2] += float(p)
                r_s.append(float(r))
                p_s.append(nxt)
            r_t.append(r_s)
            p_t.append(p_s)
        reward.append(r_t)
        trans.append(p_t)
    terminal = [float(terminal_value(s)) if s != END else 0.0 for s in range(S)]
    return TabularMDP(reward=reward, transition=trans, terminal_value=terminal, states=list(states),
                      actions=actions, action_texts=[format_action(a) for a in dyn.letters])
