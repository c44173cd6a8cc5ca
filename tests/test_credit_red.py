"""RED (Li et al. 2024; survey §3.1.2): a holistic reward redistributed by incremental prefix
scores (per-step process rewards), summing exactly to the holistic reward."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods.redistribution as red  # noqa: F401  (registers red)
from stages.credit import functional as F
from stages.credit.base import CreditContext, build_method, get_method_class
from stages.schema import Batch, Overhead, Trajectory, Turn


def make_traj(n_steps, reward, uid, group=0, turn_rewards=None) -> Trajectory:
    ids, pm, turns = [], [], []
    for k in range(n_steps):
        s = len(ids)
        ids += [20 + k, 5, 3]
        pm += [True, True, False]
        r = turn_rewards[k] if turn_rewards else 0.0
        turns.append(Turn(index=k, action_span=(s, s + 2), obs_span=(s + 2, s + 3), action_text="", observation="o", reward=r))
    return Trajectory(uid=uid, group_id=group, task_id="t", env_name="toy", prompt_ids=[1], response_ids=ids,
                      policy_mask=pm, logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids), turns=turns, reward=reward)


class FixedPRM:
    def __init__(self, scores):
        self.scores = torch.tensor(scores, dtype=torch.float64)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return self.scores, Overhead(extra_forward_passes=len(batch))


def _run(batch, scores, **cfg):
    prm = FixedPRM(scores)
    res = build_method(get_method_class("red").Config(**cfg))(batch.to_tensors(), batch, CreditContext(process_rewards=prm))
    return res, prm


NAN = float("nan")


@pytest.mark.parametrize("rescale", ["shift", "scale"])
@pytest.mark.parametrize("empty", ["group_mean", "first_step", "zero"])
def test_redistributed_rewards_sum_to_the_holistic_reward(rescale, empty):
    batch = Batch([make_traj(3, 1.0, "a"), make_traj(4, 0.0, "b"), make_traj(2, 1.0, "c", turn_rewards=[0.5, -0.25]),
                   make_traj(4, 1.0, "d", group=1)])
    scores = [[0.2, 0.7, 0.9, NAN], [0.5, 0.1, 0.3, 0.0], [NAN, 0.4, NAN, 0.8], [0.6, 0.6, 0.2, 0.9]]
    res, prm = _run(batch, scores, rescale=rescale, empty_score=empty)
    t = batch.to_tensors()
    holistic = (t.token_level_rewards * t.response_mask).sum(-1)
    assert torch.allclose(torch.nansum(res.credit, -1).double(), holistic.double(), atol=1e-6)
    assert res.granularity == "step" and prm.calls == 1 and res.overhead.extra_forward_passes == 4
    assert torch.all(res.advantages[t.response_mask == 0] == 0)


def test_equal_scores_give_a_uniform_redistribution_and_grpo_advantages():
    batch = Batch([make_traj(4, 1.0, "a"), make_traj(4, 0.0, "b")])
    res, _ = _run(batch, [[0.5] * 4, [0.3] * 4], empty_score="first_step")
    assert torch.allclose(res.credit.double(), torch.tensor([[0.25] * 4, [0.0] * 4], dtype=torch.float64))
    t = batch.to_tensors()
    assert torch.allclose(res.advantages, F.grpo(t.token_level_rewards, t.response_mask, t.index)[0].to(res.advantages.dtype))
    # group_mean: equal scores at the group's mean outcome are uniform too
    res2, _ = _run(batch, [[0.5] * 4, [0.5] * 4], empty_score="group_mean")
    assert torch.allclose(res2.credit[0].double(), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("rescale", ["shift", "scale"])
def test_a_larger_score_increase_gets_more_credit(rescale):
    batch = Batch([make_traj(4, 1.0, "a"), make_traj(4, 0.0, "b")])
    res, _ = _run(batch, [[0.1, 0.2, 0.8, 0.9], [0.5, 0.4, 0.1, 0.1]], rescale=rescale, empty_score="zero")
    c = res.credit[0]
    assert c[2] > c[0] and c[2] > c[1] and c[2] > c[3]  # increments 0.1, 0.1, 0.6, 0.1 (step 0: 0.1 over empty 0)
    assert torch.isclose(c[0], c[1]) and torch.isclose(c[1], c[3])
    # the exact shift rule: d + (R - sum d) / n
    d = torch.tensor([0.1, 0.1, 0.6, 0.1], dtype=torch.float64)
    expect = d + (1.0 - d.sum()) / 4 if rescale == "shift" else d / d.sum()
    assert torch.allclose(c.double(), expect, atol=1e-6)
    # step advantages are ordered like the redistributed rewards
    adv = res.advantages[0, 0::3]
    assert adv[2] > adv[0] and adv[2] > adv[3]


def test_misaligned_process_rewards_are_a_clear_error():
    batch = Batch([make_traj(3, 1.0, "a")])
    with pytest.raises(ValueError, match=r"row 0 has 2 step scores but the trajectory has 3 steps"):
        _run(batch, [[0.1, 0.2, NAN]])
    with pytest.raises(ValueError, match=r"needs \['process_rewards'\]"):
        build_method(get_method_class("red").Config())(batch.to_tensors(), batch, CreditContext())
