"""GiGPO (Feng et al. 2025 §3; survey §5.3): episode-level GRPO advantage plus the step-level
advantage of each action among the group's steps from the same anchor state."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.methods.agentic_group import anchor_ids, similarity_clusters
from stages.credit.registry import build_method, get_method_class
from tests.agentic_batches import batch, trajectory


def _run(b, **cfg):
    return build_method(get_method_class("gigpo").Config(**cfg))(b.to_tensors(), b, CreditContext())


def _grpo(b, by_std=True):
    t = b.to_tensors()
    return F.grpo(t.token_level_rewards, t.response_mask, t.index, norm_adv_by_std=by_std)[0]


def _turn_adv(res, b, row, turn):
    """The advantage on the tokens of ``turn`` of ``row`` (all equal: checked)."""
    a, e = b.trajectories[row].turns[turn].action_span
    vals = res.advantages[row, a:e]
    assert torch.all(vals == vals[0])
    return float(vals[0])


def test_same_anchor_state_same_step_group_distinct_states_never():
    b = batch(trajectory("a", 0, ["s0", "s1", "s0"], 1.0), trajectory("b", 0, ["s0", "s2"], 0.0),
              trajectory("c", 1, ["s0", ""], 0.0))
    sid = anchor_ids(b, 3)
    assert sid[0, 0] == sid[0, 2] == sid[1, 0] == sid[2, 0]  # the same key, within and across rows
    assert len({int(sid[0, 1]), int(sid[1, 1]), int(sid[0, 0])}) == 3  # distinct keys, distinct ids
    assert sid[2, 1] == -1 and sid[1, 2] == -1  # no state key / no turn
    # the step group is (episode group, anchor): row c's s0 is alone in group 1, so its A_S is 0
    res = _run(b, mode="mean_norm")
    ep = _grpo(b, by_std=False)
    assert _turn_adv(res, b, 2, 0) == pytest.approx(float(ep[2, 0]))
    assert res.stats["grouped_step_fraction"] == pytest.approx(3 / 7)  # a0, a2, b0 of 7 steps
    assert res.stats["step_groups"] == 1 and res.stats["anchored_step_fraction"] == pytest.approx(6 / 7)


def test_all_anchors_distinct_is_grpo_exactly():
    b = batch(trajectory("a", 0, ["x0", "x1"], 1.0), trajectory("b", 0, ["y0", "y1", "y2"], 0.0),
              trajectory("c", 0, ["z0"], 1.0), trajectory("d", 1, ["u0"], 0.0), trajectory("e", 1, ["v0"], 1.0))
    for mode, by_std in (("mean_std_norm", True), ("mean_norm", False)):
        res = _run(b, mode=mode)
        assert torch.equal(res.advantages, _grpo(b, by_std))
        assert res.stats["grouped_step_fraction"] == 0.0 and res.stats["step_adv_abs_mean"] == 0.0


def test_from_a_shared_state_the_step_leading_to_success_gets_higher_step_advantage():
    # both start in s0; a then reaches the goal, b falls into the hole; c revisits s0 and fails
    b = batch(trajectory("a", 0, ["s0", "s1"], 1.0), trajectory("b", 0, ["s0", "s3"], 0.0),
              trajectory("c", 0, ["s0", "s0", "s3"], 0.0))
    res = _run(b, step_advantage_w=1.0)
    ep = _grpo(b)
    step = [_turn_adv(res, b, r, 0) - float(ep[r, 0]) for r in range(3)]
    assert step[0] > 0 > step[1] and step[0] > step[2]
    zero_w = _run(b, step_advantage_w=0.0)  # omega = 0 is GRPO exactly, even with shared anchors
    assert torch.equal(zero_w.advantages, ep)


def test_hand_computed_two_trajectory_example():
    """a: s0 -> s1 -> goal (R=1); b: s0 -> s2 -> hole (R=0); gamma=0.5, mean_norm, omega=2.
    A_E = +-0.5. Step group {a0, b0}: G_a0 = 0.5*1, G_b0 = 0, mean 0.25: A_S = +-0.25.
    s1, s2 are singletons: A_S = 0. So a: [0.5 + 0.5, 0.5], b: [-0.5 - 0.5, -0.5]."""
    b = batch(trajectory("a", 0, ["s0", "s1"], 1.0), trajectory("b", 0, ["s0", "s2"], 0.0))
    res = _run(b, mode="mean_norm", gamma=0.5, step_advantage_w=2.0)
    got = [[_turn_adv(res, b, r, k) for k in range(2)] for r in range(2)]
    assert got == [[1.0, 0.5], [-1.0, -0.5]]
    assert torch.equal(res.advantages[:, 2], torch.zeros(2))  # observation tokens carry nothing
    assert torch.allclose(res.credit, torch.tensor([[1.0, 0.5], [-1.0, -0.5]]))
    # mean_std_norm: std of {0.5, 0} is 0.3536 -> A_S = +-0.7071, A_E = +-0.7071
    s = _run(b, gamma=0.5, step_advantage_w=1.0)
    assert _turn_adv(s, b, 0, 0) == pytest.approx(2 * 0.5 / (0.5 ** 0.5 + 1e-6), rel=1e-5)
    assert _turn_adv(s, b, 1, 1) == pytest.approx(-0.5 / (0.5 ** 0.5 + 1e-6), rel=1e-5)


def _reference_gigpo(b, gamma, w, eps=1e-6):
    """Independent loop implementation after verl-agent's build_step_group / step_norm_reward:
    per-turn discounted returns, dict step groups keyed by (group, state), torch.std."""
    rows = b.trajectories
    scores = defaultdict(list)
    total = [tr.reward + sum(t.reward for t in tr.turns) for tr in rows]  # the episode return R(tau)
    for tr, r in zip(rows, total):
        scores[tr.group_id].append(r)
    ep = []
    for tr, r in zip(rows, total):
        s = torch.tensor(scores[tr.group_id], dtype=torch.float64)
        ep.append(0.0 if len(s) == 1 else float((r - s.mean()) / (s.std() + eps)))
    rets = []
    for tr in rows:
        rs = [t.reward for t in tr.turns]
        rs[-1] += tr.reward
        g, out = 0.0, []
        for r in reversed(rs):
            g = r + gamma * g
            out.append(g)
        rets.append(out[::-1])
    groups = defaultdict(list)
    for i, tr in enumerate(rows):
        for k, t in enumerate(tr.turns):
            groups[(tr.group_id, t.state_key)].append(rets[i][k])
    out = []
    for i, tr in enumerate(rows):
        row = []
        for k, t in enumerate(tr.turns):
            vals = torch.tensor(groups[(tr.group_id, t.state_key)], dtype=torch.float64)
            a = 0.0 if len(vals) == 1 else float((rets[i][k] - vals.mean()) / (vals.std() + eps))
            row.append(ep[i] + w * a)
        out.append(row)
    return out


def test_differential_against_grpo_and_an_independent_loop_reference():
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for g in range(3):
        for j in range(4):
            n = int(torch.randint(1, 5, (1,), generator=gen))
            states = [f"s{int(x)}" for x in torch.randint(0, 3, (n,), generator=gen)]
            trs = torch.randint(0, 2, (n,), generator=gen).double().mul(0.1).tolist()
            trajs.append(trajectory(f"{g}{j}", g, states, float(torch.rand(1, generator=gen) > 0.5), turn_rewards=trs))
    b = batch(*trajs)
    res = _run(b, gamma=0.9, step_advantage_w=0.7)
    ref = _reference_gigpo(b, 0.9, 0.7)
    ep = _grpo(b)
    for i, tr in enumerate(trajs):
        for k in range(len(tr.turns)):
            assert _turn_adv(res, b, i, k) == pytest.approx(ref[i][k], abs=1e-5)
    assert res.stats["grouped_step_fraction"] > 0.5  # the comparison is not GRPO-vs-GRPO
    diff = (res.advantages - ep).abs().sum()
    assert float(diff) > 0


def test_similarity_anchor_variant():
    keys = ["pos=3 holes=5", "pos=3 holes=6", "pos=7 goal", "pos=3 holes=5"]
    assert similarity_clusters(keys, [0, 0, 0, 1], 0.9) == [0, 0, 1, 2]  # group 1 has its own clusters
    assert similarity_clusters(keys, [0, 0, 0, 0], 1.0) == [0, 1, 2, 0]
    b = batch(trajectory("a", 0, ["pos=3 holes=5"], 1.0), trajectory("b", 0, ["pos=3 holes=6"], 0.0))
    assert torch.equal(_run(b).advantages, _grpo(b))  # exact anchors: two singletons
    sim = _run(b, similarity_thresh=0.9, gamma=1.0, mode="mean_norm")
    assert _turn_adv(sim, b, 0, 0) == pytest.approx(0.5 + 0.5)  # one step group {a0, b0}


def test_no_extra_compute_and_config_rules():
    b = batch(trajectory("a", 0, ["s0", "s1"], 1.0), trajectory("b", 0, ["s0", "s2"], 0.0))
    ov = _run(b).overhead
    assert (ov.extra_forward_passes, ov.forward_tokens, ov.extra_tokens, ov.env_resets, ov.env_steps, ov.judge_calls) == (0,) * 6
    cls = get_method_class("gigpo")
    assert cls.needs == frozenset() and cls.needs_group
    with pytest.raises(ValueError, match=r"^credit.mode"):
        build_method(cls.Config(mode="std"))
    with pytest.raises(ValueError, match=r"^credit.step_advantage_w"):
        build_method(cls.Config(step_advantage_w=-1.0))
    with pytest.raises(ValueError, match=r"^credit.similarity_thresh"):
        build_method(cls.Config(similarity_thresh=0.0))
    from stages.schema import Batch

    with pytest.raises(ValueError, match=r"^credit method 'gigpo' reads each turn's state_key"):
        build_method(cls.Config())(b.to_tensors(), Batch([]), CreditContext())


def test_differential_on_the_real_bifurcation_environment():
    """On real bifurcation episodes (tests/test_credit_differential.py: per instance two right
    episodes, one wrong at the first decisive turn d1, one wrong at the second d2, the last
    turn), with their environment state keys: turns alone in their step group (off the track
    after a wrong decision) get GRPO's credit exactly; at d2, shared by the three on-track
    rollouts, the step advantage has the sign of the exact advantage. At d1 GiGPO credits the
    *realized* return from the shared state (Eq. 5, not a value): the episode that was right at
    d1 but failed at d2 gets the same negative step advantage as the one that was wrong at d1."""
    from tests.test_credit_differential import _turn_adv, bifurcation_batch

    b = bifurcation_batch()
    t = b.to_tensors()
    res = _run(b)
    grpo = _turn_adv(_grpo(b), t)
    ta = _turn_adv(res.advantages, t)
    step = ta - grpo
    exact, dec = t.gt_turn_advantage.double(), t.decisive
    key = t.index[:, None] * 1000 + anchor_ids(b, t.max_turns)
    size = (key[:, :, None, None] == key[None, None]).flatten(2).sum(-1)  # step-group size of each turn
    alone = size == 1
    assert alone.sum() >= 6 and torch.allclose(ta[alone], grpo[alone])
    for g in range(3):
        rows = [4 * g + e for e in range(4)]
        d1, d2 = [int(x) for x in torch.nonzero(dec[rows[0]]).flatten()]
        on_d2 = [r for r in rows if not alone[r, d2]]
        assert on_d2 == [rows[0], rows[1], rows[3]]  # row 2 went off the track at d1
        assert torch.all(torch.sign(step[on_d2, d2]) == torch.sign(exact[on_d2, d2]))
        assert size[rows[0], d1] == 4 and exact[rows[3], d1] > 0 > exact[rows[2], d1]
        assert step[rows[3], d1] == pytest.approx(float(step[rows[2], d1])) and step[rows[3], d1] < 0
