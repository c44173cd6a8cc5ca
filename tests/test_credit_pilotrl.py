"""PilotRL (Lu et al. 2025, survey §5.4): progressive plan-level -> step-level -> token-level credit
on plan-first episodes (stages/credit/methods/planning.py). Defining property: in phase 1 only the
plan tokens carry credit and, at equal outcome, a plan on the optimal path gets more than one off
it (GRPO gives both the same); the phases switch at the configured iterations; the step level is
the per-turn-index group normalisation of return-to-go plus plan following; differential against
GRPO: phase 3 with plan and step weights 0 is GRPO exactly, phase 1 with quality weight 0 puts
GRPO's advantage on the plan tokens only; the config rules and the loader's refusal."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.schema import Batch
from tests.agentic_batches import trajectory
from tests.reference_estimators import ref_grpo

TOKENS = 2  # action tokens per turn (tests.agentic_batches)


def _method(**kw):
    cls = get_method_class("pilotrl")
    return cls(cls.Config(**kw))


def _plan_traj(uid, group, plan, actions, reward, score, turn_rewards=None):
    """A plan-first episode: turn 0 the plan (``plan``, its ``plan_score``), then one turn per action."""
    n = 1 + len(actions)
    t = trajectory(uid, group, [f"s{k}" for k in range(n)], reward, tokens=TOKENS,
                   turn_rewards=[0.0] + list(turn_rewards or [0.0] * len(actions)))
    t.turns[0].action = plan
    t.turns[0].info = {"plan": True, "plan_score": score}
    for turn, a in zip(t.turns[1:], actions):
        turn.action = a
    return t


def _batch(iteration=0):
    """Group 0: two successes (optimal plan vs half-right plan) and two failures; group 1: mixed."""
    trajs = [
        _plan_traj("a", 0, "BAB", ["B", "A", "B"], 1.0, 1.0),
        _plan_traj("b", 0, "BBB", ["B", "A", "B"], 1.0, 0.5),
        _plan_traj("c", 0, "ABB", ["A", "A", "B"], 0.0, 0.5),
        _plan_traj("d", 0, "AAA", ["B", "B", "A"], 0.0, 0.0),
        _plan_traj("e", 1, "AB", ["A", "B"], 1.0, 1.0, turn_rewards=[0.5, 0.0]),
        _plan_traj("f", 1, "BB", ["A", "A"], 0.0, 0.0, turn_rewards=[0.5, 0.0]),
    ]
    return Batch(trajectories=trajs, iteration=iteration)


def _token_masks(t):
    mask = t.response_mask != 0
    plan = mask & (t.turn_ids == 0)
    return plan, mask & (t.turn_ids > 0)


def _grpo(t):
    return ref_grpo(t.token_level_rewards, t.response_mask, t.index.tolist())[0].float()


def test_phase1_credits_only_the_plan_and_prefers_the_optimal_plan_at_equal_outcome():
    b = _batch(iteration=0)
    t = b.to_tensors()
    res = _method(phase2_start=3, phase3_start=6)(t, b, CreditContext())
    plan, exe = _token_masks(t)
    adv = res.advantages
    assert torch.all(adv[exe] == 0) and torch.all(adv[~(plan | exe)] == 0)
    assert adv[plan].abs().sum() > 0
    # rows a, b: both succeeded; a's plan is the optimal path, b's half of it
    assert adv[0][plan[0]].min() > adv[1][plan[1]].max() > 0
    assert res.stats["phase"] == 1.0 and res.stats["step_level_abs_mean"] == 0.0
    # a degenerate GRPO credits both successes the same, and the execution tokens too
    g = _grpo(t)
    assert torch.allclose(g[0][plan[0]], g[1][plan[1]]) and g[exe].abs().sum() > 0
    # the overhead record: nothing beyond the rollout (no passes, tokens, env steps)
    o = res.overhead
    assert (o.extra_forward_passes, o.forward_tokens, o.extra_tokens, o.env_steps, o.env_resets) == (0, 0, 0, 0, 0)


def test_the_phases_switch_at_the_configured_iterations():
    m = _method(phase2_start=2, phase3_start=4)
    t = _batch().to_tensors()
    plan, exe = _token_masks(t)
    out = {it: m(t, _batch(it), CreditContext()) for it in range(6)}
    assert [out[it].stats["phase"] for it in range(6)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    for it in (0, 1):
        assert torch.all(out[it].advantages[exe] == 0)
    for it in (2, 3):
        assert out[it].advantages[exe].abs().sum() > 0
        # phase 2 adds the step level on the execution tokens only: the plan tokens keep phase 1's credit
        assert torch.equal(out[it].advantages[plan], out[0].advantages[plan])
    # phase 3 adds GRPO's token-level advantage on every policy token, nothing else
    assert torch.allclose(out[4].advantages - out[2].advantages, _grpo(t), atol=1e-6)
    # the paper's order: plan following (step level) first, plan quality added in phase 2
    p = _method(cascade="step_plan_token", phase2_start=2, phase3_start=4)
    a0, a2 = p(t, _batch(0), CreditContext()).advantages, p(t, _batch(2), CreditContext()).advantages
    assert torch.all(a0[plan] == 0) and a0[exe].abs().sum() > 0
    assert torch.equal(a2[exe], a0[exe]) and torch.equal(a2[plan], out[0].advantages[plan])


def test_step_level_is_return_to_go_plus_plan_following_normalised_per_turn_index():
    b = _batch(iteration=1)
    t = b.to_tensors()
    follow_coef, eps = 0.5, 1e-6
    res = _method(phase2_start=0, phase3_start=9, plan_coef=0.0, follow_coef=follow_coef)(t, b, CreditContext())
    # reference, written with loops: per (group, turn index) over the trajectories that played it
    signal = {}
    for i, tr in enumerate(b.trajectories):
        rewards = [turn.reward for turn in tr.turns]
        rewards[-1] += tr.reward
        for k in range(1, len(tr.turns)):
            followed = float(tr.turns[k].action == tr.turns[0].action[k - 1])
            signal[(i, k)] = sum(rewards[k:]) + follow_coef * followed
    for (i, k), s in signal.items():
        g = b.trajectories[i].group_id
        peers = torch.tensor([v for (j, kk), v in signal.items() if kk == k and b.trajectories[j].group_id == g])
        want = (s - peers.mean()) / (peers.std() + eps) if len(peers) > 1 else s / (1 + eps)
        got = res.advantages[i][(t.turn_ids[i] == k) & (t.response_mask[i] != 0)]
        assert torch.allclose(got, torch.full_like(got, float(want)), atol=1e-5), (i, k)
    assert res.advantages[_token_masks(t)[0]].abs().sum() == 0  # plan_coef = 0


def test_last_phase_without_plan_and_step_levels_is_grpo():
    b = _batch(iteration=7)
    t = b.to_tensors()
    res = _method(phase2_start=0, phase3_start=7, plan_coef=0.0, step_coef=0.0)(t, b, CreditContext())
    assert torch.allclose(res.advantages, _grpo(t), atol=1e-6)


def test_phase1_without_plan_quality_puts_grpo_on_the_plan_tokens_only():
    b = _batch(iteration=0)
    t = b.to_tensors()
    res = _method(quality_coef=0.0)(t, b, CreditContext())
    plan, _ = _token_masks(t)
    assert torch.allclose(res.advantages, _grpo(t) * plan, atol=1e-6)


def test_a_batch_without_a_plan_turn_is_refused():
    b = Batch(trajectories=[trajectory("x", 0, ["s0", "s1"], 1.0), trajectory("y", 0, ["s0", "s1"], 0.0)])
    with pytest.raises(ValueError, match=r"needs trajectories whose turn 0 is a plan \(env.plan_first=true\)"):
        _method()(b.to_tensors(), b, CreditContext())


def test_config_rules_and_the_loaders_refusal_without_a_plan_turn():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"phase3_start.*must be >= credit.phase2_start=5"):
        load_config(["env=bifurcation", "env.plan_first=true", "credit=pilotrl", "credit.phase2_start=5",
                     "credit.phase3_start=2"])
    with pytest.raises(ConfigError, match=r"plan_coef.*must be > 0"):
        load_config(["env=bifurcation", "env.plan_first=true", "credit=pilotrl", "credit.plan_coef=0"])
    with pytest.raises(ConfigError, match=r"cascade"):
        load_config(["env=bifurcation", "env.plan_first=true", "credit=pilotrl", "credit.cascade=token_first"])
    with pytest.raises(ConfigError, match=r"^credit.method=pilotrl: needs a plan turn at the start of every episode") as e:
        load_config(["env=bifurcation", "credit=pilotrl"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"needs a plan turn"):
        load_config(["experiment=frozenlake", "credit=pilotrl"])
    cfg = load_config(["env=bifurcation", "env.plan_first=true", "credit=pilotrl"])
    assert cfg.credit.phase2_start == 4 and cfg.credit.phase3_start == 8
