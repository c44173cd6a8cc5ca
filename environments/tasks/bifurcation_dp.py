"""Exact values of a bifurcation instance by backward induction (survey §9.3), in rational
arithmetic, so that routine advantages are exactly 0 (see :mod:`environments.tasks.bifurcation`)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

from environments.tasks.bifurcation_config import LETTERS

def _dynamics(cfg: Any) -> tuple[Fraction, Fraction, bool, bool]:
    return (
        Fraction(cfg.slip_prob),
        Fraction(cfg.decisive_reward),
        bool(cfg.terminate_on_error),
        cfg.reference_policy == "optimal",
    )


def _exact_tables(spec: dict[str, Any], cfg: Any) -> tuple[list[list[Fraction]], list[list[dict[Optional[str], Fraction]]]]:
    """Backward induction in exact rational arithmetic (so routine advantages are exactly 0)."""
    H = int(spec["horizon"])
    letters = list(LETTERS[: int(spec["num_actions"])])
    decisive = set(spec["decisive"])
    answers = spec["answers"]
    slip, r_dec, terminate, optimal = _dynamics(cfg)
    V: list[list[Fraction]] = [[Fraction(0), Fraction(0)] for _ in range(H + 1)]
    V[H] = [Fraction(0), Fraction(1)]  # terminal reward 1.0 iff on track
    Q: list[list[dict[Optional[str], Fraction]]] = [[{}, {}] for _ in range(H)]
    for t in reversed(range(H)):
        for on in (0, 1):
            q: dict[Optional[str], Fraction] = {}
            for a in letters + [None]:
                correct = t in decisive and a is not None and a == answers[t]
                error = a is None or (t in decisive and not correct)
                r = r_dec if correct else Fraction(0)
                if error:
                    cont = Fraction(0) if terminate else V[t + 1][0]
                elif correct:
                    cont = (1 - slip) * V[t + 1][on] + slip * V[t + 1][0]
                else:
                    cont = V[t + 1][on]
                q[a] = r + cont
            Q[t][on] = q
            vals = [q[a] for a in letters]
            V[t][on] = max(vals) if optimal else sum(vals, Fraction(0)) / len(vals)
    return V, Q


def exact_values(spec: dict[str, Any], cfg: Any) -> tuple[list[list[float]], list[list[dict[Optional[str], float]]]]:
    """Exact V and Q of an instance under ``cfg.reference_policy``, by backward induction.

    ``V[t][on]`` for t = 0..H (``V[H]`` = terminal reward), ``on`` in {0, 1};
    ``Q[t][on][a]`` for t = 0..H-1 and ``a`` each valid letter or ``None`` (an invalid action).
    Values are expected returns (turn rewards + terminal reward) from the state onwards.
    """
    V, Q = _exact_tables(spec, cfg)
    return (
        [[float(v) for v in row] for row in V],
        [[{a: float(x) for a, x in q.items()} for q in row] for row in Q],
    )
