"""Compute budgets of a training run and the stopping rule that enforces them (survey §9.2, §9.5).

The survey's benchmark protocol compares credit methods *at the same compute*, so a benchmark cell
stops when its budget is spent, not after a fixed number of iterations. What an iteration spends
is read from what the stages already record (their statistics and :class:`stages.schema.Overhead`,
flattened by the flow into one metrics dict per iteration):

* ``generated_tokens`` — every token sampled in the iteration: the rollout's
  (``rollout.generated_tokens``) plus those the credit method generated itself
  (``overhead.credit.extra_tokens``: MC continuations, greedy episodes, judge completions);
* ``forward_tokens`` — tokens through forward passes: the rollout batch (prompt + response of
  every trajectory), the update (the batch once per update epoch), the reward stage's model calls
  and the credit method's own passes, ``ca_forward_tokens`` = ``overhead.credit.forward_tokens``:
  counted per sequence where the passes run (:class:`stages.schema.Overhead`): each scored or
  prefilled sequence's own tokens (scorer, critic, reference policy, PRM, judge prompts) plus each
  generated token (continuations, greedy episodes, judge completions), so a batched call over rows
  of different lengths costs the sum of the rows' lengths. A method outside this package that
  counts extra passes but no tokens is charged one mean-length sequence per pass (a lower bound);
* ``env_steps`` / ``env_resets`` — of the rollout and of the credit method's continuations;
* ``judge_calls``, ``wall_seconds`` / ``cpu_seconds`` (the five stages), ``ca_seconds`` (credit stage).

What is charged: the training iterations only. ``prepare`` (building / warming up the base
policy, shared through the model cache, so only the first run of a home pays it) and the
evaluation episodes (the same eval split, before and after training, for every method) are
**measured and reported apart** (:func:`stage_spend`: ``run.json`` ``budget.uncharged``, a
benchmark cell's ``uncharged``), never charged: a budget buys training, and a cell stops when its
training has spent it (:data:`CHARGED`, written into every summary). The oracle's credit stage
(scoring the policy at every state of the task's MDP: ground truth, the benchmark's upper bound) is
measured and reported apart too (:func:`credit_spend`, ``budget.uncharged["ground_truth"]``), so the
oracle gets the iterations every method gets at the same budget.

The rule (:func:`exhausted`): after each iteration the cumulative spend is compared with every
budget that is set; the run stops at the end of the first iteration in which one is reached, so it
never overspends by more than one iteration. ``iterations`` stays the safety cap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from stages.config_fields import param

#: the budgets a run can be given (each a field of :class:`BudgetConfig` and of :class:`Spend`)
BUDGET_KEYS = ("generated_tokens", "forward_tokens", "env_steps", "wall_seconds")


@dataclass
class BudgetConfig:
    """Keys allowed under ``budget.``: compute budgets (any subset; null = unlimited). Not part of
    the config hash: like ``iterations`` a budget says how long to train, not what is computed."""

    generated_tokens: Optional[int] = param(None, help="stop once this many tokens were sampled (rollout + the credit method's own generations)", ge=1)
    forward_tokens: Optional[int] = param(None, help="stop once this many tokens went through forward passes (rollout, update epochs, the credit method's passes and judge calls)", ge=1)
    env_steps: Optional[int] = param(None, help="stop once the environments took this many steps (rollout + the credit method's continuations)", ge=1)
    wall_seconds: Optional[float] = param(None, help="stop once the five stages took this many wall seconds (prepare and evaluations not charged)", gt=0)

    def limits(self) -> dict[str, float]:
        """The budgets that are set."""
        return {k: getattr(self, k) for k in BUDGET_KEYS if getattr(self, k) is not None}


@dataclass
class Spend:
    """Compute spent (by one iteration, or cumulated over a run)."""

    generated_tokens: int = 0
    forward_tokens: int = 0
    ca_forward_tokens: int = 0
    env_steps: int = 0
    env_resets: int = 0
    judge_calls: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    ca_seconds: float = 0.0
    iterations: int = 0

    def __add__(self, other: "Spend") -> "Spend":
        return Spend(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: "Spend") -> "Spend":
        return Spend(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


STAGES = ("env", "rollout", "reward", "credit", "update")
#: what a budget is charged with (run.json ``budget.charged``, a benchmark summary's ``budget.charged``)
CHARGED = ("training iterations (env, rollout, reward, credit, update stages); prepare (policy warm-up), "
           "evaluation episodes and the oracle's ground-truth passes are measured and reported apart (uncharged), "
           "never charged")


def stage_spend(stats: Mapping[str, float], overhead: Mapping[str, float], wall_seconds: float,
                cpu_seconds: float) -> Spend:
    """What an uncharged stage (prepare, an evaluation) spent, from its statistics
    (``generated_tokens``, ``forward_tokens`` where it has them), its overhead counters and its times."""
    return Spend(generated_tokens=int(stats.get("generated_tokens", 0) or 0),
                 forward_tokens=int(stats.get("forward_tokens", 0) or 0),
                 env_steps=int(overhead.get("env_steps", 0) or 0), env_resets=int(overhead.get("env_resets", 0) or 0),
                 judge_calls=int(overhead.get("judge_calls", 0) or 0),
                 wall_seconds=float(wall_seconds), cpu_seconds=float(cpu_seconds))


def _ca_tokens(m, batch_tokens: int, rows: int) -> tuple[int, int]:
    """(generated, forward) tokens of the credit method's own passes in one iteration."""
    ca_generated = int(m("overhead.credit.extra_tokens"))
    ca_forward = int(m("overhead.credit.forward_tokens"))
    if not ca_forward and m("overhead.credit.extra_forward_passes"):  # passes counted, tokens not: lower bound
        mean_len = batch_tokens / rows if rows else 0.0
        ca_forward = ca_generated + int(round(m("overhead.credit.extra_forward_passes") * mean_len))
    return ca_generated, ca_forward


