"""POAD (Wen et al. 2024; stages/credit/methods/action_decomposition.py): BAD's token backup is
consistent with the turn-level MDP at turn boundaries, its GAE matches a Python loop over the
policy tokens, and it differs from GRPO and from plain token GAE."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
import stages.credit.methods.action_decomposition as AD
import stages.credit.methods.turn_level as TL
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import segment_rewards, turn_segments, unit_sums
from stages.schema import Batch
from tests.test_turn_level import make_batch

ROWS = [(0, [3, 1, 4], 1.0), (0, [2, 2], 0.0), (1, [1, 3, 2, 2], 1.0), (1, [4], 0.5)]
TURN_R = [[0.1, 0.0, 0.3], [0.0, -0.2], [0.0, 0.5, 0.0, 0.1], [0.0]]


class FixedCritic:
    def __init__(self, values):
        self.v = values

    def values(self, tensors):
        return self.v * tensors.response_mask


def _setup(seed=0):
    batch, t, _ = make_batch(ROWS, turn_rewards=TURN_R)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(t.response_mask.shape, generator=g)
    return batch, t, values * t.response_mask


def _loop(t, values, gamma, lam):
    """Reference: per row, walk the policy tokens backwards (Python loop, test only)."""
    B, R = values.shape
    out = torch.zeros(B, R)
    rew = t.token_level_rewards
    for i in range(B):
        toks = [j for j in range(R) if t.response_mask[i, j] > 0]
        a_next, v_next_first = 0.0, 0.0
        for n in range(len(toks) - 1, -1, -1):
            j = toks[n]
            last = n == len(toks) - 1 or int(t.turn_ids[i, toks[n + 1]]) != int(t.turn_ids[i, j])
            if last:
                delta = float(rew[i, j]) + gamma * v_next_first - float(values[i, j])
                a = delta + gamma * lam * a_next
            else:
                delta = float(values[i, toks[n + 1]]) - float(values[i, j])
                a = delta + lam * a_next
            out[i, j] = a
            a_next = a
            first = n == 0 or int(t.turn_ids[i, toks[n - 1]]) != int(t.turn_ids[i, j])
            if first:
                v_next_first = float(values[i, j])
    return out


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 1.0), (0.99, 0.0), (0.0, 0.5), (0.7, 1.0)])
def test_bad_gae_equals_a_python_loop_over_policy_tokens(gamma, lam):
    _, t, values = _setup()
    seg = turn_segments(t)
    adv, ret = AD.bad_gae(values, segment_rewards(t, seg), seg, gamma, lam)
    ref = _loop(t, values, gamma, lam)
    assert torch.allclose(adv, ref, atol=1e-5)
    assert torch.allclose(ret, (ref + values) * t.response_mask, atol=1e-5)


def test_token_td_errors_of_a_turn_sum_to_the_turn_level_td_error():
    """BAD's consistency at turn boundaries: intra-turn errors telescope, so per turn
    sum_j delta_j = r_k + gamma V(s_{k+1}) - V(s_k) with V(s_k) the value at the turn's first
    token: Turn-PPO's TD error (turn_gae with lam = 0). A backup that discounted or rewarded
    inside the action would break it."""
    _, t, values = _setup(1)
    seg = turn_segments(t)
    r_k = segment_rewards(t, seg)
    gamma = 0.9
    delta = AD.bad_td_errors(values, r_k, seg, gamma)
    v_k = values.gather(1, seg.starts.clamp(min=0)) * seg.present
    turn_delta, _ = TL.turn_gae(r_k, v_k, seg.present, gamma, 0.0)
    assert torch.allclose(unit_sums(delta, seg), turn_delta, atol=1e-5)
    # intra-turn targets are the next token's value: with lam = 0 the return (target) of a
    # non-final token is V_{j+1}; of a turn's last token r_k + gamma V(s_{k+1})
    _, ret = AD.bad_gae(values, r_k, seg, gamma, 0.0)
    i = 0  # row 0: turns at [0, 3), [5, 6), [8, 12)
    assert float(ret[i, 0]) == pytest.approx(float(values[i, 1]), abs=1e-6)
    assert float(ret[i, 2]) == pytest.approx(float(r_k[i, 0] + gamma * values[i, 5]), abs=1e-6)
    assert float(ret[i, 11]) == pytest.approx(float(r_k[i, 2]), abs=1e-6)  # last turn: no next state
    # a wrong backup (gamma on every token) differs from the turn-level TD error
    wrong = unit_sums((torch.nn.functional.pad(values[:, 1:], (0, 1)) * gamma - values) * t.response_mask, seg)
    assert not torch.allclose(wrong, turn_delta, atol=1e-3)


def test_with_unit_lambda_a_turns_first_token_gets_turn_ppos_advantage():
    _, t, values = _setup(2)
    seg = turn_segments(t)
    r_k = segment_rewards(t, seg)
    adv, _ = AD.bad_gae(values, r_k, seg, 0.8, 1.0)
    v_k = values.gather(1, seg.starts.clamp(min=0)) * seg.present
    turn_adv, _ = TL.turn_gae(r_k, v_k, seg.present, 0.8, 1.0)
    first = adv.gather(1, seg.starts.clamp(min=0)) * seg.present
    assert torch.allclose(first, turn_adv, atol=1e-5)


def test_differential_vs_grpo_and_token_gae():
    batch, t, values = _setup(3)
    critic = FixedCritic(values)
    poad = build_method(get_method_class("poad").Config(gamma=0.9, lam=0.95, whiten=False))(
        t, batch, CreditContext(critic=critic))
    grpo = build_method(get_method_class("grpo").Config())(t, Batch([]), CreditContext())
    gae = build_method(get_method_class("gae").Config(gamma=0.9, lam=0.95))(t, batch, CreditContext(critic=critic))
    m = t.response_mask > 0
    # GRPO: one advantage per row; POAD: varies token by token inside a turn
    row0 = poad.advantages[0][m[0]]
    assert float(row0.std()) > 1e-2 and float(grpo.advantages[0][m[0]].std()) < 1e-6
    # plain token GAE discounts and reads values across observation tokens; BAD does not
    assert not torch.allclose(poad.advantages[m], gae.advantages[m], atol=1e-3)
    assert poad.overhead.extra_forward_passes == len(ROWS) and poad.granularity == "token"
    # zero critic, lam = 1, gamma = 1: every token's advantage is the row's return-to-go
    zero = build_method(get_method_class("poad").Config(gamma=1.0, lam=1.0, whiten=False))(
        t, batch, CreditContext(critic=FixedCritic(torch.zeros_like(values))))
    rtg = t.token_level_rewards.flip(-1).cumsum(-1).flip(-1) * t.response_mask
    assert torch.allclose(zero.advantages, rtg, atol=1e-6)


def test_poad_selects_the_ppo_update_unless_the_run_names_one():
    from flows.config import load_config

    assert load_config(["env=bifurcation", "credit=poad"])["update"].loss == "ppo"
