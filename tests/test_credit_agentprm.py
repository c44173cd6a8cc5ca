"""AgentPRM (Xi et al. 2025; stages/credit/methods/agentic_critic.py): TD(lambda)/GAE labels from
the model's own values against a hand loop, one-step TD labels bootstrap (not Monte Carlo
returns), the model's promises fit the exact Q of a small deterministic task over iterations (and
the logged agreement with the ground truth), differential vs GRPO, checkpoint, config errors."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from environments.ground_truth import GroundTruthCredit
from stages.credit.base import CreditContext
from stages.credit.methods.agentic_critic import sarsa_gae_labels
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import turn_segments
from stages.schema import Batch
from tests.test_credit_archer import GAMMA, H, NEW, Q_FEAT, REWARD, _chain_batch
from tests.test_turn_level import make_batch

torch.set_num_threads(1)  # tiny MLP fits: threads only contend on a shared machine


def _prm(**kw):
    cls = get_method_class("agentprm")
    kw = {"gamma": GAMMA, "prm_steps": 300, "prm_lr": 3e-2, **kw}
    m = cls(cls.Config(**kw))
    m.build_helpers(H, seed=3)
    return m


def _promise(m, name) -> float:
    x = torch.zeros(H)
    x[Q_FEAT[name]] = 1.0
    with torch.no_grad():
        return float(m.model(x))


def test_td_lambda_gae_labels_match_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    B, K, gamma, lam = 5, 4, 0.9, 0.7
    q, r = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    counts = [4, 1, 3, 2, 4]
    present = torch.arange(K).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    delta, adv, lab = sarsa_gae_labels(q, r, present, gamma, lam)
    for i, n in enumerate(counts):  # the reference recursion, turn by turn (test code)
        a = 0.0
        for k in reversed(range(n)):
            nxt = float(q[i, k + 1]) if k + 1 < n else 0.0
            d = float(r[i, k]) + gamma * nxt - float(q[i, k])
            a = d + gamma * lam * a
            assert float(delta[i, k]) == pytest.approx(d, abs=1e-5)
            assert float(adv[i, k]) == pytest.approx(a, abs=1e-5)
            assert float(lab[i, k]) == pytest.approx(a + float(q[i, k]), abs=1e-5)
        assert bool((lab[i, n:] == 0).all())
    # lam = 1: the labels are the discounted returns whatever q is (Monte Carlo); lam = 0: r + gamma q'
    _, _, mc = sarsa_gae_labels(q, r, present, gamma, 1.0)
    _, _, td = sarsa_gae_labels(q, r, present, gamma, 0.0)
    assert float(mc[0, 0]) == pytest.approx(sum(float(r[0, k]) * gamma ** k for k in range(4)), abs=1e-5)
    assert float(td[0, 1]) == pytest.approx(float(r[0, 1]) + gamma * float(q[0, 2]), abs=1e-5)


def test_one_step_td_labels_bootstrap_from_the_model_not_from_the_return():
    b, t, c = _chain_batch(NEW, iteration=0)
    td = _prm(lam=0.0)(t, b, c).helper_inputs["labels"]
    mc = _prm(lam=1.0)(t, b, c).helper_inputs["labels"]
    R = torch.tensor([REWARD[e] for e in NEW])
    # a fresh model (promises 0): the one-step TD label of turn 0 is r_0 + gamma * 0 = 0; the return would be gamma R
    assert torch.allclose(td[:, 0], torch.zeros(4)) and torch.allclose(td[:, 1], R)
    assert torch.allclose(mc[:, 0], GAMMA * R)


def _with_ground_truth(batch, episodes):
    for tr, (a0, a1) in zip(batch.trajectories, episodes):
        q = [GAMMA * 0.5 * (REWARD[(a0, "L")] + REWARD[(a0, "R")]), REWARD[(a0, a1)]]
        tr.ground_truth = GroundTruthCredit(value=[0.0, 0.0], q_value=q, advantage=[0.0, 0.0], decisive=[False, False])
    return batch


def test_promises_fit_the_exact_q_of_a_deterministic_chain_over_iterations():
    """Uniform policy at turn 1: Q(s0, A) = gamma * (r(A,L) + r(A,R)) / 2. One-step TD (lam = 0) labels
    only reach turn 0 once turn 1 is learnt: the promises converge over the iterations."""
    eps = [("A", "L"), ("A", "R"), ("B", "L"), ("B", "R")] * 2
    b, t, c = _chain_batch(eps, iteration=0)
    _with_ground_truth(b, eps)
    m = _prm(lam=0.0)
    for it in range(4):
        res = m(t, b, c)
        fit = m.update_helpers(res, seed=it)
        assert fit["prm_loss_after"] <= fit["prm_loss_before"] + 1e-6
    true = {("s0", "A"): GAMMA * 0.5, ("s0", "B"): GAMMA * 0.25, **{k: REWARD[k] for k in REWARD}}
    for k, v in true.items():
        assert _promise(m, k) == pytest.approx(v, abs=0.05), k
    res = m(t, b, c)
    # the logged agreement with the exact Q: the promises rank the turns as the exact Q does; the one-step
    # labels less so (turn 0's label is gamma * M(s1, a1) of the action sampled next, not its mean)
    assert res.stats["agentprm_model_gt_spearman"] > 0.95
    assert 0.3 < res.stats["agentprm_gt_spearman"] < res.stats["agentprm_model_gt_spearman"]
    # progress: turn 1 of (A, R) gained r - V(s1A) = 1 - 0.5; turn 0 of A: Q(s0, A) - mean_group Q(s0, .)
    assert float(res.credit[1, 1]) == pytest.approx(0.5, abs=0.07)
    assert float(res.credit[1, 0]) == pytest.approx(GAMMA * 0.125, abs=0.05)


def test_differential_vs_grpo():
    """One turn per row and a fitted model: promise = R, progress = R - group mean = Dr. GRPO. Two
    turns, deterministic current policy: GRPO credits turn 1 with the outcome, AgentPRM's progress
    there is r - V(s1) = 0."""
    rows = [(g, [3], float(r)) for g in range(3) for r in (0.0, 1.0, 1.0, 0.25)]
    b, t, _ = make_batch(rows)
    ctx = CreditContext(hidden_states=torch.randn(*t.response_mask.shape, 16, generator=torch.Generator().manual_seed(0)))
    cls = get_method_class("agentprm")
    m = cls(cls.Config(prm_steps=600, prm_lr=1e-2))
    m.build_helpers(16, seed=0)
    m.update_helpers(m(t, b, ctx), seed=0)
    drgrpo = build_method(get_method_class("grpo").Config(norm_adv_by_std=False))(t, Batch([]), CreditContext())
    assert torch.allclose(m(t, b, ctx).advantages, drgrpo.advantages, atol=0.03)

    b2, t2, c2 = _chain_batch(NEW, iteration=0)
    m2 = _prm(lam=1.0)
    m2.update_helpers(m2(t2, b2, c2), seed=0)
    res = m2(t2, b2, c2)
    grpo = build_method(get_method_class("grpo").Config(norm_adv_by_std=False))(t2, Batch([]), CreditContext())
    seg = turn_segments(t2)
    assert grpo.advantages.gather(1, seg.starts[:, 1:2]).abs().min() > 0.2
    assert res.credit[:, 1].abs().max() < 0.05


def test_the_model_persists_in_the_checkpoint_and_config_errors(tmp_path):
    from stages.update.checkpoint import load_checkpoint, save_checkpoint

    b, t, c = _chain_batch(NEW, iteration=0)
    m = _prm(prm_steps=20)
    m.update_helpers(m(t, b, c), seed=0)
    model = torch.nn.Linear(2, 2)  # stands in for the policy: the helpers are what is checked
    path = save_checkpoint(tmp_path, "iter_0000", model, helpers=m.helper_modules())
    fresh = _prm()
    load_checkpoint(path, model, None, fresh.helper_modules())
    assert torch.equal(fresh(t, b, c).advantages, m(t, b, c).advantages)
    cls = get_method_class("agentprm")
    for kw, key in [({"gamma": 0.0}, "gamma"), ({"lam": 1.5}, "lam"), ({"prm_steps": 0}, "prm_steps")]:
        with pytest.raises(Exception) as e:
            cls(cls.Config(**kw))
        assert key in str(e.value) and "\n" not in str(e.value)
