"""The ground-truth credit a benchmark environment computes for an episode (survey §9.3).

Environments with a known MDP (the bifurcation tasks, math with exhaustive Monte Carlo) return
it from :meth:`environments.base.Environment.ground_truth`; :class:`stages.schema.Trajectory`
carries it to the credit stage and the benchmark metrics. It lives here, below the stages, so
that environments need nothing from ``stages`` but the config fields.
"""

from __future__ import annotations

from dataclasses import dataclass


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
