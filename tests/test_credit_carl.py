"""CARL (Shen et al. 2025 §3; survey §5.4): only the top-rho fraction of actions by policy
entropy keep their (GRPO) advantage; the rest get 0 and the skipped share is logged."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from tests.agentic_batches import batch, trajectory


def _run(b, **cfg):
    return build_method(get_method_class("carl").Config(**cfg))(b.to_tensors(), b, CreditContext())


def _grpo(b):
    t = b.to_tensors()
    return F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]


def _hand():
    """10 actions with distinct entropies 0.1 .. 1.0 over 3 rows of one group (rewards 1, 0, 1)."""
    return batch(trajectory("a", 0, ["s"] * 4, 1.0, entropies=[0.3, 0.9, 0.1, 0.5]),
                 trajectory("b", 0, ["s"] * 3, 0.0, entropies=[1.0, 0.2, 0.6]),
                 trajectory("c", 0, ["s"] * 3, 1.0, entropies=[0.4, 0.8, 0.7]))


def _carried(res, b):
    """The set of (row, turn) whose action tokens carry a nonzero advantage."""
    out = set()
    for r, tr in enumerate(b.trajectories):
        for k, turn in enumerate(tr.turns):
            a, e = turn.action_span
            if torch.any(res.advantages[r, a:e] != 0):
                assert torch.all(res.advantages[r, a:e] != 0)  # the whole action or none of it
                out.add((r, k))
    return out


def test_exactly_the_top_rho_entropy_actions_carry_advantage():
    b = _hand()
    res = _run(b, rho=0.3)
    assert _carried(res, b) == {(1, 0), (0, 1), (2, 1)}  # entropies 1.0, 0.9, 0.8
    res = _run(b, rho=0.5)
    assert _carried(res, b) == {(1, 0), (0, 1), (2, 1), (2, 2), (1, 2)}  # + 0.7, 0.6
    # the kept actions carry GRPO's advantage unchanged
    ep = _grpo(b)
    assert torch.equal(res.advantages[0, 3:5], ep[0, 3:5])  # row a, turn 1 (tokens 3, 4)


def test_skipped_share_is_one_minus_rho_on_the_hand_batch():
    b = _hand()
    for rho, skipped in ((0.3, 0.7), (0.5, 0.5), (0.1, 0.9), (1.0, 0.0)):
        res = _run(b, rho=rho)
        assert res.stats["skipped_action_fraction"] == pytest.approx(skipped)
        assert res.stats["critical_actions"] == round(10 * rho)
        # every action has 2 tokens: the token share equals the action share
        assert res.stats["skipped_token_fraction"] == pytest.approx(skipped)
    res = _run(b, rho=0.25)  # ceil(2.5) = 3 actions kept
    assert res.stats["critical_actions"] == 3 and res.stats["critical_entropy_min"] == pytest.approx(0.8)


def test_ties_keep_the_earlier_action_in_batch_order():
    b = batch(trajectory("a", 0, ["s"] * 2, 1.0, entropies=[0.5, 0.5]),
              trajectory("b", 0, ["s"] * 2, 0.0, entropies=[0.5, 0.9]))
    assert _carried(_run(b, rho=0.5), b) == {(1, 1), (0, 0)}


def test_neg_logprob_criticality_uses_the_sampled_actions_logprobs():
    b = batch(trajectory("a", 0, ["s"] * 2, 1.0, entropies=[0.9, 0.1], logprobs=[-0.1, -3.0]),
              trajectory("b", 0, ["s"] * 2, 0.0, entropies=[0.2, 0.3], logprobs=[-0.2, -0.3]))
    assert _carried(_run(b, rho=0.25), b) == {(0, 0)}
    assert _carried(_run(b, rho=0.25, entropy="neg_logprob"), b) == {(0, 1)}


def test_rho_one_is_grpo_exactly_and_differs_below():
    gen = torch.Generator().manual_seed(1)
    trajs = [trajectory(f"{g}{j}", g, ["s"] * int(torch.randint(1, 5, (1,), generator=gen)),
                        float(torch.rand(1, generator=gen) > 0.5), entropies=torch.rand(4, generator=gen).tolist())
             for g in range(3) for j in range(4)]
    b = batch(*trajs)
    assert torch.equal(_run(b, rho=1.0).advantages, _grpo(b))
    for nstd in (True, False):
        t = b.to_tensors()
        ref = F.grpo(t.token_level_rewards, t.response_mask, t.index, norm_adv_by_std=nstd)[0]
        assert torch.equal(_run(b, rho=1.0, norm_adv_by_std=nstd).advantages, ref)
    low = _run(b, rho=0.3)
    ep = _grpo(b)
    kept = low.advantages != 0
    assert torch.equal(low.advantages[kept], ep[kept])  # kept tokens: GRPO's value; others 0
    assert int(kept.sum()) < int((ep != 0).sum())


def test_no_extra_compute_and_config_rules():
    ov = _run(_hand()).overhead
    assert (ov.extra_forward_passes, ov.forward_tokens, ov.extra_tokens, ov.env_resets, ov.env_steps, ov.judge_calls) == (0,) * 6
    cls = get_method_class("carl")
    assert cls.needs == frozenset() and cls.needs_group
    with pytest.raises(ValueError, match=r"^credit.rho"):
        build_method(cls.Config(rho=0.0))
    with pytest.raises(ValueError, match=r"^credit.rho"):
        build_method(cls.Config(rho=1.5))
    with pytest.raises(ValueError, match=r"^credit.entropy"):
        build_method(cls.Config(entropy="varentropy"))
