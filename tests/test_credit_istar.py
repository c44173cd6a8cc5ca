"""iStar (Liu et al. 2025; survey §5.6): implicit step rewards beta * log pi_phi/pi_old from an
implicit PRM (a copy of the policy) trained by trajectory-level DPO on success/failure pairs,
fused with the episode-level GRPO advantage. Defining properties: a step reward is exactly that
turn's PRM log-ratio times beta and a trajectory's step rewards sum to its DPO reward; the DPO fit
ranks the success above the failure. Differential against GRPO: no PRM step = GRPO exactly; with
the fit the advantage is GRPO's plus alpha times the group-normalised step reward."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the methods)
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.rollout.policy import sequence_logprobs


@pytest.fixture(scope="module")
def policy_and_batch():
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy
    from tests.test_turn_level import make_batch

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\ngo right\nno\n"] * 8)
    # the two tasks prefer the same response shape (their tokens overlap): one consistent preference
    batch, t, _ = make_batch([(0, [2, 3], 1.0), (0, [3, 2], 0.0), (1, [3, 2], 0.0), (1, [2, 3], 1.0)])
    with torch.no_grad():  # behaviour log-probs: the policy's own (on-policy rollouts)
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    t.old_logprobs = lp * t.response_mask
    return model, batch, t


def _method(model, **kw):
    cls = get_method_class("istar")
    m = cls(cls.Config(**kw))
    m.bind_policy(model)
    m.build_helpers(16, seed=0)
    return m


def _grpo(t, batch):
    cls = get_method_class("grpo")
    return cls(cls.Config())(t, batch, CreditContext())


def test_step_rewards_are_the_prms_turn_log_ratios_and_sum_to_its_dpo_reward(policy_and_batch):
    model, batch, t = policy_and_batch
    m = _method(model, prm_steps=3, prm_lr=1e-2, beta=0.5)
    res = m(t, batch, CreditContext(rollout_temperature=1.0))
    prm = model.__class__(model.config)
    prm.load_state_dict(res.helper_inputs["prm_state"])
    with torch.no_grad():
        lp, _ = sequence_logprobs(prm.eval(), t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    d = (lp - t.old_logprobs) * t.response_mask
    for b in range(t.input_ids.shape[0]):  # direct: beta * sum of exactly turn k's tokens
        for k in range(int(t.num_turns[b])):
            assert float(res.credit[b, k]) == pytest.approx(0.5 * float(d[b][t.turn_ids[b] == k].sum()), abs=1e-5)
    # the step rewards of a trajectory sum to its trajectory-level DPO reward beta * log pi_phi/pi_old(tau)
    assert torch.allclose(res.credit.sum(-1), 0.5 * d.sum(-1), atol=1e-5)
    # the fit moved the PRM toward the successes: DPO loss down, pairs ranked
    assert res.stats["prm_pairs"] == 2 and res.stats["prm_loss_after"] < res.stats["prm_loss_before"]
    assert res.stats["prm_accuracy_after"] == 1.0
    s = res.credit.sum(-1)
    assert s[0] > s[1] and s[3] > s[2]
    # the policy itself is untouched; the kept PRM moves only when the update stage adopts the fit
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.prm.state_dict().values()))
    assert m.update_helpers(res, seed=0) == {"prm_adopted": 1.0}
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.prm.state_dict().values()))


def test_without_a_prm_step_it_is_grpo_and_with_one_it_adds_the_step_term(policy_and_batch):
    model, batch, t = policy_and_batch
    g = _grpo(t, batch)
    res0 = _method(model, prm_steps=0)(t, batch, CreditContext(rollout_temperature=1.0))
    assert torch.allclose(res0.advantages, g.advantages, atol=1e-5)  # pi_phi = pi_old: every step reward 0
    assert float(res0.credit.abs().max()) < 1e-5
    m = _method(model, prm_steps=3, prm_lr=1e-2, beta=0.5, alpha=0.5)
    res = m(t, batch, CreditContext(rollout_temperature=1.0))
    step = res.advantages - g.advantages
    assert float(step.abs().max()) > 1e-3  # the turns of a trajectory now differ
    # the difference is alpha * (r - mean_g) / (std_g + eps) over the group's steps, constant on a turn
    r = res.credit
    for grp in (0, 1):
        rows = (t.index == grp).nonzero().squeeze(-1)
        vals = torch.cat([r[b, : int(t.num_turns[b])] for b in rows])
        z = (vals - vals.mean()) / (vals.std() + 1e-6)
        got = torch.cat([torch.stack([step[b][t.turn_ids[b] == k][0] for k in range(int(t.num_turns[b]))])
                         for b in rows])
        assert torch.allclose(got, 0.5 * z, atol=1e-4)


def test_config_rules_and_needs():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.beta=0.0: must be") as info:
        load_config(["env=bifurcation", "credit=istar", "credit.beta=0"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^rollout.group_size=1: must be >= 2"):
        load_config(["env=bifurcation", "credit=istar", "rollout.group_size=1"])
    cls = get_method_class("istar")
    with pytest.raises(ValueError, match="bind_policy"):
        cls(cls.Config()).build_helpers(16, 0)
