"""Defining properties of the turn-level credit methods (survey §5.1): ITPO's implicit turn
rewards and Norm-ITPO split (Wang et al. 2026) and Turn-PPO's GAE over turns (Li et al. 2025b),
with their differentials against GRPO / RLOO. The critic test trains the real value model of the
update stage (:class:`stages.update.trainer.PolicyTrainer`) on a tiny Qwen2 policy."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
import stages.credit.methods.turn_level as TL
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.credit.segments import turn_segments
from stages.schema import Batch, BatchTensors, Trajectory, Turn

OBS = 2  # observation tokens after every turn but the last


def make_batch(rows: list[tuple[int, list[int], float]], logratio: "list[list[float]] | None" = None,
               turn_rewards: "list[list[float]] | None" = None) -> tuple[Batch, BatchTensors, torch.Tensor]:
    """``rows``: (group id, action lengths of its turns, terminal reward). ``logratio[i]``: the
    log pi_old - log pi_ref of row i's *policy* tokens in order (default 0). Returns the batch, its
    tensors and the (B, R) reference log-probs (old log-probs are 0; observation tokens get a
    large bogus log-ratio that a correct method never reads)."""
    trajs, refs = [], []
    for i, (gid, lens, reward) in enumerate(rows):
        ids, mask, turns, ref = [], [], [], []
        lr = list(logratio[i]) if logratio is not None else [0.0] * sum(lens)
        for k, n in enumerate(lens):
            a = len(ids)
            ids += [5 + (a + j) % 50 for j in range(n)]
            mask += [True] * n
            ref += [-lr.pop(0) for _ in range(n)]
            b = len(ids)
            o = OBS if k < len(lens) - 1 else 0
            ids += [7] * o
            mask += [False] * o
            ref += [-100.0] * o
            tr = turn_rewards[i][k] if turn_rewards is not None else 0.0
            turns.append(Turn(index=k, action_span=(a, b), obs_span=(b, b + o), action_text="x", observation="",
                              reward=tr))
        trajs.append(Trajectory(uid=f"r{i}", group_id=gid, task_id=f"t{gid}", env_name="test", prompt_ids=[1, 2],
                                response_ids=ids, policy_mask=mask, logprobs=[0.0] * len(ids),
                                entropies=[0.0] * len(ids), turns=turns, reward=reward, success=reward > 0))
        refs.append(ref)
    batch = Batch(trajs)
    t = BatchTensors.from_batch(batch)
    R = t.response_mask.shape[1]
    ref = torch.zeros(len(rows), R)
    for i, r in enumerate(refs):
        ref[i, : len(r)] = torch.tensor(r)
    return batch, t, ref


def _method(name: str, **kw):
    cls = get_method_class(name)
    return cls(cls.Config(**kw))


def _per_turn(adv: torch.Tensor, t: BatchTensors) -> list[list[torch.Tensor]]:
    """The advantages of each turn's tokens, row by row."""
    seg = turn_segments(t)
    return [[adv[i][seg.seg_id[i] == k] for k in range(int(seg.count[i]))] for i in range(adv.shape[0])]


# --------------------------------------------------------------------------------------------
# ITPO
# --------------------------------------------------------------------------------------------

ROWS = [(0, [2, 3], 1.0), (0, [1, 2, 2], 0.0), (1, [3, 1], 1.0), (1, [2, 2], 1.0)]
LR = [[0.1, 0.2, -0.3, 0.4, 0.05], [0.5, -0.1, 0.2, 0.3, -0.2], [0.0, 0.1, 0.2, -0.4], [0.3, 0.3, -0.1, 0.1]]


