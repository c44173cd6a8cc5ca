"""HICRA (Wang et al. 2025c; survey §3.3.4): A' = A + alpha*|A| on planning tokens, GRPO elsewhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import stages.credit.methods.planning  # noqa: F401  (registers hicra)
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, Trajectory, Turn


def make_batch(episodes) -> Batch:
    trajs = []
    for i, (steps, reward, gid) in enumerate(episodes):
        ids, turns = [], []
        for k, s in enumerate(steps):
            a = len(ids)
            ids += [10 + k] * (2 + k % 2)
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)), action_text=s,
                              observation=""))
        n = len(ids)
        trajs.append(Trajectory(uid=f"h{i}", group_id=gid, task_id=f"task{gid}", env_name="math", prompt_ids=[1, 2],
                                response_ids=ids, policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n,
                                turns=turns, reward=float(reward), success=reward > 0, prompt_text="p\n"))
    return Batch(trajs)


EPISODES = [
    (["Let's try the product first", "4*2=8", "3+8=11", "answer 11"], 1.0, 0),
    (["3+4=7", "7*2=14", "answer 14"], 0.0, 0),
    (["first multiply 4 by 2", "4*2=8", "Wait, we need to add 3", "answer 11"], 1.0, 0),
    (["4*2=8", "answer 12"], 0.0, 0),
    (["5+1=6", "answer 6"], 1.0, 1),
    (["alternatively 1+5=6", "answer 6"], 0.0, 1),
]


def run(batch, **cfg):
    method = build_method(get_method_class("hicra").Config(**cfg))
    t = batch.to_tensors()
    return method(t, batch, CreditContext()), t, method


def test_registered():
    cls = get_method_class("hicra")
    assert cls.granularity == "step" and cls.methodology == "Hierarchy" and cls.needs == frozenset()
    assert "§3.3.4" in cls.reference
    for f in dataclasses.fields(cls.Config):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_planning_steps_from_strategic_grams():
    batch = make_batch(EPISODES)
    _, _, m = run(batch)
    plan = m.planning_steps(batch, 6, 4)
    assert plan.int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert not m.is_planning("the letter meets")  # whole-word match: "let me" is not inside "letter meets"
    assert m.is_planning("Let me think")


@pytest.mark.parametrize("alpha", [0.2, 0.5, 1.0])
def test_amplification_on_planning_tokens_only(alpha):
    batch = make_batch(EPISODES)
    res, t, m = run(batch, alpha=alpha)
    base = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    plan = m.planning_steps(batch, 6, 4)
    tok_plan = torch.stack([plan[b].gather(0, t.turn_ids[b].clamp(min=0)) & (t.turn_ids[b] >= 0) for b in range(6)])
    assert tok_plan.any() and (~tok_plan & (t.response_mask > 0)).any()
    # non-planning tokens: exactly GRPO
    assert torch.equal(res.advantages[~tok_plan], base[~tok_plan])
    # planning tokens: A + alpha |A|
    assert torch.allclose(res.advantages[tok_plan], base[tok_plan] + alpha * base[tok_plan].abs(), atol=1e-7)
    # positive A grows by (1 + alpha), negative A shrinks in magnitude by (1 - alpha)
    pos, neg = tok_plan & (base > 0), tok_plan & (base < 0)
    assert pos.any() and neg.any()
    assert torch.allclose(res.advantages[pos], (1 + alpha) * base[pos]) and torch.allclose(res.advantages[neg], (1 - alpha) * base[neg])
    assert torch.all(res.advantages[t.response_mask == 0] == 0)
    assert res.granularity == "step" and res.credit.shape == (6, 4)
    assert 0 < res.stats["planning_token_fraction"] < 1


def test_alpha_zero_is_grpo():
    batch = make_batch(EPISODES)
    res, t, _ = run(batch, alpha=0.0)
    grpo = build_method(get_method_class("grpo").Config())(t, batch, CreditContext())
    assert torch.equal(res.advantages, grpo.advantages)


def test_math_family_non_computation_steps_plan():
    batch = make_batch([(["add the tens first", "30+40=70", "3+4=7", "70+7=77", "answer 77"], 1.0, 0),
                        (["30+40=70", "answer 70"], 0.0, 0)])
    _, _, m = run(batch, non_computation_is_planning=True, planning_phrases=[])
    assert m.planning_steps(batch, 2, 5).int().tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    _, _, m0 = run(batch, planning_phrases=[])
    assert not m0.planning_steps(batch, 2, 5).any()


def test_negative_alpha_rejected():
    with pytest.raises(ValueError, match="alpha"):
        build_method(get_method_class("hicra").Config(alpha=-0.1))
