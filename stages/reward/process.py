"""Process reward sources: one score per reasoning step (survey §3.3.1, "Process Reward Models").

Step-level credit methods (PURE, PRL, ...) consume *process rewards*: a number per reasoning step
of each trajectory. In creditflow's multi-turn protocol **step k is turn k** — the reasoning task
families emit one reasoning step per policy turn (the math family: ``"3+4=7"``, then
``"answer 14"``) — so the rewards are a ``(B, K)`` float tensor, ``K`` the batch's most turns,
``nan`` where trajectory ``b`` has no step ``k``. Token ``j`` of trajectory ``b`` belongs to step
``BatchTensors.turn_ids[b, j]``.

Each source declares its kind (:data:`SOURCE_KINDS`, ``prefix_scores``): ``mc`` and ``prm``
score the *prefix* ending with step k; ``step_check`` is a per-step correctness bit. Methods that
take differences of consecutive prefix scores (RED) refuse a non-prefix source.

Three sources, selected by a method's config field ``process_reward`` (the fields of
:class:`ProcessRewardConfig`, which step-level methods embed in their ``Config``):

* ``step_check`` — the task family's *procedural* check of each step, read from
  ``Trajectory.turns[k].info["step_correct"]`` (1.0 correct, 0.0 wrong). Exact and free, but only
  families that can check a step report it (math). A final turn without the flag (an answer turn)
  takes the episode's success.
* ``mc`` — Math-Shepherd-style Monte Carlo estimation (Wang et al. 2024; OmegaPRM, Luo et al.
  2024, refines where to sample): the value of step ``k`` is the mean return of ``mc_k``
  continuations sampled by the current policy from the *end* of step ``k`` (Math-Shepherd's
  "soft estimation": with a 0/1 outcome, the fraction of continuations that reach the correct
  answer). A continuation starts at the next turn's action start (the :class:`~stages.credit.base.MCRollouts`
  contract: a start lies on a policy action); the last step's value is the episode's own outcome
  (its terminal reward), which needs no sampling.
* ``prm`` — a process reward model trained here (:mod:`stages.reward.prm`): the probability
  that step ``k`` is correct given the prompt and steps ``0..k``; one PRM forward pass per
  trajectory scores all its steps (causal attention: the score of step ``k`` reads the prefix
  only).

:func:`make_process_rewards` builds the :class:`~stages.credit.base.ProcessRewards` callable
``batch -> ((B, K) rewards, Overhead)`` that the credit stage hands to the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from stages.schema import Batch, Overhead
from stages.config_fields import param

#: the process-reward sources :func:`make_process_rewards` knows
SOURCES = ("step_check", "mc", "prm")

#: the declared kind of each source: ``(prefix_scores, what its value at step k is)``. A *prefix
#: score* is a score of the whole prefix ending with step k (what RED-style redistribution takes
#: differences of, Li et al. 2024); a per-step correctness bit is not: after an error, a correct
#: step scores 1 again, so the difference of consecutive bits credits it with a recovery the
#: trajectory never made.
SOURCE_KINDS: dict[str, tuple[bool, str]] = {
    "step_check": (False, "a per-step correctness bit of step k alone (the family's procedural check), not a score "
                          "of the prefix: after an error a correct step scores 1 again"),
    "mc": (True, "the Monte Carlo value of the prefix through step k (mean return of policy continuations from "
                 "its end; the last step: the episode's outcome)"),
    "prm": (True, "the PRM's score of the prefix through step k (one causal pass reads the prefix only)"),
}


def prefix_scores(source: str) -> bool:
    """Whether ``source``'s values are scores of prefixes (:data:`SOURCE_KINDS`)."""
    if source not in SOURCE_KINDS:
        raise ValueError(f"config key 'credit.process_reward' must be one of {', '.join(SOURCES)}, got {source!r}")
    return SOURCE_KINDS[source][0]


