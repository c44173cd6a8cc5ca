"""stages/schema.py: round trip through pickle (Prefect persisted results), tensor layout, edge validation."""

import math
import pickle

import pytest
import torch

from environments.ground_truth import GroundTruthCredit
from stages.schema import Batch, CreditResult, Trajectory, Turn, turn_credit


def _traj(uid, group, prompt, actions, reward, gt=None):
    resp, mask, turns = [], [], []
    for k, (a, o) in enumerate(actions):
        s = len(resp)
        resp += a
        mask += [True] * len(a)
        e = len(resp)
        resp += o
        mask += [False] * len(o)
        turns.append(Turn(index=k, action_span=(s, e), obs_span=(e, len(resp)), action_text="x", observation="y",
                          reward=0.5 if k == 0 else 0.0, state_key=f"s{k}"))
    return Trajectory(uid=uid, group_id=group, task_id="t", env_name="test", prompt_ids=prompt, response_ids=resp,
                      policy_mask=mask, logprobs=[-0.1 if m else 0.0 for m in mask], entropies=[0.5] * len(mask),
                      turns=turns, reward=reward, success=reward > 0, ground_truth=gt)


def _batch():
    gt = GroundTruthCredit(value=[0.5, 1.0], q_value=[1.0, 1.0], advantage=[0.5, 0.0], decisive=[True, False])
    return Batch([
        _traj("a", 0, [1, 2, 3], [([7, 8], [9]), ([7], [9, 9])], 1.0, gt),
        _traj("b", 0, [1, 2], [([8, 8], [9])], 0.0, GroundTruthCredit([0.5], [0.0], [-0.5], [True])),
    ])


def test_pickle_round_trip_keeps_data_and_drops_derived_cache():
    b = _batch()
    t1 = b.to_tensors()
    assert b.to_tensors() is t1  # built once, shared by credit and update
    b2 = pickle.loads(pickle.dumps(b))
    assert "_tensor_cache" not in b2.__dict__
    assert b2.trajectories[0] == b.trajectories[0]
    t2 = b2.to_tensors()
    for name in ("input_ids", "response_mask", "token_level_rewards", "turn_ids", "gt_turn_advantage"):
        assert torch.equal(torch.nan_to_num(getattr(t1, name)), torch.nan_to_num(getattr(t2, name))), name


def test_tensor_layout_left_padded_prompt_right_padded_response():
    t = _batch().to_tensors(pad_token_id=0)
    assert t.prompt_len == 3 and t.input_ids.shape == (2, 3 + 6)
    assert t.input_ids[1, :3].tolist() == [0, 1, 2] and t.attention_mask[1, :3].tolist() == [0, 1, 1]
    assert t.position_ids[1, 1:5].tolist() == [0, 1, 2, 3]
    assert t.response_mask[0].tolist() == [1, 1, 0, 1, 0, 0]
    assert t.turn_ids[0].tolist() == [0, 0, -1, 1, -1, -1]
    # turn reward at the turn's last action token, terminal reward at the last policy token
    assert t.token_level_rewards[0].tolist() == [0.0, 0.5, 0.0, 1.0, 0.0, 0.0]
    assert t.token_level_rewards[1].tolist() == [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert t.index.tolist() == [0, 0]
    assert t.gt_turn_advantage[1, 1].isnan() and t.decisive[0].tolist() == [True, False]


def test_turn_credit_is_mean_over_turn_tokens():
    t = _batch().to_tensors()
    adv = torch.tensor([[1.0, 3.0, 9.0, 5.0, 0.0, 0.0], [2.0, 2.0, 9.0, 0.0, 0.0, 0.0]])
    tc = turn_credit(adv, t.turn_ids, 2)
    assert tc[0].tolist() == [2.0, 5.0]
    assert tc[1, 0] == 2.0 and math.isnan(tc[1, 1])


def test_validation_names_field_index_and_env():
    b = _batch()
    b.trajectories[0].turns[1].reward = float("nan")
    with pytest.raises(ValueError, match=r"turn_rewards\[1\] must be a finite number, got nan \(env 'test'\)"):
        b.validate()
    b = _batch()
    b.trajectories[1].logprobs = b.trajectories[1].logprobs[:-1]
    with pytest.raises(ValueError, match="logprobs has length 2, response_ids has 3"):
        b.validate()
    with pytest.raises(ValueError, match="granularity must be one of"):
        CreditResult(advantages=torch.zeros(1, 1), granularity="paragraph", credit=torch.zeros(1))


def test_token_count_is_prompt_plus_response_tokens_of_every_trajectory():
    b = _batch()
    expected = sum(len(t.prompt_ids) + len(t.response_ids) for t in b.trajectories)
    assert b.token_count() == expected == int(b.to_tensors().attention_mask.sum())
    assert Batch([]).token_count() == 0
