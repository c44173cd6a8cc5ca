"""ArCHer (Zhou et al. 2024c; stages/credit/methods/agentic_critic.py): the off-policy TD critic
learns the *current* policy's turn Q from a replay buffer that holds an older policy's episodes
(a Monte Carlo regression on the same buffer does not), the turn advantage Q - V, the replay
buffer's FIFO and checkpoint round trip, differential vs GRPO, config errors."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny MLP fits: threads only contend on a shared machine

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import turn_segments, unit_ends
from stages.schema import Batch
from tests.test_turn_level import make_batch

GAMMA = 0.9
# the deterministic chain: s0 -a0 in {A, B}-> s1A / s1B -a1 in {L, R}-> end; terminal reward
REWARD = {("A", "L"): 0.0, ("A", "R"): 1.0, ("B", "L"): 0.0, ("B", "R"): 0.5}
Q_FEAT = {("s0", "A"): 0, ("s0", "B"): 1, ("A", "L"): 2, ("A", "R"): 3, ("B", "L"): 4, ("B", "R"): 5}
V_FEAT = {"A": 6, "B": 7}
H = 8


def _archer(**kw):
    cls = get_method_class("archer")
    kw = {"gamma": GAMMA, "critic_steps": 400, "critic_lr": 3e-2, "tau": 0.5, **kw}
    m = cls(cls.Config(**kw))
    m.build_helpers(H, seed=3)
    return m


def _chain_batch(episodes: list[tuple[str, str]], iteration: int):
    """Two-turn episodes ``(a0, a1)``, one group; hidden states one-hot: turn k's last policy token
    encodes (s_k, a_k), the observation token before turn 1 encodes s_1."""
    rows = [(0, [2, 2], REWARD[e]) for e in episodes]
    batch, t, _ = make_batch(rows)
    batch.iteration = iteration
    seg = turn_segments(t)
    ends, starts = unit_ends(seg), seg.starts
    hidden = torch.zeros(*t.response_mask.shape, H)
    for i, (a0, a1) in enumerate(episodes):  # building the hand-made features (test data, not a hot path)
        hidden[i, ends[i, 0], Q_FEAT[("s0", a0)]] = 1.0
        hidden[i, ends[i, 1], Q_FEAT[(a0, a1)]] = 1.0
        hidden[i, starts[i, 1] - 1, V_FEAT[a0]] = 1.0
    return batch, t, CreditContext(hidden_states=hidden)


def _q(m, name: tuple[str, str]) -> float:
    x = torch.zeros(H)
    x[Q_FEAT[name]] = 1.0
    with torch.no_grad():
        return float(m.critic.q(x))


OLD = [("A", "L"), ("B", "L")] * 2  # the older policy: always L at turn 1
NEW = [("A", "R"), ("B", "R"), ("A", "R"), ("B", "R")]  # the current policy: always R


def test_td_critic_learns_the_current_policys_q_from_a_stale_replay_buffer():
    m = _archer()
    b0, t0, c0 = _chain_batch(OLD, iteration=0)
    m.update_helpers(m(t0, b0, c0), seed=0)
    assert int(m.buffer.size) == 8 and int(m.buffer.held_iteration) == 0
    b1, t1, c1 = _chain_batch(NEW, iteration=1)
    res = m(t1, b1, c1)
    assert res.stats["replay_off_policy_fraction"] == pytest.approx(0.5)  # half the replay is the old policy's
    m.update_helpers(res, seed=0)
    assert int(m.buffer.size) == 16 and int(m.buffer.held_iteration) == 1
    # Q^pi of the current policy (R at turn 1): Q(s0, A) = gamma * r(A, R), the actions the old policy took keep
    # their own true values (r(A, L), r(B, L)): TD reproduces all of them
    true = {("s0", "A"): GAMMA * 1.0, ("s0", "B"): GAMMA * 0.5, ("A", "R"): 1.0, ("B", "R"): 0.5, ("A", "L"): 0.0,
            ("B", "L"): 0.0}
    for k, v in true.items():
        assert _q(m, k) == pytest.approx(v, abs=0.05), k
    # a Monte Carlo critic (the least-squares fit of Q on the buffer's returns; with one-hot features the mean
    # return of each (s, a)) learns the old/new mixture at the first turn and fails by gamma * 0.5
    returns = {("s0", a0): [] for a0 in "AB"}
    for a0, a1 in OLD + NEW:
        returns[("s0", a0)].append(GAMMA * REWARD[(a0, a1)])
    mc = {k: sum(v) / len(v) for k, v in returns.items()}
    assert abs(mc[("s0", "A")] - true[("s0", "A")]) > 0.4 and abs(mc[("s0", "B")] - true[("s0", "B")]) > 0.2
    assert abs(_q(m, ("s0", "A")) - mc[("s0", "A")]) > 0.35
    # the turn advantages with the fitted critic: turn 1 (the current policy's only action) A = Q - V = 0;
    # turn 0: Q(s0, a0) minus the group mean of Q(s0, .)
    seg = turn_segments(t1)
    adv_k = res.credit
    assert adv_k[:, 1].abs().max() < 0.05
    want0 = torch.tensor([GAMMA * 0.25, -GAMMA * 0.25] * 2)
    assert torch.allclose(adv_k[:, 0], want0, atol=0.05)
    first = res.advantages.gather(1, seg.starts[:, :1]).squeeze(1)
    assert torch.allclose(first, adv_k[:, 0])  # broadcast to the turn's tokens


def test_the_credit_stage_never_changes_the_live_critic_or_buffer():
    """The fit runs on copies; only update_helpers installs them (so a re-run credit stage, after a
    crash, starts from the checkpoint's critic and buffer and adds nothing twice)."""
    m = _archer(critic_steps=20)
    b0, t0, c0 = _chain_batch(NEW, iteration=0)
    before = {k: v.clone() for k, v in m.critic.state_dict().items()}
    r1, r2 = m(t0, b0, c0), m(t0, b0, c0)
    assert all(torch.equal(before[k], v) for k, v in m.critic.state_dict().items())
    assert int(m.buffer.size) == 0
    assert torch.equal(r1.advantages, r2.advantages)  # deterministic
    assert r1.stats["critic_q_loss_after"] < r1.stats["critic_q_loss_before"]


def test_replay_buffer_fifo_capacity_and_checkpoint_round_trip(tmp_path):
    from stages.update.checkpoint import load_checkpoint, save_checkpoint

    m = _archer(buffer_capacity=10, critic_steps=5)
    for it, eps in enumerate([OLD, NEW, OLD]):  # 8 transitions each: the newest 10 are kept
        b, t, c = _chain_batch(eps, iteration=it)
        m.update_helpers(m(t, b, c), seed=0)
    got = m.buffer.contents()["entry"]
    assert int(m.buffer.size) == 10 and int(m.buffer.held_iteration) == 2
    want = [(1, r, k) for r in range(3, 4) for k in range(2)] + [(2, r, k) for r in range(4) for k in range(2)]
    assert got.tolist() == [list(w) for w in want]  # oldest first, row-major, no duplicate
    model = torch.nn.Linear(2, 2)  # stands in for the policy: the helpers are what is checked
    path = save_checkpoint(tmp_path, "iter_0002", model, helpers=m.helper_modules())
    assert (path / "helper.archer_buffer.safetensors").is_file() and (path / "helper.archer_critic.safetensors").is_file()
    fresh = _archer(buffer_capacity=10)
    load_checkpoint(path, model, None, fresh.helper_modules())
    for k, v in m.buffer.contents().items():
        assert torch.equal(fresh.buffer.contents()[k], v), k
    assert all(torch.equal(v, fresh.critic.state_dict()[k]) for k, v in m.critic.state_dict().items())


def test_differential_vs_grpo():
    """One turn per row and a fitted critic: Q(s0, a0) = R and V(s0) = the group mean, so ArCHer's
    advantage is GRPO's without the std division (Dr. GRPO). Two turns: GRPO credits turn 1 of the
    chain with the episode's outcome, ArCHer with Q - V = 0 (the current policy has one action there)."""
    rows = [(g, [3], float(r)) for g in range(3) for r in (0.0, 1.0, 1.0, 0.25)]
    b, t, _ = make_batch(rows)
    hidden = torch.randn(*t.response_mask.shape, 16, generator=torch.Generator().manual_seed(0))
    m = get_method_class("archer")(get_method_class("archer").Config(critic_steps=600, critic_lr=1e-2))
    m.build_helpers(16, seed=0)
    arc = m(t, b, CreditContext(hidden_states=hidden)).advantages
    drgrpo = build_method(get_method_class("grpo").Config(norm_adv_by_std=False))(t, Batch([]), CreditContext()).advantages
    assert torch.allclose(arc, drgrpo, atol=0.03)

    m2 = _archer()
    b1, t1, c1 = _chain_batch(NEW, iteration=0)
    res = m2(t1, b1, c1)
    grpo = build_method(get_method_class("grpo").Config(norm_adv_by_std=False))(t1, Batch([]), CreditContext())
    seg = turn_segments(t1)
    g1 = grpo.advantages.gather(1, seg.starts[:, 1:2]).squeeze(1)
    assert g1.abs().min() > 0.2  # R - mean = +-0.25 on every turn
    assert res.credit[:, 1].abs().max() < 0.1  # (one iteration of fitting: V still trails its target)


def test_config_errors_are_one_line():
    cls = get_method_class("archer")
    for kw, key in [({"buffer_capacity": 0}, "buffer_capacity"), ({"tau": 0.0}, "tau"), ({"gamma": 1.5}, "gamma"),
                    ({"critic_steps": 0}, "critic_steps")]:
        with pytest.raises(Exception) as e:
            cls(cls.Config(**kw))
        msg = str(e.value)
        assert key in msg and "\n" not in msg
    with pytest.raises(ValueError, match="credit method 'archer': ctx.hidden_states must be"):
        b, t, _ = make_batch([(0, [2], 1.0), (0, [2], 0.0)])
        _archer()(t, b, CreditContext(hidden_states=torch.zeros(2, 1, H)))


def test_group_size_one_is_refused_before_compute():
    from flows.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match="group"):
        validate(load_config(["env=bifurcation", "credit=archer", "rollout.group_size=1"]))
