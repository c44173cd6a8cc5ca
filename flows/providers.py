"""What the credit stage hands a method, by its declared ``needs`` (survey §8, stage 4): the table.

:func:`build_context` fills a :class:`~stages.credit.base.CreditContext` for the run's method and
nothing more: a method that declares no needs costs no extra compute. Each need has one entry in
:data:`PROVIDERS` (the context field it fills, how it is built from the run's live objects, what
building it costs); :data:`IMPLIES` lists the couplings — a need that brings another with it.
The work itself is stage code: continuations and greedy episodes in
:mod:`stages.rollout.continuations`, the scorer and reference log-probs in
:mod:`stages.rollout.scorer`, process rewards in :mod:`stages.reward.process`, judges in
:mod:`stages.reward.judge`. Every provider counts what it spends (extra forward passes, generated
tokens, environment resets and steps, judge calls) so the credit stage reports the method's
overhead (Appendix C, "CA-specific overhead").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from environments.construct import EnvBatch
from stages.credit.base import CreditContext
from stages.reward.process import process_rewards_for
from stages.rollout.continuations import GreedyRollout, MCContinuations
from stages.rollout.scorer import HFScorer, response_hidden_states, response_logprobs
from stages.schema import Batch, Overhead

if TYPE_CHECKING:
    from flows.runtime import RunState


@dataclass(frozen=True)
class CreditInputs:
    """What the credit stage has in hand when it builds a context: the run's live objects, the
    iteration's environment batch and rewarded batch, and the padding id."""

    run: "RunState"
    envb: EnvBatch
    batch: Batch
    iteration: int
    pad: int

    def seed_for(self, name: str) -> int:
        """The seed of one named draw of this iteration (greedy episodes, MC continuation calls)."""
        return self.run.seed_for(self.iteration, name)


@dataclass(frozen=True)
class Provider:
    """One need: the :class:`CreditContext` field it fills, its builder, its fixed cost."""

    field: str
    build: Callable[[CreditInputs, CreditContext], Any]
    forward_passes: int = 0  # spent building it (the reference forward); the rest is counted by the value
    #: that fixed cost is one forward over the batch's trajectories (its tokens count as forward_tokens)
    over_batch: bool = False


def _temperature(x: CreditInputs) -> float:
    return float(x.run.obj.rollout.temperature)


#: need -> provider, in build order (a provider may read the fields built before it)
PROVIDERS: dict[str, Provider] = {
    # the update stage's value model
    "critic": Provider("critic", lambda x, ctx: x.run.trainer.critic),
    # the policy's tokenizer
    "tokenizer": Provider("tokenizer", lambda x, ctx: x.run.tokenizer),
    # one argmax episode per task instance (ReMax)
    "greedy_rollout": Provider("greedy_rollout", lambda x, ctx: GreedyRollout(x.run.player, x.envb, x.seed_for)),
    # response log-probs under the frozen initial policy (the KL reference), at the rollout temperature
    "ref_logprobs": Provider("ref_logprobs", lambda x, ctx: response_logprobs(
        x.run.reference_policy(), x.batch, x.pad, _temperature(x)), forward_passes=1, over_batch=True),
    # last-layer hidden states of the behaviour policy at every response position (SPA-RL's features)
    "hidden_states": Provider("hidden_states", lambda x, ctx: response_hidden_states(x.run.policy, x.batch, x.pad),
                              forward_passes=1, over_batch=True),
    # current-policy log-probs of given tokens after given contexts (one forward per call)
    "scorer": Provider("scorer", lambda x, ctx: HFScorer(
        x.run.policy, x.pad, batch_size=None, max_tokens=None, temperature=_temperature(x))),
    # Monte Carlo continuations / interventions from inside the batch's episodes (VinePPO, SPO, InT)
    "mc_rollouts": Provider("mc_rollouts", lambda x, ctx: MCContinuations(x.run.player, x.envb, x.batch, x.seed_for)),
    # the method's process-reward source (step checks, MC estimates through ctx.mc_rollouts, a PRM)
    "process_rewards": Provider("process_rewards", lambda x, ctx: process_rewards_for(
        x.run.method.cfg, mc_rollouts=ctx.mc_rollouts, tokenizer=x.run.tokenizer)),
    # the LLM judge the method's config names (loaded once per process)
    "judge": Provider("judge", lambda x, ctx: x.run.judge()),
    # the task family's declared planning text (TaskFamily.planning_pattern; HICRA)
    "planning_pattern": Provider("planning_pattern", lambda x, ctx: x.run.family.planning_pattern or ""),
    # the behaviour policy's sampling temperature (iStar scores the batch with its implicit PRM at it)
    "rollout_temperature": Provider("rollout_temperature", lambda x, ctx: _temperature(x)),
    # the task family's declared default action text (TaskFamily.default_action; C3/CCPO counterfactual=default)
    "default_action": Provider("default_action", lambda x, ctx: x.run.family.default_action),
}

#: couplings: providing the key also provides these (process rewards may be MC estimates; the
#: scorer's and the judge's users build prompts with the policy's tokenizer)
IMPLIES: dict[str, tuple[str, ...]] = {
    "process_rewards": ("mc_rollouts",),
    "scorer": ("tokenizer",),
    "judge": ("tokenizer",),
}


def provided(needs: frozenset[str] | set[str]) -> list[str]:
    """The needs to provide for ``needs`` (couplings included), in build order."""
    want = set(needs)
    for need in needs:
        want.update(IMPLIES.get(need, ()))
    return [n for n in PROVIDERS if n in want]


def build_context(run: "RunState", envb: EnvBatch, batch: Batch, iteration: int, checkpoint: str,
                  pad: int) -> tuple[CreditContext, Overhead]:
    """The context for the run's method: only what it declared in ``needs`` (and their couplings).
    Returns the context and the overhead spent building it (reference forward pass)."""
    needs = run.method.needs
    ctx = CreditContext(generator=torch.Generator().manual_seed(run.seed_for(iteration, "credit")))
    overhead = Overhead()
    if needs:
        run.ensure_policy(checkpoint)
    inputs = CreditInputs(run=run, envb=envb, batch=batch, iteration=iteration, pad=pad)
    for need in provided(needs):
        p = PROVIDERS[need]
        setattr(ctx, p.field, p.build(inputs, ctx))
        overhead.extra_forward_passes += p.forward_passes
        if p.over_batch:
            overhead.forward_tokens += batch.token_count()
    return ctx, overhead