def test_itpo_turn_reward_is_beta_times_the_logratio_summed_over_exactly_that_turn():
    batch, t, ref = make_batch(ROWS, LR)
    m = _method("itpo", beta=0.5)
    r, _, seg = m.turn_rewards(t, CreditContext(ref_logprobs=ref))
    # hand-computed: beta * sum of the turn's own tokens (observation tokens carry -100 and are skipped)
    want = 0.5 * torch.tensor([[0.1 + 0.2, -0.3 + 0.4 + 0.05, 0.0], [0.5, -0.1 + 0.2, 0.3 - 0.2],
                               [0.0 + 0.1 + 0.2, -0.4, 0.0], [0.3 + 0.3, -0.1 + 0.1, 0.0]])
    assert torch.allclose(r, want, atol=1e-6)
    # the data tells a wrong unit apart: the turns shifted by one token, or the whole response summed
    shifted = 0.5 * torch.tensor([0.1, 0.2 - 0.3 + 0.4 + 0.05])
    assert not torch.allclose(r[0, :2], shifted, atol=1e-3)
    assert not torch.allclose(r[:, 0], 0.5 * torch.tensor([sum(x) for x in LR]), atol=1e-3)
    res = m(t, batch, CreditContext(ref_logprobs=ref))
    assert torch.allclose(res.credit, want, atol=1e-6)  # the native credit is the implicit turn reward


def test_itpo_perturbing_one_turn_changes_only_that_turns_share():
    batch, t, ref = make_batch(ROWS, LR)
    m = _method("itpo")
    ctx = CreditContext(ref_logprobs=ref)
    r0, u0, _ = m.turn_rewards(t, ctx)
    ref2 = ref.clone()
    ref2[1, 3] -= 0.4  # row 1, turn 1's first token (turn 0: position 0, observation: 1-2)
    r1, u1, _ = m.turn_rewards(t, CreditContext(ref_logprobs=ref2))
    d = (r1 - r0).abs() > 1e-9
    assert d.sum() == 1 and bool(d[1, 1])  # the logit of that turn alone moved (before normalization)
    # after the softmax: that turn's share rose, the other turns of the row kept their ratio, other rows untouched
    rows_other = [0, 2, 3]
    assert torch.allclose(u1[rows_other], u0[rows_other])
    # row 1 has outcome 0: compare the proportions themselves
    seg = turn_segments(t)
    length = TL.unit_sums(t.response_mask, seg)
    p0 = TL.turn_proportions(r0, length, seg.present, m.cfg.temperature)
    p1 = TL.turn_proportions(r1, length, seg.present, m.cfg.temperature)
    assert p1[1, 1] > p0[1, 1]
    assert torch.allclose(p1[1, 0] / p1[1, 2], p0[1, 0] / p0[1, 2])


