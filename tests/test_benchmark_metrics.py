"""Ground-truth credit metrics (stages/benchmark/metrics.py) on hand-computed cases, against
independent references (scipy, explicit loops), and on a real bifurcation batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from stages.benchmark import metrics as M
from stages.schema import Batch, Trajectory, Turn


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_identification_by_hand():
    credit = t(1.0, -0.5, 0.0, 2.0)
    adv = t(0.5, -1.0, 0.0, 0.0)
    decisive = torch.tensor([True, True, False, False])
    out = M.identification(credit, adv, decisive)
    assert out["rmse"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0 + 4.0) / 4))
    assert out["sign_accuracy"] == 1.0  # both non-zero-advantage turns have the right sign
    assert out["zero_advantage_mass"] == pytest.approx(2.0 / 3.5)  # |0| + |2| of 1 + .5 + 0 + 2
    assert out["decisive_share"] == pytest.approx(1.5 / 3.5)
    # a zero credit on a turn with a non-zero advantage counts as a wrong sign
    assert M.identification(t(0.0, -1.0), t(1.0, -1.0))["sign_accuracy"] == 0.5
    assert math.isnan(M.identification(t(0.0, 0.0), t(0.0, 0.0))["zero_advantage_mass"])


def test_spearman_and_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    b = a + torch.randn(40, generator=g, dtype=torch.float64)
    assert M.rankdata(a).tolist() == pytest.approx(stats.rankdata(a.numpy()).tolist())
    assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert math.isnan(M.spearman(t(1.0, 1.0, 1.0), t(1.0, 2.0, 3.0)))


def test_shift_invariant_error_removes_any_per_state_baseline():
    g = torch.Generator().manual_seed(1)
    state = torch.randint(0, 4, (30,), generator=g)
    adv = torch.randn(30, generator=g, dtype=torch.float64)
    baseline = torch.tensor([3.0, -2.0, 0.5, 7.0], dtype=torch.float64)
    shifted = adv + baseline[state]
    assert M.shift_invariant_error(shifted, adv, state) == pytest.approx(0.0, abs=1e-12)
    assert M.identification(shifted, adv)["rmse"] > 1.0  # identification does see the shift
    noise = torch.randn(30, generator=g, dtype=torch.float64)
    # by hand: residual demeaned within each state
    r = noise.clone()
    for s in range(4):
        r[state == s] -= noise[state == s].mean()
    assert M.shift_invariant_error(adv + noise, adv, state) == pytest.approx(float(r.pow(2).mean().sqrt()))


def _loop_gradient(credit, state, action, S, A, probs):
    g = torch.zeros(S, A, dtype=torch.float64)
    for c, s, a in zip(credit.tolist(), state.tolist(), action.tolist()):
        for b in range(A):
            g[s, b] += c * ((1.0 if b == a else 0.0) - float(probs[s, b]))
    return g


def test_policy_gradient_matches_a_loop_and_is_shift_invariant_with_the_empirical_policy():
    g = torch.Generator().manual_seed(2)
    state = torch.randint(0, 3, (25,), generator=g)
    action = torch.randint(0, 4, (25,), generator=g)
    credit = torch.randn(25, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1)
    assert torch.allclose(M.policy_gradient(credit, state, action, 3, 4, probs),
                          _loop_gradient(credit, state, action, 3, 4, probs))
    counts = torch.zeros(3, 4, dtype=torch.float64)
    for s, a in zip(state.tolist(), action.tolist()):
        counts[s, a] += 1
    emp = counts / counts.sum(1, keepdim=True)
    g_emp = M.policy_gradient(credit, state, action, 3, 4)
    assert torch.allclose(g_emp, _loop_gradient(credit, state, action, 3, 4, emp))
    shifted = credit + torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64)[state]
    assert torch.allclose(M.policy_gradient(shifted, state, action, 3, 4), g_emp)


def test_gradient_validity_separates_a_baseline_shift_from_a_wrong_direction():
    g = torch.Generator().manual_seed(3)
    state = torch.randint(0, 5, (200,), generator=g)
    action = torch.randint(0, 3, (200,), generator=g)
    # a consistent advantage of each (state, action): the oracle's gradient has a direction
    adv = torch.randn(5, 3, generator=g, dtype=torch.float64)[state, action]
    batch = torch.arange(200) // 50
    shifted = adv + torch.tensor([5.0, -6.0, 4.0, 8.0, -7.0], dtype=torch.float64)[state]
    good = M.gradient_validity(shifted, adv, state, action, batch)
    assert good["gradient_cosine"] == pytest.approx(1.0)
    assert good["shift_invariant_rmse"] == pytest.approx(0.0, abs=1e-9)
    assert good["gradient_cosine_mean"] == pytest.approx(1.0)
    assert M.identification(shifted, adv)["rmse"] > 3.0  # fails identification, passes validity
    bad = M.gradient_validity(-adv, adv, state, action, batch)
    assert bad["gradient_cosine"] == pytest.approx(-1.0)
    noisy = M.gradient_validity(adv + 3 * torch.randn(200, generator=g, dtype=torch.float64), adv, state, action, batch)
    assert noisy["gradient_variance"] > good["gradient_variance"] > 0


def test_gradient_variance_by_hand():
    # two batches, one state, two actions; per-batch gradients averaged per turn
    state = torch.tensor([0, 0, 0, 0])
    action = torch.tensor([0, 1, 0, 1])
    credit = t(1.0, 0.0, 3.0, 0.0)
    batch = torch.tensor([0, 0, 1, 1])
    out = M.gradient_validity(credit, credit, state, action, batch)
    # batch 0: g = [1*(1-.5), 1*(0-.5)] = [.5, -.5] / 2 turns; batch 1: [1.5, -1.5] / 2
    g0, g1 = torch.tensor([0.25, -0.25]), torch.tensor([0.75, -0.75])
    mean = (g0 + g1) / 2
    spread = (((g0 - mean) ** 2).sum() + ((g1 - mean) ** 2).sum()) / 2
    assert out["gradient_variance"] == pytest.approx(float(spread / (mean @ mean)))


def test_gap_closed():
    assert M.gap_closed(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert M.gap_closed(0.2, 0.2, 0.8) == 0.0
    assert M.gap_closed(0.0, 0.2, 0.8) < 0
    assert math.isnan(M.gap_closed(0.5, 0.2, 0.2))
    # an oracle below GRPO (too few iterations, noise): no gap, not a 100%-closed one
    assert math.isnan(M.gap_closed(0.094, 0.156, 0.094)) and math.isnan(M.gap_closed(0.3, 0.2, 0.1))
    assert math.isnan(M.gap_closed(float("nan"), 0.2, 0.8))


def test_turn_table_on_a_real_bifurcation_batch_with_exact_advantages():
    """Oracle credit (the exact advantage on every policy token of its turn) scores perfectly on
    every metric; a GRPO-like constant per-episode credit puts mass on zero-advantage turns."""
    from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily

    cfg = BifurcationConfig(horizon=6, num_decisive=2, num_actions=3, slip_prob=0.1)
    fam = BifurcationFamily(cfg)
    rng = random.Random(0)
    trajs = []
    for i, inst in enumerate(fam.instances("train", 3, seed=0) * 3):
        trajs.append(_play_uniform(fam.make(inst, episode_seed=i), inst, i, rng))
    batch = Batch(trajs)
    tensors = batch.to_tensors(pad_token_id=0)
    gt = tensors.gt_turn_advantage.double()
    idx = tensors.turn_ids.clamp(min=0)
    on_policy = tensors.turn_ids >= 0
    oracle = torch.where(on_policy, torch.gather(torch.nan_to_num(gt), 1, idx), torch.zeros((), dtype=torch.float64))
    table = M.turn_table(batch, tensors, oracle)
    assert table.credit.numel() == sum(len(tr.turns) for tr in trajs)
    assert int(table.decisive.sum()) > 0
    ident = M.identification(table.credit, table.advantage, table.decisive)
    assert ident["rmse"] == pytest.approx(0.0, abs=1e-6) and ident["sign_accuracy"] == 1.0
    assert ident["zero_advantage_mass"] == pytest.approx(0.0, abs=1e-6)
    grad = M.gradient_validity(table.credit, table.advantage, table.state, table.action, table.row)
    assert grad["gradient_cosine"] == pytest.approx(1.0)
    constant = on_policy.double()
    t2 = M.turn_table(batch, tensors, constant)
    assert M.identification(t2.credit, t2.advantage, t2.decisive)["zero_advantage_mass"] > 0.3


def _play_uniform(env, inst, i, rng):
    """One episode of uniformly random valid actions as a Trajectory with its exact ground truth
    (token ids are placeholders: two policy tokens and one observation token a turn)."""
    from environments.tasks.bifurcation import format_action

    env.reset()
    turns, resp, mask = [], [], []
    while not env.done:
        key = env.state_key()
        a = rng.choice("ABC")
        s = len(resp)
        resp += [7, 8]
        mask += [True, True]
        res = env.step(format_action(a))
        e = len(resp)
        resp += [9]
        mask += [False]
        turns.append(Turn(index=len(turns), action_span=(s, e), obs_span=(e, len(resp)), action_text=a,
                          observation=res.observation, reward=res.reward, state_key=key, action=res.action))
    return Trajectory(uid=f"u{i}", group_id=i % 3, task_id=inst.task_id, env_name="bifurcation", prompt_ids=[5],
                      response_ids=resp, policy_mask=mask, logprobs=[0.0] * len(resp), entropies=[0.0] * len(resp),
                      turns=turns, reward=float(res.success), success=res.success,
                      ground_truth=env.ground_truth(env.actions))


def test_credit_statistics_add_gradient_validity_given_the_batch():
    """The per-iteration credit statistics (stages/credit/stats.py) score gradient validity too when
    the flow passes the batch: exact advantages have cosine 1 and no shift-invariant error; the
    variance is over the rollout groups (finite, non-negative)."""
    from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily
    from stages.credit.stats import credit_statistics
    from stages.schema import CreditResult

    fam = BifurcationFamily(BifurcationConfig(horizon=4, num_decisive=2, num_actions=3))
    rng = random.Random(1)
    trajs = []
    for i, inst in enumerate(fam.instances("train", 3, seed=0) * 4):
        trajs.append(_play_uniform(fam.make(inst, episode_seed=i), inst, i, rng))
    batch = Batch(trajs)
    tensors = batch.to_tensors(pad_token_id=0)
    on_policy = tensors.turn_ids >= 0
    gt = torch.nan_to_num(tensors.gt_turn_advantage.float())
    oracle = torch.where(on_policy, torch.gather(gt, 1, tensors.turn_ids.clamp(min=0)), torch.zeros(()))
    result = CreditResult(advantages=oracle, granularity="token", credit=oracle)
    assert "gt_pg_cosine" not in credit_statistics(tensors, result)  # without the batch: identification only
    stats = credit_statistics(tensors, result, batch)
    assert stats["gt_pg_cosine"] == pytest.approx(1.0)
    assert stats["gt_shift_invariant_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(stats["gt_gradient_variance"]) and stats["gt_gradient_variance"] >= 0
    # the variance compares half-batches over the same states: it tells credits apart (across whole
    # groups, disjoint task instances, it read G - 1 = 2 for any credit)
    noise = torch.randn(oracle.shape, generator=torch.Generator().manual_seed(0), dtype=oracle.dtype)
    noisy = torch.where(on_policy, oracle + 3 * noise[:, :1], torch.zeros(()))
    v_noisy = credit_statistics(tensors, CreditResult(advantages=noisy, granularity="token", credit=noisy),
                                batch)["gt_gradient_variance"]
    assert stats["gt_gradient_variance"] != pytest.approx(2.0) and v_noisy != pytest.approx(stats["gt_gradient_variance"])


def test_split_halves_alternates_within_each_group():
    groups = torch.tensor([5, 5, 2, 5, 2, 9, 5, 2])
    halves = M.split_halves(groups)
    assert halves.tolist() == [0, 1, 0, 0, 1, 0, 1, 0]
    for g in (5, 2):
        h = halves[groups == g]
        assert (h == 0).sum() - (h == 1).sum() in (0, 1)
