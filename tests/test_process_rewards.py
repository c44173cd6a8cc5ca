"""Process reward sources (stages/reward/process.py): step checks, Math-Shepherd MC, PRM."""

from __future__ import annotations

import math

import pytest
import torch

from stages.reward.process import (
    MCProcessRewards,
    ProcessRewardConfig,
    PRMProcessRewards,
    StepCheckRewards,
    make_process_rewards,
)
from stages.schema import Batch, Overhead, Trajectory, Turn


def traj(uid: str, steps: list[str], flags: list, reward: float = 0.0, success: bool = False,
         obs_len: int = 0, env: str = "math", group: int = 0) -> Trajectory:
    ids, mask, turns = [], [], []
    for k, (text, flag) in enumerate(zip(steps, flags)):
        a = len(ids)
        ids += list(range(10, 10 + len(text)))
        mask += [True] * len(text)
        b = len(ids)
        o = obs_len if k < len(steps) - 1 else 0
        ids += [5] * o
        mask += [False] * o
        info = {} if flag is None else {"step_correct": flag}
        turns.append(Turn(index=k, action_span=(a, b), obs_span=(b, b + o), action_text=text + "\n",
                          observation="", info=info))
    return Trajectory(uid=uid, group_id=group, task_id="t", env_name=env, prompt_ids=[1, 2], response_ids=ids,
                      policy_mask=mask, logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids), turns=turns,
                      reward=reward, success=success, prompt_text="3+4*2\n")


def test_step_check_reads_flags_and_pads_with_nan():
    batch = Batch([
        traj("a", ["4*2=8", "3+8=11", "answer 11"], [True, True, True], reward=1.0, success=True),
        traj("b", ["4*2=9", "answer 12"], [False, None], reward=0.0, success=False),  # answer turn: episode outcome
        traj("c", ["answer 5"], [0.25]),
    ])
    r, ov = make_process_rewards("step_check")(batch)
    assert r.shape == (3, 3)
    assert r[0].tolist() == [1.0, 1.0, 1.0]
    assert r[1, :2].tolist() == [0.0, 0.0] and math.isnan(float(r[1, 2]))
    assert float(r[2, 0]) == 0.25 and torch.isnan(r[2, 1:]).all()
    assert ov == Overhead()


def test_step_check_without_flags_names_the_family():
    batch = Batch([traj("a", ["A", "B"], [None, None], env="bifurcation")])
    with pytest.raises(ValueError, match="turns\\[0\\].*bifurcation.*process_reward=mc"):
        StepCheckRewards()(batch)
    one = Batch([traj("a", ["A"], [None], env="bifurcation")])
    with pytest.raises(ValueError, match="no turn of the batch carries info\\['step_correct'\\].*'bifurcation'"):
        StepCheckRewards()(one)
    with pytest.raises(ValueError, match="must be True/False or a finite number"):
        StepCheckRewards()(Batch([traj("a", ["x", "y"], ["yes", True])]))


class RecordingMC:
    """Test double of the MCRollouts protocol: checks the contract (a start lies on a turn's action
    start) and returns fixed, row/position-dependent returns."""

    def __init__(self, batch: Batch):
        self.batch, self.calls = batch, []

    def __call__(self, starts, k):
        self.calls.append((list(starts), k))
        rows = []
        for row, pos in starts:
            t = self.batch.trajectories[row]
            assert any(turn.action_span[0] == pos for turn in t.turns), (row, pos)
            rows.append([float((row + pos + j) % 2) for j in range(k)])
        return torch.tensor(rows), Overhead(extra_tokens=10 * len(starts) * k, env_steps=len(starts) * k)


def test_mc_values_are_mean_continuation_returns_from_the_end_of_each_step():
    batch = Batch([
        traj("a", ["4*2=8", "3+8=11", "answer 11"], [True] * 3, reward=1.0, success=True, obs_len=2),
        traj("b", ["answer 7"], [False], reward=0.0),
        traj("c", ["1+1=2", "answer 2"], [True, True], reward=1.0, success=True, obs_len=1),
    ])
    mc = RecordingMC(batch)
    r, ov = make_process_rewards("mc", mc_rollouts=mc, mc_k=3)(batch)
    starts, k = mc.calls[0]
    assert k == 3
    ta, tc = batch.trajectories[0], batch.trajectories[2]
    # step k's continuation starts at the next turn's action start (end of step k + observation)
    assert starts == [(0, ta.turns[1].action_span[0]), (0, ta.turns[2].action_span[0]), (2, tc.turns[1].action_span[0])]
    for (row, pos), step in zip(starts, [(0, 0), (0, 1), (2, 0)]):
        expect = sum((row + pos + j) % 2 for j in range(3)) / 3
        assert float(r[step]) == pytest.approx(expect)
    # last step: the episode's own outcome, no sampling
    assert float(r[0, 2]) == 1.0 and float(r[1, 0]) == 0.0 and float(r[2, 1]) == 1.0
    assert torch.isnan(r[1, 1:]).all() and math.isnan(float(r[2, 2]))
    assert ov.extra_tokens == 10 * 3 * 3 and ov.env_steps == 9


def test_mc_single_step_episodes_need_no_rollouts_and_bad_args_raise():
    batch = Batch([traj("b", ["answer 7"], [False], reward=0.5)])
    mc = RecordingMC(batch)
    r, ov = MCProcessRewards(mc, 2)(batch)
    assert mc.calls == [] and r.tolist() == [[0.5]] and ov == Overhead()
    with pytest.raises(ValueError, match="needs Monte Carlo rollouts"):
        make_process_rewards("mc")
    with pytest.raises(ValueError, match="mc_k"):
        make_process_rewards("mc", mc_rollouts=mc, mc_k=0)
    with pytest.raises(ValueError, match="must be one of step_check, mc, prm"):
        make_process_rewards("oracle")


def test_prm_source_scores_each_step_prefix_with_one_pass_per_trajectory():
    from stages.reward.prm import PRMConfig, build_prm

    cfg = PRMConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=280)
    prm = build_prm(cfg, corpus_texts=["3+4*2\n4*2=8\n3+8=11\nanswer 11\n"] * 4)
    batch = Batch([
        traj("a", ["4*2=8", "3+8=11", "answer 11"], [None] * 3),
        traj("b", ["answer 7"], [None]),
    ])
    r, ov = make_process_rewards("prm", prm=prm)(batch)
    direct = prm.score([("3+4*2\n", ["4*2=8\n", "3+8=11\n", "answer 11\n"]), ("3+4*2\n", ["answer 7\n"])])
    assert torch.allclose(r[0], direct[0]) and float(r[1, 0]) == pytest.approx(float(direct[1][0]))
    assert torch.isnan(r[1, 1:]).all()
    assert ((r[0] > 0) & (r[0] < 1)).all()
    assert ov.extra_forward_passes == 2
    # the score of a step reads only its prefix (causal): changing a later step leaves it unchanged
    changed = prm.score([("3+4*2\n", ["4*2=8\n", "9+9=1\n", "answer 1\n"])])[0]
    assert float(changed[0]) == pytest.approx(float(direct[0][0]), abs=1e-6)
    with pytest.raises(ValueError, match="needs a trained PRM"):
        PRMProcessRewards(None)


def test_process_reward_config_fields():
    cfg = ProcessRewardConfig()
    assert (cfg.process_reward, cfg.mc_k, cfg.prm_path) == ("step_check", 4, "")
