"""Math step credit from exhaustive Monte Carlo (environments/tasks/math_mc.py; issue 15): the
estimate agrees with the reference policy's closed-form success probability, values lie in
[0, 1] with their standard errors reported, the cost is recorded, and a cache hit does no work."""

from __future__ import annotations

import json
import math

import pytest

from environments.tasks import math_mc
from environments.tasks.math import MathConfig, MathFamily


def _episode(cfg, lines, index=1):
    fam = MathFamily(cfg)
    inst = fam.instance("train", index, 0)
    env = fam.make(inst)
    env.reset()
    for line in lines:
        env.step(line)
    return inst, env


def _closed_form(noise, steps_left, budget):
    """P(success) of the noisy scripted policy: ``steps_left`` correct step lines within the
    first ``budget - 1`` turns (each right with probability 1 - noise), then a right answer."""
    p = 1 - noise
    within = sum(math.comb(k - 1, steps_left - 1) * p ** steps_left * noise ** (k - steps_left)
                 for k in range(max(steps_left, 1), budget)) if steps_left else 1.0
    return p * within if budget >= steps_left + 1 else 0.0


def test_values_match_the_closed_form_within_4_standard_errors(tmp_path):
    cfg = MathConfig(kinds="arith", ground_truth_mc=400, ground_truth_mc_noise=0.3, max_steps=4,
                     ground_truth_mc_dir=str(tmp_path))
    inst, env = _episode(cfg, [])
    steps = inst.spec["steps"]
    assert len(steps) == 1  # difficulty 1: one operation
    wrong = math_mc._wrong_result(steps[0])
    for line in [wrong + "\n", wrong + "\n", steps[0] + "\n", f"answer {inst.spec['answer']}\n"]:
        env.step(line)
    gt = env.ground_truth([None] * 4)
    assert gt.reference_policy == "mc:noisy-scripted-v1(noise=0.3),n=400"
    # prefixes: 0, 1, 2 wrong lines (budget 4, 3, 2 turns left; one step to go), then the step done
    expected = [_closed_form(0.3, 1, 4), _closed_form(0.3, 1, 3), _closed_form(0.3, 1, 2), _closed_form(0.3, 0, 1)]
    for v, se, e in zip(gt.value, gt.value_se, expected):
        assert 0.0 <= v <= 1.0 and se == pytest.approx(math.sqrt(v * (1 - v) / 400))
        assert abs(v - e) <= 4 * se + 1e-12, (v, e, se)
    assert gt.q_value[-1] == 1.0 and len(gt.value_se) == 5 and gt.value_se[-1] == 0.0
    assert gt.advantage == pytest.approx([b - a for a, b in zip(gt.value, gt.q_value)])
    assert gt.q_value[:3] == gt.value[1:]
    # the wrong lines cost turns: each lowers V (the closed form is strictly decreasing here)
    assert expected[0] > expected[1] > expected[2]


def test_cache_hit_does_no_work_and_the_cost_is_recorded(tmp_path, monkeypatch):
    cfg = MathConfig(kinds="arith", ground_truth_mc=50, ground_truth_mc_dir=str(tmp_path))
    inst, env = _episode(cfg, ["1+1=3\n", f"answer {MathFamily(cfg).instance('train', 1, 0).spec['answer']}\n"])
    first = env.ground_truth([None, None])
    stats = env.stats()
    assert stats["gt_mc_continuations"] == 2 * 50 and stats["gt_mc_cache_hits"] == 0
    assert stats["gt_mc_env_steps"] >= 2 * 50 and stats["gt_mc_seconds"] >= 0
    entries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert len(entries) == 2
    for e in entries:
        assert e["n"] == 50 and e["policy"] == "noisy-scripted-v1" and set(e["cost"]) == {
            "continuations", "env_steps", "generated_chars", "seconds"}
        assert e["cost"]["continuations"] == 50 and e["cost"]["generated_chars"] > 0

    def no_work(*args, **kwargs):
        raise AssertionError("a cache hit must not roll out")

    monkeypatch.setattr(math_mc, "estimate_value", no_work)
    _, env2 = _episode(cfg, ["1+1=3\n", f"answer {inst.spec['answer']}\n"])
    again = env2.ground_truth([None, None])
    assert again.value == first.value and again.value_se == first.value_se
    assert env2.stats()["gt_mc_cache_hits"] == 2 and env2.stats()["gt_mc_continuations"] == 0
    # another n is another key: it would roll out
    cfg3 = MathConfig(kinds="arith", ground_truth_mc=51, ground_truth_mc_dir=str(tmp_path))
    _, env3 = _episode(cfg3, ["1+1=3\n"])
    with pytest.raises(AssertionError, match="cache hit"):
        env3.ground_truth([None])


def test_off_by_default_is_the_step_check():
    cfg = MathConfig(kinds="arith")
    _, env = _episode(cfg, ["1+1=3\n"])
    gt = env.ground_truth([None])
    assert gt.reference_policy == "step-check" and gt.value_se is None and "gt_mc_continuations" not in env.stats()
