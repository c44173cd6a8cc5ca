"""The credit stage's providers (flows/providers.py): what a method declares in ``needs`` arrives
on its context, computed by real components, with its overhead counted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flows.api import run_plain
from stages.credit.base import CreditConfig, CreditMethod
from stages.credit.registry import _METHODS, register_method
from stages.credit.methods.episode import GRPO, GRPOConfig

SEEN: dict = {}


@dataclass
class ProbeConfig(GRPOConfig):
    method: str = "test-provider-probe"  # test method: records what the providers gave it


class ProviderProbe(CreditMethod):
    """GRPO advantages; records the providers' outputs for the assertions below."""

    name = "test-provider-probe"
    Config = ProbeConfig
    granularity = "episode"
    methodology = "test"
    needs = frozenset({"mc_rollouts", "ref_logprobs", "scorer", "tokenizer"})

    def assign(self, tensors, batch, ctx):
        mask = tensors.response_mask.bool()
        SEEN["ref_vs_old"] = float((ctx.ref_logprobs - tensors.old_logprobs).abs()[mask].max())
        trajs = batch.trajectories
        scored = ctx.scorer([t.prompt_ids for t in trajs], [t.response_ids for t in trajs])
        SEEN["scorer_vs_old"] = max(
            float((lp - torch.tensor(t.logprobs))[torch.tensor(t.policy_mask)].abs().max()) for lp, t in zip(scored, trajs)
        )
        SEEN["decoded_prompt"] = ctx.tokenizer.decode(trajs[0].prompt_ids)
        t0 = trajs[0]
        last = t0.turns[-1]
        starts = [(0, 0), (0, t0.turns[0].action_span[0] + 1), (0, last.action_span[0]), (0, len(t0.response_ids))]
        returns, overhead = ctx.mc_rollouts(starts, 3)
        SEEN["returns"] = returns
        SEEN["overhead"] = overhead
        SEEN["turns"] = len(t0.turns)
        SEEN["max_return"] = max(t.reward + sum(u.reward for u in t.turns) for t in trajs)
        try:
            obs = t0.turns[0].obs_span
            ctx.mc_rollouts([(0, obs[0] + 1)], 1) if obs[1] - obs[0] > 1 else None
            SEEN["obs_error"] = None
        except ValueError as exc:
            SEEN["obs_error"] = str(exc)
        result = GRPO(GRPOConfig(method="grpo"))(tensors, batch, ctx)
        result.overhead = result.overhead + overhead
        return result


if ProviderProbe.name not in _METHODS:
    register_method(ProviderProbe)


def test_providers_give_real_reference_scorer_and_mc_continuations(shared_home):
    SEEN.clear()
    run_plain(["credit=test-provider-probe", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
               "eval_episodes=2", "env.horizon=3"], home=shared_home)
    # iteration 0 samples from the initial policy: reference and scorer reproduce the behaviour log-probs
    assert SEEN["ref_vs_old"] < 1e-4
    assert SEEN["scorer_vs_old"] < 1e-4
    assert SEEN["decoded_prompt"].strip()
    returns, overhead = SEEN["returns"], SEEN["overhead"]
    assert returns.shape == (4, 3)
    # past the last action the episode is over: nothing more is collected
    assert torch.equal(returns[3], torch.zeros(3))
    assert bool(((returns[:3] >= 0) & (returns[:3] <= SEEN["max_return"] + 1e-6)).all())
    # three live start points x k=3 continuations, each a fresh environment; the last-turn start's
    # three are restored from a snapshot of one more environment, replayed once to that turn
    late = SEEN["turns"] > 1
    assert overhead.env_resets == 9 + late
    assert overhead.env_restores == 3 * late
    assert overhead.env_replay_steps == SEEN["turns"] - 1
    assert overhead.env_steps >= 9 + SEEN["turns"] - 1  # new turns + the replayed turns
    assert overhead.extra_tokens > 0 and overhead.extra_forward_passes > 0
    if SEEN["obs_error"] is not None:
        assert "inside an observation" in SEEN["obs_error"]


def test_needs_must_be_known():
    import pytest

    class Bad(CreditMethod):
        name = "test-bad-needs"
        Config = CreditConfig
        granularity = "episode"
        methodology = "test"
        needs = frozenset({"telepathy"})

        def assign(self, tensors, batch, ctx):  # pragma: no cover - never registered
            raise AssertionError

    with pytest.raises(ValueError, match="unknown needs"):
        register_method(Bad)
