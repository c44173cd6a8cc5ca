"""Defining properties of the step-level process-reward methods PURE, SPRO and PRL (survey §3.3.1)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import stages.credit.methods.process as P  # registers pure, spro, prl
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.schema import Batch, Overhead, Trajectory, Turn

# --------------------------------------------------------------------------------------------
# batch builder (test data, not a mock)
# --------------------------------------------------------------------------------------------


def make_traj(uid: str, group: int, action_lens: list[int], obs_len: int = 0, reward: float = 0.0,
              logprobs: list[float] | None = None, seed: int = 0, turn_rewards: list[float] | None = None) -> Trajectory:
    rng = random.Random(seed)
    ids: list[int] = []
    mask: list[bool] = []
    turns = []
    for k, n in enumerate(action_lens):
        a = len(ids)
        ids += [rng.randint(3, 60) for _ in range(n)]
        mask += [True] * n
        b = len(ids)
        last = k == len(action_lens) - 1
        o = 0 if last else obs_len
        ids += [rng.randint(3, 60) for _ in range(o)]
        mask += [False] * o
        turns.append(Turn(index=k, action_span=(a, b), obs_span=(b, b + o), action_text=f"s{k}", observation="",
                          reward=(turn_rewards[k] if turn_rewards else 0.0)))
    if logprobs is None:
        logprobs = [-rng.random() * 2 if m else 0.0 for m in mask]
    return Trajectory(uid=uid, group_id=group, task_id=f"t{group}", env_name="test", prompt_ids=[1, 2, 3],
                      response_ids=ids, policy_mask=mask, logprobs=logprobs, entropies=[0.0] * len(ids),
                      turns=turns, reward=reward, success=reward > 0, prompt_text="p\n")


class FixedProcessRewards:
    """Test double of the ProcessRewards protocol: returns a given (B, K) tensor."""

    def __init__(self, rewards: torch.Tensor, overhead: Overhead | None = None):
        self.rewards, self.overhead, self.calls = rewards, overhead or Overhead(), 0

    def __call__(self, batch):
        self.calls += 1
        return self.rewards.clone(), self.overhead


def random_batch(seed: int, groups: int = 3, per_group: int = 4, obs_len: int = 2) -> Batch:
    rng = random.Random(seed)
    trajs = []
    for g in range(groups):
        for j in range(per_group):
            n_turns = rng.randint(1, 5)
            trajs.append(make_traj(f"{g}-{j}", g, [rng.randint(1, 4) for _ in range(n_turns)], obs_len=obs_len,
                                   reward=float(rng.random() < 0.5), seed=seed * 100 + g * 10 + j))
    return Batch(trajs)


def random_process_rewards(batch: Batch, seed: int, nan_frac: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    K = max(len(t.turns) for t in batch.trajectories)
    r = torch.rand(len(batch), K, generator=g)
    for i, t in enumerate(batch.trajectories):
        r[i, len(t.turns):] = float("nan")
    if nan_frac:
        drop = torch.rand(r.shape, generator=g) < nan_frac
        r[drop] = float("nan")
    return r


# --------------------------------------------------------------------------------------------
# PURE
# --------------------------------------------------------------------------------------------


def _pure(**kw):
    cls = get_method_class("pure")
    return cls(cls.Config(**kw))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_return_is_min_over_future_rewards(seed):
    batch = random_batch(seed)
    t = batch.to_tensors()
    r = random_process_rewards(batch, seed, nan_frac=0.15)
    res = _pure()(t, batch, CreditContext(process_rewards=FixedProcessRewards(r)))
    valid = P._step_valid(r, t.num_turns)
    G = P.min_form_returns(r, valid)
    for i, traj in enumerate(batch.trajectories):  # reference loop
        for k in range(len(traj.turns)):
            fut = [float(r[i, j]) for j in range(k, len(traj.turns)) if math.isfinite(float(r[i, j]))]
            if not math.isfinite(float(r[i, k])):
                assert math.isnan(float(G[i, k]))
            else:
                assert float(G[i, k]) == pytest.approx(min(fut), abs=0)
    # the returns handed to the update are the step's min-form return on its tokens
    for i, traj in enumerate(batch.trajectories):
        for k, turn in enumerate(traj.turns):
            a, b = turn.action_span
            expect = float(G[i, k]) if math.isfinite(float(G[i, k])) else 0.0
            assert torch.allclose(res.returns[i, a:b], torch.full((b - a,), expect))


def test_pure_single_bad_step_caps_every_earlier_step():
    batch = Batch([make_traj("a", 0, [2, 2, 2, 2, 2], obs_len=1, reward=1.0, seed=1),
                   make_traj("b", 0, [2, 2, 2, 2, 2], obs_len=1, reward=1.0, seed=2)])
    t = batch.to_tensors()
    good = torch.full((2, 5), 0.9)
    bad = good.clone()
    bad[0, 3] = 0.05  # one bad step in trajectory a
    res = _pure(outcome_weight=0.0)(t, batch, CreditContext(process_rewards=FixedProcessRewards(bad)))
    G = P.min_form_returns(bad, P._step_valid(bad, t.num_turns))
    assert torch.allclose(G[0, :4], torch.full((4,), 0.05))  # capped: steps 0..3
    assert float(G[0, 4]) == pytest.approx(0.9)  # after the bad step: not capped
    # sum-form would credit the early steps of a by the many good steps; min-form ranks a below b at every capped step
    assert (res.credit[0, :4] < res.credit[1, :4]).all()
    assert res.stats["capped_step_fraction"] == pytest.approx(3 / 10)


def test_pure_advantage_decomposition_and_mask():
    batch = random_batch(5)
    t = batch.to_tensors()
    r = random_process_rewards(batch, 5)
    res = _pure(process_weight=0.7, outcome_weight=0.3)(t, batch, CreditContext(process_rewards=FixedProcessRewards(r)))
    m = t.response_mask != 0
    assert (res.advantages[~m] == 0).all()
    G = P.min_form_returns(r, P._step_valid(r, t.num_turns))
    outcome = t.episode_rewards
    groups: dict[int, list[int]] = {}
    for i, tr in enumerate(batch.trajectories):
        groups.setdefault(tr.group_id, []).append(i)
    for i, tr in enumerate(batch.trajectories):
        others = [j for j in groups[tr.group_id] if j != i]
        b_proc = sum(float(G[j, 0]) for j in others) / len(others)
        a_out = float(outcome[i]) - sum(float(outcome[j]) for j in others) / len(others)
        for k, turn in enumerate(tr.turns):
            a, b = turn.action_span
            expect = 0.7 * (float(G[i, k]) - b_proc) + 0.3 * a_out
            assert torch.allclose(res.advantages[i, a:b], torch.full((b - a,), expect), atol=1e-6)
            assert float(res.credit[i, k]) == pytest.approx(expect, abs=1e-6)
        assert torch.isnan(res.credit[i, len(tr.turns):]).all()
    assert res.granularity == "step"


def test_pure_softmin_transform_tends_to_min():
    r = torch.tensor([[0.8, 0.3, 0.9, 0.6], [0.5, 0.5, float("nan"), float("nan")]])
    valid = torch.isfinite(r)
    G = P.softmin_returns(r, valid, temperature=1e-3)
    assert float(G[0, 0]) == pytest.approx(0.3, abs=1e-4)
    assert float(G[1, 0]) == pytest.approx(0.5, abs=1e-6)
    hot = P.softmin_returns(r, valid, temperature=1e3)  # T -> inf: plain mean of the steps
    assert float(hot[0, 0]) == pytest.approx(float(r[0].mean()), abs=1e-3)
    batch = random_batch(3)
    t = batch.to_tensors()
    pr = random_process_rewards(batch, 3)
    res = _pure(temperature=0.5)(t, batch, CreditContext(process_rewards=FixedProcessRewards(pr)))
    assert torch.isfinite(res.advantages).all()


def test_pure_records_overhead_and_needs_process_rewards():
    batch = random_batch(1)
    t = batch.to_tensors()
    src = FixedProcessRewards(random_process_rewards(batch, 1), Overhead(extra_forward_passes=7, env_steps=3))
    res = _pure()(t, batch, CreditContext(process_rewards=src))
    assert res.overhead.extra_forward_passes == 7 and res.overhead.env_steps == 3
    with pytest.raises(ValueError, match="needs \\['process_rewards'\\]"):
        _pure()(t, batch, CreditContext())
    with pytest.raises(ValueError, match="process rewards must have shape"):
        _pure()(t, batch, CreditContext(process_rewards=FixedProcessRewards(torch.zeros(2, 1))))


def test_pure_config_embeds_process_reward_fields():
    cfg = get_method_class("pure").Config()
    assert (cfg.method, cfg.process_reward, cfg.mc_k, cfg.prm_path) == ("pure", "step_check", 4, "")


# --------------------------------------------------------------------------------------------
# SPRO
# --------------------------------------------------------------------------------------------


def _spro(**kw):
    cls = get_method_class("spro")
    return cls(cls.Config(**kw))


def _ref_for(t, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t.old_logprobs - torch.rand(t.old_logprobs.shape, generator=g)) * t.response_mask


@pytest.mark.parametrize("seed", [0, 1])
def test_spro_masked_step_advantage_sums_to_zero_over_active_members(seed):
    batch = random_batch(seed, groups=3, per_group=5, obs_len=2)
    t = batch.to_tensors()
    ref = _ref_for(t, seed)
    res = _spro(beta=0.3)(t, batch, CreditContext(ref_logprobs=ref))
    msa = res.credit
    beta = 0.3
    # reference loop over policy-token ordinals ("steps" of SPRO's token-level MDP)
    pol = [[j for j, m in enumerate(tr.policy_mask) if m] for tr in batch.trajectories]
    cum = []
    for i, cols in enumerate(pol):
        acc, row = 0.0, []
        for j in cols:
            acc += beta * (float(t.old_logprobs[i, j]) - float(ref[i, j]))
            row.append(acc)
        cum.append(row)
    groups: dict[int, list[int]] = {}
    for i, tr in enumerate(batch.trajectories):
        groups.setdefault(tr.group_id, []).append(i)
    for members in groups.values():
        for s in range(max(len(pol[i]) for i in members)):
            active = [i for i in members if len(pol[i]) > s]
            base = sum(cum[i][s] for i in active) / len(active)
            vals = [float(msa[i, pol[i][s]]) for i in active]
            assert sum(vals) == pytest.approx(0.0, abs=1e-5)
            for i, v in zip(active, vals):
                assert v == pytest.approx(cum[i][s] - base, abs=1e-5)
    m = t.response_mask != 0
    assert (msa[~m] == 0).all() and (res.advantages[~m] == 0).all()
    a_out = F._grpo_scalars(t.token_level_rewards, t.response_mask, t.index, 1e-6, True)
    assert torch.allclose(res.advantages, (a_out.unsqueeze(1) + msa) * t.response_mask, atol=1e-6)


def test_spro_reduces_to_group_baseline_on_the_final_position():
    trajs = [make_traj(f"r{j}", 0, [3, 2], obs_len=2, reward=float(j % 2), seed=j) for j in range(4)]
    batch = Batch(trajs)
    t = batch.to_tensors()
    ref = _ref_for(t, 9)
    res = _spro(beta=0.5, outcome_weight=0.0)(t, batch, CreditContext(ref_logprobs=ref))
    seq = 0.5 * ((t.old_logprobs - ref) * t.response_mask).sum(-1)  # sequence-level implicit reward
    last = torch.tensor([max(j for j, m in enumerate(tr.policy_mask) if m) for tr in trajs])
    final = res.credit[torch.arange(4), last]
    assert torch.allclose(final, seq - seq.mean(), atol=1e-6)
    assert torch.allclose(res.advantages[torch.arange(4), last], seq - seq.mean(), atol=1e-6)


def test_spro_needs_reference_logprobs():
    batch = random_batch(0)
    t = batch.to_tensors()
    with pytest.raises(ValueError, match="needs \\['ref_logprobs'\\]"):
        _spro()(t, batch, CreditContext())
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        _spro()(t, batch, CreditContext(ref_logprobs=torch.zeros(1, 1)))


# --------------------------------------------------------------------------------------------
# PRL
# --------------------------------------------------------------------------------------------


def _prl(**kw):
    cls = get_method_class("prl")
    return cls(cls.Config(**kw))


@pytest.mark.parametrize("seed", [0, 3])
def test_prl_beta_zero_is_grpo_exactly(seed):
    batch = random_batch(seed)
    t = batch.to_tensors()
    res = _prl(beta=0.0)(t, batch, CreditContext(ref_logprobs=_ref_for(t, seed)))
    grpo = get_method_class("grpo")(get_method_class("grpo").Config())(t, batch, CreditContext())
    assert torch.equal(res.advantages, grpo.advantages)


def test_prl_process_rewards_decompose_the_kl_regularized_return():
    batch = random_batch(4, obs_len=3)
    t = batch.to_tensors()
    ref = _ref_for(t, 4)
    beta = 0.2
    res = _prl(beta=beta, norm_adv_by_std=False)(t, batch, CreditContext(ref_logprobs=ref))
    lr = (t.old_logprobs - ref) * t.response_mask
    r = res.returns
    for i, tr in enumerate(batch.trajectories):
        prev = float(t.episode_rewards[i])
        for k, turn in enumerate(tr.turns):
            a, b = turn.action_span
            cur = float(r[i, a])
            # r_{l-1} - r_l = beta * sum of the log-ratios of step l's tokens
            assert prev - cur == pytest.approx(beta * float(lr[i, a:b].sum()), abs=1e-5)
            prev = cur
        # last step: the entropy-regularized return R - beta log pi/pi_ref(y|x)
        assert prev == pytest.approx(float(t.episode_rewards[i]) - beta * float(lr[i].sum()), abs=1e-5)


def test_prl_optimal_policy_makes_final_process_reward_constant():
    """Corollary of PRL: under pi* ∝ pi_ref exp(R/beta), R - beta log pi*/pi_ref(y|x) = beta log Z
    for every response, so the final-step advantage vanishes."""
    beta, L = 0.5, 3
    g = torch.Generator().manual_seed(0)
    seqs = [tuple((s >> (L - 1 - j)) & 1 for j in range(L)) for s in range(2**L)]
    p1 = {}  # pi_ref(token=1 | prefix)

    def ref_p(prefix, tok):
        if prefix not in p1:
            p1[prefix] = float(torch.rand(1, generator=g)) * 0.8 + 0.1
        return p1[prefix] if tok == 1 else 1 - p1[prefix]

    R = {s: float(torch.rand(1, generator=g) < 0.5) for s in seqs}
    ref_seq = {s: math.prod(ref_p(s[:j], s[j]) for j in range(L)) for s in seqs}
    Z = sum(ref_seq[s] * math.exp(R[s] / beta) for s in seqs)
    star = {s: ref_seq[s] * math.exp(R[s] / beta) / Z for s in seqs}

    def prefix_mass(prefix):
        return sum(star[s] for s in seqs if s[: len(prefix)] == prefix)

    trajs, refs = [], []
    for n, s in enumerate(seqs):
        lp = [math.log(prefix_mass(s[: j + 1]) / prefix_mass(s[:j])) for j in range(L)]
        lr = [math.log(ref_p(s[:j], s[j])) for j in range(L)]
        tr = make_traj(f"s{n}", 0, [1] * L, obs_len=0, reward=R[s], seed=n)
        tr.response_ids = [10 + x for x in s]
        tr.logprobs = lp
        trajs.append(tr)
        refs.append(lr)
    batch = Batch(trajs)
    t = batch.to_tensors()
    ref = torch.tensor(refs, dtype=torch.float32)
    res = _prl(beta=beta, norm_adv_by_std=False)(t, batch, CreditContext(ref_logprobs=ref))
    final = res.returns[:, L - 1]
    assert torch.allclose(final, torch.full_like(final, beta * math.log(Z)), atol=1e-5)
    assert torch.allclose(res.credit[:, L - 1], torch.zeros(len(seqs)), atol=1e-5)
    # ... while a non-optimal policy (the reference itself) leaves R's spread in the final step
    t.old_logprobs.copy_(ref)
    res_flat = _prl(beta=beta, norm_adv_by_std=False)(t, batch, CreditContext(ref_logprobs=ref))
    assert float(res_flat.credit[:, L - 1].abs().max()) > 0.25


def test_prl_fixed_length_steps_skip_observations():
    m = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.float32)
    steps = P.fixed_length_steps(m, 2)
    assert steps.tolist() == [[0, 0, -1, -1, 1, 1, 2, -1, 2, -1]]
    batch = random_batch(2, obs_len=2)
    t = batch.to_tensors()
    res = _prl(step_unit="tokens", step_tokens=3)(t, batch, CreditContext(ref_logprobs=_ref_for(t, 2)))
    assert (res.advantages[t.response_mask == 0] == 0).all()
    with pytest.raises(ValueError, match="step_unit"):
        _prl(step_unit="lines")(t, batch, CreditContext(ref_logprobs=_ref_for(t, 2)))


def test_methods_are_vectorized_on_a_large_batch():
    """B=256 rows, R~2k: runs in one shot (no per-row/per-token Python loop on the hot path)."""
    g = torch.Generator().manual_seed(0)
    B, K, n = 256, 16, 120
    trajs = [make_traj(f"x{i}", i // 8, [n] * K, obs_len=4, reward=float(i % 3 == 0), seed=i,
                       logprobs=None) for i in range(B)]
    batch = Batch(trajs)
    t = batch.to_tensors()
    ref = _ref_for(t, 1)
    r = torch.rand(B, K, generator=g)
    for name, ctx in (("pure", CreditContext(process_rewards=FixedProcessRewards(r))),
                      ("spro", CreditContext(ref_logprobs=ref)), ("prl", CreditContext(ref_logprobs=ref))):
        cls = get_method_class(name)
        res = cls(cls.Config())(t, batch, ctx)
        assert res.advantages.shape == t.response_mask.shape
        assert torch.isfinite(res.advantages).all()