def test_norm_itpo_split_sums_to_the_outcome_and_follows_the_softmax():
    batch, t, ref = make_batch(ROWS, LR)
    m = _method("itpo", beta=0.5, temperature=0.7)
    r, u, seg = m.turn_rewards(t, CreditContext(ref_logprobs=ref))
    assert torch.allclose(u.sum(-1), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    # hand: row 2 turns of lengths 3 and 1; L = mean turn length over the batch's 9 turns = 18/9 = 2
    L = (2 + 3 + 1 + 2 + 2 + 3 + 1 + 2 + 2) / 9
    logits = torch.tensor([0.5 * 0.3 / 3, 0.5 * -0.4 / 1]) * L / 0.7
    assert torch.allclose(u[2, :2], torch.softmax(logits, 0), atol=1e-6)
    assert u[2, 2] == 0


def test_itpo_tokens_of_a_turn_share_one_advantage():
    batch, t, ref = make_batch(ROWS, LR)
    for kw in ({}, {"normalization": "none"}, {"baseline": "grpo", "whiten": False}):
        adv = _method("itpo", **kw)(t, batch, CreditContext(ref_logprobs=ref)).advantages
        for turns in _per_turn(adv, t):
            for a in turns:
                assert torch.allclose(a, a[:1].expand_as(a))
        assert torch.all(adv[t.response_mask == 0] == 0)
    # and the turns of a row do differ (return-to-go over turns, not one episode value)
    adv = _method("itpo", whiten=False)(t, batch, CreditContext(ref_logprobs=ref)).advantages
    pt = _per_turn(adv, t)
    assert not torch.allclose(pt[0][0][:1], pt[0][1][:1])


def _one_turn_rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = [(gi, [int(torch.randint(1, 5, (1,), generator=g))], float(torch.randint(0, 2, (1,), generator=g)))
            for gi in range(3) for _ in range(4)]
    lr = [(0.3 * torch.randn(n[0], generator=g)).tolist() for _, n, _ in rows]
    return rows, lr


@pytest.mark.parametrize("baseline,other", [("grpo", "grpo"), ("rloo", "rloo")])
def test_itpo_with_one_turn_per_trajectory_is_the_episode_baseline(baseline, other):
    """One turn: rho = 1 whatever the log-ratios, so ITPO's advantage is GRPO's / RLOO's."""
    rows, lr = _one_turn_rows(3)
    batch, t, ref = make_batch(rows, lr)
    itpo = _method("itpo", baseline=baseline, whiten=False)(t, batch, CreditContext(ref_logprobs=ref))
    base = _method(other)(t, batch, CreditContext())
    assert torch.allclose(itpo.advantages, base.advantages, atol=1e-5)
    assert itpo.advantages.abs().sum() > 0


def test_itpo_first_turn_gets_rloo_and_the_split_moves_credit_between_later_turns():
    """Multi-turn differential vs RLOO (groups of equal turn counts): the return-to-go of the first
    turn sums the whole outcome, so it is exactly RLOO's advantage for any log-ratios; the later
    turns get what the softmax split leaves them. At pi = pi_ref (uniform split) turn k of K gets
    (K - k) / K of RLOO's advantage."""
    rows = [(0, [2, 1, 3], 1.0), (0, [1, 1, 1], 0.0), (0, [2, 2, 2], 1.0), (1, [3, 2], 0.0), (1, [1, 1], 1.0)]
    g = torch.Generator().manual_seed(0)
    lr = [(0.5 * torch.randn(sum(n), generator=g)).tolist() for _, n, _ in rows]
    rloo = _method("rloo")
    batch, t, ref = make_batch(rows, lr)
    a_rloo = rloo(t, batch, CreditContext()).advantages
    first_rloo = [x[0][0] for x in _per_turn(a_rloo, t)]
    a = _method("itpo", whiten=False)(t, batch, CreditContext(ref_logprobs=ref)).advantages
    pt = _per_turn(a, t)
    for i in range(len(rows)):
        assert float(pt[i][0][0]) == pytest.approx(float(first_rloo[i]), abs=1e-5)
    # uniform split at pi = pi_ref
    batch0, t0, ref0 = make_batch(rows)
    a0 = _per_turn(_method("itpo", whiten=False)(t0, batch0, CreditContext(ref_logprobs=ref0)).advantages, t0)
    for i, (_, lens, _) in enumerate(rows):
        K = len(lens)
        for k in range(K):
            assert float(a0[i][k][0]) == pytest.approx((K - k) / K * float(first_rloo[i]), abs=1e-5)
    # with log-ratios the later turns differ from the uniform split (the implicit rewards moved credit)
    assert any(abs(float(pt[i][1][0]) - float(a0[i][1][0])) > 1e-3 for i in range(len(rows)) if first_rloo[i] != 0)


def test_plain_itpo_at_the_reference_is_rloo_on_every_turn():
    """normalization=none at pi = pi_ref: implicit turn rewards 0, the baselined outcome sits on the
    last turn, so every turn's return-to-go is RLOO's advantage (the outcome is baselined over the
    group's outcomes, not over per-turn means: a K-turn row would otherwise get a baseline of R/K)."""
    rows = [(0, [2, 1, 3], 1.0), (0, [1, 1], 0.0), (0, [2], 1.0), (1, [3, 2], 0.0), (1, [1, 1, 1, 1], 1.0)]
    batch, t, ref = make_batch(rows)
    a = _method("itpo", normalization="none", whiten=False)(t, batch, CreditContext(ref_logprobs=ref)).advantages
    assert torch.allclose(a, _method("rloo")(t, batch, CreditContext()).advantages, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Turn-PPO
# --------------------------------------------------------------------------------------------


def _loop_gae(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Reference GAE over the turn index, one turn at a time (V after the last turn = 0)."""
    adv, nxt, v_next = [0.0] * len(r), 0.0, 0.0
    for k in reversed(range(len(r))):
        delta = r[k] + gamma * v_next - v[k]
        nxt = delta + gamma * lam * nxt
        adv[k], v_next = nxt, v[k]
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.9), (0.5, 0.3), (1.0, 1.0), (0.9, 0.0)])
def test_turn_gae_equals_a_python_loop_over_turns(gamma, lam):
    g = torch.Generator().manual_seed(4)
    counts = [1, 4, 2, 5, 3]
    K = max(counts)
    present = torch.arange(K).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    r = torch.randn(len(counts), K, generator=g) * present
    v = torch.randn(len(counts), K, generator=g) * present
    adv, ret = TL.turn_gae(r, v, present, gamma, lam)
    for i, n in enumerate(counts):
        want = _loop_gae(r[i, :n].tolist(), v[i, :n].tolist(), gamma, lam)
        assert torch.allclose(adv[i, :n], torch.tensor(want), atol=1e-5)
        assert torch.allclose(ret[i, :n], torch.tensor(want) + v[i, :n], atol=1e-5)
        assert torch.all(adv[i, n:] == 0)


class FixedCritic:
    """A value function given as a (B, R) table (unit-test stand-in for the update stage's critic)."""

    def __init__(self, values: torch.Tensor):
        self.table = values

    def values(self, tensors: BatchTensors) -> torch.Tensor:
        return self.table * tensors.response_mask


TP_ROWS = [(0, [2, 3, 1], 1.0), (0, [1, 2], 0.0), (1, [3], 1.0), (1, [2, 2, 2, 1], 0.0)]
TP_TURN_R = [[0.5, -0.2, 0.0], [0.1, 0.0], [0.0], [0.0, 0.3, 0.0, 0.2]]


def test_turn_ppo_advantage_is_gae_over_turns_read_at_each_turns_first_token():
    batch, t, _ = make_batch(TP_ROWS, turn_rewards=TP_TURN_R)
    g = torch.Generator().manual_seed(5)
    table = torch.randn(t.response_mask.shape, generator=g)
    m = _method("turn_ppo", whiten=False)
    res = m(t, batch, CreditContext(critic=FixedCritic(table)))
    seg = turn_segments(t)
    pt = _per_turn(res.advantages, t)
    for i, (_, lens, R) in enumerate(TP_ROWS):
        starts = seg.starts[i, : len(lens)]
        v = table[i, starts].tolist()  # V(s_k): the value before the turn's first token
        r = list(TP_TURN_R[i])
        r[-1] += R
        want = _loop_gae(r, v, 0.99, 0.9)
        for k, a in enumerate(pt[i]):
            assert torch.allclose(a, torch.full_like(a, want[k]), atol=1e-5)  # one advantage per turn
        assert torch.allclose(res.returns[i][seg.seg_id[i] >= 0],
                              torch.cat([torch.full((n,), want[k] + v[k]) for k, n in enumerate(lens)]), atol=1e-5)
    # token-level GAE on the same critic and rewards gives other advantages (the test tells them apart)
    # (both whitened over the batch's policy tokens, as the gae method always is)
    tok = _method("gae", gamma=0.99, lam=0.9)(t, batch, CreditContext(critic=FixedCritic(table))).advantages
    turn = _method("turn_ppo")(t, batch, CreditContext(critic=FixedCritic(table))).advantages
    assert not torch.allclose(tok, turn, atol=1e-2)
    # overhead: the critic's forward pass over the batch, one per trajectory, its real tokens
    assert res.overhead.extra_forward_passes == len(TP_ROWS)
    assert res.overhead.forward_tokens == int(t.attention_mask.sum())


def test_turn_ppo_with_unit_discounts_and_a_zero_critic_is_the_return_grpo_without_the_group():
    rows = [(0, [2, 1], 1.0), (0, [1, 2, 2], 0.0), (0, [3], 1.0), (1, [1, 1], 0.0), (1, [2], 1.0)]
    batch, t, _ = make_batch(rows)
    zero = FixedCritic(torch.zeros(t.response_mask.shape))
    a = _method("turn_ppo", gamma=1.0, lam=1.0, whiten=False)(t, batch, CreditContext(critic=zero)).advantages
    R = t.episode_rewards.unsqueeze(1) * t.response_mask
    assert torch.allclose(a, R)
    # GRPO without std normalization is the same return minus the group mean: the difference is the group mean
    grpo = _method("grpo", norm_adv_by_std=False)(t, batch, CreditContext()).advantages
    gmean = torch.tensor([2 / 3] * 3 + [0.5] * 2).unsqueeze(1) * t.response_mask
    assert torch.allclose(a - grpo, gmean, atol=1e-6)


def test_turn_ppo_turn_targets_reduce_the_real_critics_loss():
    """The update stage's value model (a copy of the policy trunk + head) trained on Turn-PPO's turn
    targets (gamma = lam = 1: the Monte Carlo turn returns, fixed whatever the critic says) fits
    them: value loss falls, explained variance of the turn returns rises."""
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy, sequence_logprobs
    from stages.update.config import UpdateConfig
    from stages.update.trainer import PolicyTrainer

    torch.manual_seed(0)
    model, tok = build_tiny_policy(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                               num_kv_heads=1, vocab_size=300), ["go left\nok\ngo right\nno\n"] * 8)
    batch, t, _ = make_batch(TP_ROWS, turn_rewards=TP_TURN_R)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    t.old_logprobs = lp * t.response_mask
    trainer = PolicyTrainer(model, UpdateConfig(loss="turn_ppo", epochs=1, minibatch_size=len(TP_ROWS),
                                                critic_lr=3e-3, lr=1e-4), temperature=1.0, needs_critic=True)
    m = _method("turn_ppo", gamma=1.0, lam=1.0)
    losses, ev = [], []
    for step in range(25):
        res = m(t, batch, CreditContext(critic=trainer.critic))
        ev.append(res.stats["explained_variance"])
        losses.append(trainer.update(t, res, seed=step)["value_loss"])
    assert losses[-1] < 0.5 * losses[0]
    assert ev[-1] > ev[0] + 0.3


def test_turn_ppo_selects_its_turn_level_loss_unless_the_run_names_one():
    from flows.config import load_config

    assert load_config(["env=bifurcation", "credit=turn_ppo"])["update"].loss == "turn_ppo"
    assert load_config(["env=bifurcation", "credit=turn_ppo", "update=sorl"])["update"].loss == "sorl"
    assert load_config(["env=bifurcation", "credit=grpo"])["update"].loss != "turn_ppo"


def test_itpo_logs_how_far_the_split_is_from_uniform():
    batch, t, ref = make_batch(ROWS, LR)
    _, _, ref0 = make_batch(ROWS)
    s0 = _method("itpo")(t, batch, CreditContext(ref_logprobs=ref0)).stats
    s1 = _method("itpo")(t, batch, CreditContext(ref_logprobs=ref)).stats
    assert s0["proportion_excess_over_uniform"] == pytest.approx(0.0, abs=1e-6)  # pi = pi_ref: uniform
    assert s1["proportion_excess_over_uniform"] > 1e-3