def require_prefix_scores(source: str, method: str) -> None:
    """Refuse a non-prefix source for a method that takes differences of prefix scores, with the reason."""
    if not prefix_scores(source):
        ok = [s for s in SOURCES if SOURCE_KINDS[s][0]]
        raise ValueError(
            f"credit.process_reward={source} cannot be used with credit={method}: {method} takes differences of "
            f"scores of consecutive prefixes, and {source} is {SOURCE_KINDS[source][1]}; use one of "
            f"{', '.join(f'credit.process_reward={s}' for s in ok)}"
        )


@dataclass
class ProcessRewardConfig:
    """Config fields of the process-reward source; step-level methods inherit them in their Config."""

    process_reward: str = param("step_check", help="source of per-step rewards: step_check (family's procedural check) | mc (Math-Shepherd MC, Wang et al. 2024) | prm (PRM trained by `creditflow prm train`)", choices=SOURCES)
    mc_k: int = param(4, help="process_reward=mc: continuations sampled from the end of each step (Math-Shepherd uses N=8)", ge=1)
    prm_path: str = param("", help="process_reward=prm: directory of a PRM saved by `creditflow prm train` (stages/reward/prm.py)")


def num_steps(batch: Batch) -> int:
    """K: the most steps (turns) of any trajectory of the batch, at least 1."""
    return max([len(t.turns) for t in batch.trajectories] + [1])


def _nan_matrix(batch: Batch) -> torch.Tensor:
    return torch.full((len(batch.trajectories), num_steps(batch)), float("nan"))


# --------------------------------------------------------------------------------------------
# step_check
# --------------------------------------------------------------------------------------------


class StepCheckRewards:
    """Process rewards from the task family's procedural step checks (``turns[k].info["step_correct"]``)."""

    source = "step_check"
    prefix_scores = SOURCE_KINDS["step_check"][0]  # declared kind (SOURCE_KINDS)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Overhead]:
        out = _nan_matrix(batch)
        found = False
        for i, traj in enumerate(batch.trajectories):
            n = len(traj.turns)
            for k, turn in enumerate(traj.turns):
                flag = turn.info.get("step_correct") if isinstance(turn.info, dict) else None
                if flag is None:
                    if k == n - 1:  # the answer turn: the episode's outcome checks it
                        out[i, k] = 1.0 if traj.success else 0.0
                        continue
                    raise ValueError(
                        f"process_reward=step_check: trajectory {traj.uid} turns[{k}].info has no 'step_correct' "
                        f"(env {traj.env_name!r}); this task family does not check its steps procedurally; "
                        f"use credit.process_reward=mc or credit.process_reward=prm"
                    )
                if isinstance(flag, bool):
                    value = 1.0 if flag else 0.0
                elif isinstance(flag, (int, float)) and math.isfinite(float(flag)):
                    value = float(flag)
                else:
                    raise ValueError(
                        f"process_reward=step_check: trajectory {traj.uid} turns[{k}].info['step_correct'] must be "
                        f"True/False or a finite number, got {flag!r} (env {traj.env_name!r})"
                    )
                out[i, k] = value
                found = True
        if not found and batch.trajectories:
            envs = sorted({t.env_name for t in batch.trajectories})
            raise ValueError(
                f"process_reward=step_check: no turn of the batch carries info['step_correct'] (env {', '.join(map(repr, envs))}); "
                f"this task family does not check its steps procedurally; use credit.process_reward=mc or prm"
            )
        return out, Overhead()


# --------------------------------------------------------------------------------------------
# mc (Math-Shepherd)
# --------------------------------------------------------------------------------------------


