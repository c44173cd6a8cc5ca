"""ReMax (Li et al. 2023): advantage = return - return of a greedy rollout of the same task.

The method declares ``needs={"greedy_rollout"}``; the credit stage provides real greedy episodes."""

import pytest
import torch

from flows.api import run_plain
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Overhead, BatchTensors


def _tensors(rewards, mask):
    B, R = rewards.shape
    return BatchTensors(
        input_ids=torch.zeros(B, R + 1, dtype=torch.long), attention_mask=torch.ones(B, R + 1, dtype=torch.long),
        position_ids=torch.arange(R + 1).expand(B, -1), prompt_len=1, response_ids=torch.zeros(B, R, dtype=torch.long),
        response_mask=mask, old_logprobs=torch.zeros(B, R), entropies=torch.zeros(B, R), token_level_rewards=rewards,
        episode_rewards=rewards.sum(-1), index=torch.arange(B), turn_ids=torch.zeros(B, R, dtype=torch.long),
        num_turns=torch.ones(B, dtype=torch.long))


def test_advantage_is_return_minus_greedy_return():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards = torch.zeros(3, 4)
    rewards[0, 3], rewards[1, 1], rewards[2, 0] = 1.0, 0.0, 1.0
    rewards[0, 1] = 0.25  # a turn reward: the return-to-go differs before and after it
    greedy = torch.tensor([1.0, 1.0, 0.0])
    cost = Overhead(extra_tokens=7, env_resets=2)
    method = build_method(get_method_class("remax").Config())
    res = method(_tensors(rewards, mask), None, CreditContext(greedy_rollout=lambda batch: (greedy, cost)))
    expected = torch.tensor([[0.25, 0.25, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(res.advantages, expected)
    assert torch.allclose(res.credit, torch.tensor([0.25, -1.0, 1.0]))
    assert res.overhead.extra_tokens == 7 and res.overhead.env_resets == 2


def test_remax_without_greedy_rollouts_is_a_clear_error():
    method = build_method(get_method_class("remax").Config())
    with pytest.raises(ValueError, match=r"needs \['greedy_rollout'\]"):
        method(_tensors(torch.zeros(1, 2), torch.ones(1, 2)), None, CreditContext())


def test_remax_runs_through_the_stages_with_real_greedy_episodes(shared_home):
    seen = {}

    def grab(it, rew, credit, upd):
        seen["overhead"] = credit.overhead
        seen["groups"] = len({t.group_id for t in rew.value.trajectories})
        seen["adv"] = credit.value.advantages

    run_plain(["credit=remax", "iterations=1", "rollout.tasks_per_iteration=4", "rollout.group_size=4",
               "eval_episodes=8"], home=shared_home, on_iteration=grab)
    o = seen["overhead"]
    assert o.env_resets == seen["groups"] == 4  # one greedy episode per task instance
    assert o.extra_tokens > 0 and o.extra_forward_passes > 0 and o.env_steps >= 4
    assert torch.isfinite(seen["adv"]).all()
