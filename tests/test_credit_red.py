"""RED (Li et al. 2024; survey §3.1.2): a holistic reward redistributed by incremental prefix
scores (per-step process rewards), summing exactly to the holistic reward."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods.redistribution as red  # noqa: F401  (registers red)
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import step_segments
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


# --------------------------------------------------------------------------- the source must score prefixes


class PrefixValues:
    """Test double of the MC continuation provider (the real one runs in tests/test_methods_flow.py):
    the return of a continuation from a start is the given value of the prefix before that start."""

    def __init__(self, values):
        self.values = values  # {(row, position): value}

    def __call__(self, starts, k, replacements=None):
        return torch.tensor([[self.values[s]] * k for s in starts]), Overhead(env_resets=len(starts) * k)


def test_default_source_scores_prefixes_and_step_checks_are_refused_with_the_reason(tmp_path):
    from stages.reward.process import SOURCE_KINDS, make_process_rewards, prefix_scores

    cfg = get_method_class("red").Config()
    assert cfg.process_reward == "mc" and prefix_scores(cfg.process_reward)
    assert make_process_rewards("mc", mc_rollouts=PrefixValues({})).prefix_scores
    assert not make_process_rewards("step_check").prefix_scores and SOURCE_KINDS["prm"][0]
    with pytest.raises(ValueError, match=r"process_reward=step_check cannot be used with credit=red: .*per-step "
                                         r"correctness bit.*not a score of the prefix.*use one of credit.process_reward=mc"):
        build_method(get_method_class("red").Config(process_reward="step_check"))
    # the run refuses it when it builds its method, before any model or rollout
    from flows.api import run_plain

    with pytest.raises(ValueError, match="not a score of the prefix"):
        run_plain(["experiment=math", "credit=red", "credit.process_reward=step_check"], home=tmp_path)
    assert not (tmp_path / "models").exists()


def test_a_correct_step_after_the_error_no_longer_gets_the_largest_credit():
    """Failed trajectory with step checks 1,0,1,0 (the issue's example) beside a solved one."""
    from stages.reward.process import make_process_rewards

    def step_traj(uid, checks, reward):
        t = make_traj(len(checks), reward, uid)
        for turn, c in zip(t.turns, checks):
            turn.info = {"step_correct": bool(c)}
        t.success = reward > 0
        return t

    batch = Batch([step_traj("ok", [1, 1, 1, 1], 1.0), step_traj("bad", [1, 0, 1, 0], 0.0)])
    tensors = batch.to_tensors()
    # what the old default did: the per-step bits as prefix scores -> the post-error step 2 is the top
    bits = make_process_rewards("step_check")(batch)[0]
    seg = step_segments(tensors, batch)
    old = red.redistribute(bits.double(), seg.present, torch.tensor([1.0, 0.0], dtype=torch.float64),
                           torch.tensor([0.5, 0.5], dtype=torch.float64), "shift")
    assert int(old[1].argmax()) == 2
    # the default source: MC values of each prefix (continuations from the end of step k); after
    # the error at step 1 no continuation succeeds
    starts = {(1, 3): 0.5, (1, 6): 0.0, (1, 9): 0.0, (0, 3): 0.75, (0, 6): 1.0, (0, 9): 1.0}
    cfg = get_method_class("red").Config()
    source = make_process_rewards(cfg.process_reward, mc_rollouts=PrefixValues(starts), mc_k=cfg.mc_k)
    res = build_method(cfg)(tensors, batch, CreditContext(process_rewards=source))
    c = res.credit[1]
    assert int(c.argmin()) == 1  # the error carries the failure
    assert not bool((c[2] > torch.cat([c[:2], c[3:]]) + 1e-6).all())  # no longer above every other step
    assert torch.allclose(c[[0, 2, 3]], c[0].expand(3)) and c[0] > c[1]  # steps that change no prefix value tie
    assert res.overhead.env_resets == 6 * cfg.mc_k  # the source's continuations are billed


def test_red_differs_from_grpo_where_prefix_scores_move_and_agrees_on_average():
    """Differential test: per-step advantages differ from GRPO's where the increments differ; the
    mean over a trajectory's steps is GRPO's advantage; rows with uniform increments are GRPO's."""
    batch = Batch([make_traj(4, 1.0, "a"), make_traj(4, 0.0, "b"), make_traj(3, 1.0, "c")])
    scores = [[0.1, 0.2, 0.8, 1.0], [0.5, 0.1, 0.1, 0.0], [0.3, 0.3, 0.3, NAN]]  # row c: equal scores (uniform)
    res, _ = _run(batch, scores, empty_score="first_step")
    t = batch.to_tensors()
    g = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0].to(res.advantages.dtype)
    steps = res.advantages[:, 0::3]  # one token per step here (first action token of each step)
    for b, n in ((0, 4), (1, 4), (2, 3)):
        assert torch.isclose(steps[b, :n].mean(), g[b, 0], atol=1e-5)
    assert not torch.allclose(res.advantages[0], g[0]) and not torch.allclose(res.advantages[1], g[1])
    assert torch.allclose(res.advantages[2], g[2], atol=1e-6)