class MCProcessRewards:
    """Math-Shepherd soft MC estimate of each step's value (Wang et al. 2024; survey §3.3.1 background).

    ``value[b, k] = mean_j G_j`` over ``k_mc`` continuations from the end of step ``k`` (the next
    turn's action start), ``G_j`` each continuation's return-to-go; the last step gets the
    trajectory's terminal reward. Overhead: what the MC provider reports."""

    source = "mc"
    prefix_scores = SOURCE_KINDS["mc"][0]  # declared kind (SOURCE_KINDS)

    def __init__(self, mc_rollouts: Any, k: int):
        if mc_rollouts is None:
            raise ValueError("process_reward=mc needs Monte Carlo rollouts (ctx.mc_rollouts), none were provided")
        if int(k) < 1:
            raise ValueError(f"config key 'credit.mc_k' must be >= 1, got {k}")
        self.mc_rollouts, self.k = mc_rollouts, int(k)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Overhead]:
        out = _nan_matrix(batch)
        starts: list[tuple[int, int]] = []
        cells: list[tuple[int, int]] = []
        for i, traj in enumerate(batch.trajectories):
            n = len(traj.turns)
            if n:
                out[i, n - 1] = float(traj.reward)
            for k in range(n - 1):
                starts.append((i, int(traj.turns[k + 1].action_span[0])))
                cells.append((i, k))
        overhead = Overhead()
        if starts:
            returns, overhead = self.mc_rollouts(starts, self.k)
            returns = torch.as_tensor(returns, dtype=torch.float32)
            if returns.dim() != 2 or returns.shape[0] != len(starts):
                raise ValueError(
                    f"process_reward=mc: mc_rollouts returned shape {tuple(returns.shape)}, expected ({len(starts)}, {self.k})"
                )
            rows = torch.tensor([c[0] for c in cells])
            cols = torch.tensor([c[1] for c in cells])
            out[rows, cols] = returns.mean(dim=-1)
        return out, overhead


# --------------------------------------------------------------------------------------------
# prm
# --------------------------------------------------------------------------------------------


class PRMProcessRewards:
    """Process rewards from a PRM trained here: ``P(step k correct | prompt, steps 0..k)``."""

    source = "prm"
    prefix_scores = SOURCE_KINDS["prm"][0]  # declared kind (SOURCE_KINDS)

    def __init__(self, prm: Any):
        if prm is None:
            raise ValueError("process_reward=prm needs a trained PRM (credit.prm_path), none was loaded")
        self.prm = prm

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Overhead]:
        out = _nan_matrix(batch)
        examples = [(t.prompt_text, [turn.action_text for turn in t.turns]) for t in batch.trajectories]
        tokens0 = int(getattr(self.prm, "forward_tokens", 0))
        scores = self.prm.score(examples)
        for i, s in enumerate(scores):
            if len(s):
                out[i, : len(s)] = s.float()
        return out, Overhead(extra_forward_passes=len(batch.trajectories),
                             forward_tokens=int(getattr(self.prm, "forward_tokens", 0)) - tokens0)


def make_process_rewards(
    source: str,
    *,
    mc_rollouts: Any = None,
    prm: Any = None,
    tokenizer: Optional[Any] = None,
    mc_k: int = 4,
):
    """The :class:`~stages.credit.base.ProcessRewards` source named ``source`` (:data:`SOURCES`).

    ``mc_rollouts`` is required for ``mc``, a loaded PRM (:func:`stages.reward.prm.load_prm`) for
    ``prm``; ``tokenizer`` is accepted for sources that re-tokenize (the PRM brings its own)."""
    if source == "step_check":
        return StepCheckRewards()
    if source == "mc":
        return MCProcessRewards(mc_rollouts, mc_k)
    if source == "prm":
        return PRMProcessRewards(prm)
    raise ValueError(f"config key 'credit.process_reward' must be one of {', '.join(SOURCES)}, got {source!r}")


def process_rewards_for(cfg: Any, *, mc_rollouts: Any = None, tokenizer: Optional[Any] = None):
    """The process-reward source a method's config names (``process_reward``; ``prm_path`` for a
    PRM trained here, loaded from disk; ``mc_k`` continuations per step for ``mc``)."""
    prm = None
    if cfg.process_reward == "prm":
        from stages.reward.prm import load_prm

        if not cfg.prm_path:
            raise ValueError("credit.process_reward=prm needs credit.prm_path (train one with `creditflow prm train`)")
        prm = load_prm(cfg.prm_path)
    return make_process_rewards(cfg.process_reward, mc_rollouts=mc_rollouts, prm=prm, tokenizer=tokenizer,
                                mc_k=cfg.mc_k)