def _getter(metrics: Mapping[str, float]):
    return lambda key: float(metrics.get(key, 0.0) or 0.0)


def iteration_spend(metrics: Mapping[str, float], batch_tokens: int, rows: int, update_epochs: int) -> Spend:
    """What one iteration spent, from its flattened metrics (:func:`flows.reporting.iteration_metrics`:
    ``rollout.generated_tokens``, ``overhead.<stage>.<counter>``, ``time.<stage>_seconds``), the
    number of tokens (prompt + response) of its ``rows`` trajectories and the update's epochs."""
    m = _getter(metrics)
    ca_generated, ca_forward = _ca_tokens(m, batch_tokens, rows)
    return Spend(
        generated_tokens=int(m("rollout.generated_tokens")) + ca_generated,
        forward_tokens=int(batch_tokens) * (1 + int(update_epochs)) + int(m("overhead.reward.forward_tokens")) + ca_forward,
        ca_forward_tokens=ca_forward,
        env_steps=int(sum(m(f"overhead.{s}.env_steps") for s in STAGES)),
        env_resets=int(sum(m(f"overhead.{s}.env_resets") for s in STAGES)),
        judge_calls=int(sum(m(f"overhead.{s}.judge_calls") for s in STAGES)),
        wall_seconds=sum(m(f"time.{s}_seconds") for s in STAGES),
        cpu_seconds=sum(m(f"time.{s}_cpu_seconds") for s in STAGES),
        ca_seconds=m("time.credit_seconds"),
        iterations=1,
    )


def credit_spend(metrics: Mapping[str, float], batch_tokens: int, rows: int) -> Spend:
    """The credit stage's own share of :func:`iteration_spend`: its generated and forward tokens, env
    steps/resets and judge calls, and its wall/CPU seconds. A method whose passes compute privileged
    ground truth rather than credit a real method could compute (``CreditMethod.charged = False``: the
    oracle, the benchmark's upper bound) has this share measured and reported apart
    (``budget.uncharged["ground_truth"]``), not charged, so that it gets the iterations every method gets."""
    m = _getter(metrics)
    ca_generated, ca_forward = _ca_tokens(m, batch_tokens, rows)
    return Spend(generated_tokens=ca_generated, forward_tokens=ca_forward, ca_forward_tokens=ca_forward,
                 env_steps=int(m("overhead.credit.env_steps")), env_resets=int(m("overhead.credit.env_resets")),
                 judge_calls=int(m("overhead.credit.judge_calls")), wall_seconds=m("time.credit_seconds"),
                 cpu_seconds=m("time.credit_cpu_seconds"), ca_seconds=m("time.credit_seconds"))


def exhausted(spent: Spend, budget: BudgetConfig) -> Optional[str]:
    """Why the run stops now (the first budget reached, e.g. ``"env_steps 130 >= 120"``), or None."""
    for key, limit in budget.limits().items():
        value = getattr(spent, key)
        if value >= limit:
            shown = f"{value:.1f}" if isinstance(value, float) else str(value)
            return f"budget.{key} spent: {shown} >= {limit:g}"
    return None
