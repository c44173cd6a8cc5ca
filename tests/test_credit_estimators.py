"""Episode-level baseline estimators (survey §2.3, §2.5): vectorized vs loop reference,
defining properties of each method, and the registry wrappers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stages.credit import functional as F
from stages.credit.masked_stats import masked_mean, masked_var, masked_whiten, whiten_binary
from stages.credit.reverse_scan import reverse_discounted_scan
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class, method_names
from stages.schema import Batch, BatchTensors

try:  # the loop reference lives next to this file (tests/ is not a package)
    from tests import reference_estimators as ref
except ImportError:  # pragma: no cover - pytest's rootdir-relative import
    import reference_estimators as ref  # type: ignore[no-redef]

SEEDS = [0, 1, 2, 3, 4]
GROUP_SIZES = [8, 1, 2, 8, 2, 1, 8, 2]  # 32 rows, groups of size 1, 2 and 8
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


# --------------------------------------------------------------------------------------------
# random multi-turn batches
# --------------------------------------------------------------------------------------------


def _make_batch(seed: int, dtype: torch.dtype, T: int = 83, index_kind: str = "tensor"):
    """Random batch: multi-turn masks (policy spans separated by observation gaps, then padding),
    an all-zero-mask row, sparse turn rewards plus a 0/1 terminal reward, random values.

    For float32 the rewards are multiples of 1/8 so that episode sums are exact in float32 (the
    group statistics of flat or near-flat groups are otherwise ill-conditioned in any float32
    implementation, verl's included).
    """
    g = torch.Generator().manual_seed(seed)
    labels = np.concatenate([[k] * s for k, s in enumerate(GROUP_SIZES)])
    labels = labels[torch.randperm(len(labels), generator=g).numpy()]
    B = len(labels)
    mask = torch.zeros(B, T)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        t = 0
        n_turns = int(torch.randint(1, 5, (1,), generator=g))
        last = -1
        for _ in range(n_turns):
            a = int(torch.randint(1, 12, (1,), generator=g))
            o = int(torch.randint(0, 9, (1,), generator=g))
            if t + a > T:
                break
            mask[i, t : t + a] = 1
            last = t + a - 1
            rewards[i, last] += float(torch.randint(-8, 9, (1,), generator=g)) / 8  # turn reward
            rewards[i, t + a : min(T, t + a + o)] = torch.randn(min(T, t + a + o) - (t + a), generator=g).double()
            t += a + o
        if last >= 0:
            rewards[i, last] += float(torch.rand(1, generator=g) < 0.5)  # terminal 0/1 reward
    mask[int(torch.randint(0, B, (1,), generator=g))] = 0  # a row with no policy token at all
    if dtype == torch.float64:
        dense = torch.randn(B, T, generator=g, dtype=torch.float64) * (torch.rand(B, T, generator=g) < 0.2)
        rewards = rewards + 0.1 * dense
    else:
        rewards = torch.round(rewards * 8) / 8
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    if index_kind == "numpy_str":
        index = np.array([f"uid-{k}" for k in labels], dtype=object)
    elif index_kind == "list":
        index = [int(k) for k in labels]
    else:
        index = torch.as_tensor(labels, dtype=torch.long)
    return rewards.to(dtype), values.to(dtype), mask.to(dtype), index


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol:g}"


# --------------------------------------------------------------------------------------------
# vectorized vs loop reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
class TestAgainstReference:
    @pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
    def test_gae(self, seed, dtype, gamma, lam):
        r, v, m, _ = _make_batch(seed, dtype)
        adv, ret = F.gae(r, v, m, gamma, lam)
        ref_adv, ref_ret = ref.ref_gae(r, v, m, gamma, lam)
        assert adv.dtype == dtype and ret.dtype == dtype
        _close(adv, ref_adv, TOL[dtype])
        _close(ret, ref_ret, TOL[dtype])

    @pytest.mark.parametrize("norm", [True, False])
    def test_grpo(self, seed, dtype, norm):
        r, _, m, idx = _make_batch(seed, dtype)
        adv, ret = F.grpo(r, m, idx, norm_adv_by_std=norm)
        ref_adv, _ = ref.ref_grpo(r, m, idx, norm_adv_by_std=norm)
        _close(adv, ref_adv, TOL[dtype])
        assert torch.equal(adv, ret)

    def test_rloo(self, seed, dtype):
        r, _, m, idx = _make_batch(seed, dtype)
        adv, ret = F.rloo(r, m, idx)
        _close(adv, ref.ref_rloo(r, m, idx)[0], TOL[dtype])
        assert torch.equal(adv, ret)

    @pytest.mark.parametrize("gamma", [1.0, 0.97])
    @pytest.mark.parametrize("reset", [False, True])
    def test_reinforce_pp(self, seed, dtype, gamma, reset):
        r, _, m, _ = _make_batch(seed, dtype)
        adv, ret = F.reinforce_pp(r, m, gamma, reset_at_observations=reset)
        ref_adv, ref_ret = ref.ref_reinforce_pp(r, m, gamma, reset_at_observations=reset)
        _close(adv, ref_adv, TOL[dtype])
        _close(ret, ref_ret, TOL[dtype])

    def test_reinforce_pp_baseline(self, seed, dtype):
        r, _, m, idx = _make_batch(seed, dtype)
        adv, ret = F.reinforce_pp_baseline(r, m, idx)
        _close(adv, ref.ref_reinforce_pp_baseline(r, m, idx)[0], TOL[dtype])
        assert torch.equal(adv, ret)

    def test_remax(self, seed, dtype):
        r, _, m, _ = _make_batch(seed, dtype)
        b = torch.randn(r.shape[0], generator=torch.Generator().manual_seed(seed)).to(dtype)
        adv, ret = F.remax(r, b, m)
        ref_adv, ref_ret = ref.ref_remax(r, b, m)
        _close(adv, ref_adv, TOL[dtype])
        _close(ret, ref_ret, TOL[dtype])


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_scan_independent_of_chunk_size(chunk):
    r, v, m, _ = _make_batch(11, torch.float64, T=130)
    _close(F.gae(r, v, m, 0.99, 0.95, chunk=chunk)[0], ref.ref_gae(r, v, m, 0.99, 0.95)[0], 1e-9)
    for reset in (False, True):
        got = F.reinforce_pp(r, m, 0.9, chunk=chunk, reset_at_observations=reset)[1]
        _close(got, ref.ref_reinforce_pp(r, m, 0.9, reset_at_observations=reset)[1], 1e-9)


def test_long_sequences_float32():
    """T = 2048 (32 chunks): the chunk carry stays accurate in float32."""
    g = torch.Generator().manual_seed(5)
    B, T = 6, 2048
    m = (torch.rand(B, T, generator=g) > 0.2).float()
    r = torch.zeros(B, T)
    r[:, -1] = 1.0
    r[:, ::97] = 0.5
    v = torch.rand(B, T, generator=g)
    for gamma, lam in [(1.0, 0.95), (1.0, 1.0)]:
        _close(F.gae(r, v, m, gamma, lam)[0], ref.ref_gae(r, v, m, gamma, lam)[0], 1e-5)
    _close(F.reinforce_pp(r, m, 0.999)[0], ref.ref_reinforce_pp(r, m, 0.999)[0], 1e-5)


@pytest.mark.parametrize("coef", [1.0, 0.95, 0.0, -0.5, 1.01])
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_reverse_scan_matches_recurrence(coef, chunk):
    """The chunked scan (matmul carry for |coef| <= 1, chunk loop otherwise) solves y_t = x_t + c y_{t+1}."""
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expect = torch.zeros_like(x)
    acc = torch.zeros(3, dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + coef * acc
        expect[:, t] = acc
    got = reverse_discounted_scan(x, coef, chunk=chunk)
    _close(got, expect, 1e-12 * float(expect.abs().max()))


@pytest.mark.parametrize("kind", ["numpy_str", "list", "tensor"])
def test_index_kinds_agree(kind):
    r, _, m, idx = _make_batch(3, torch.float64, index_kind=kind)
    r2, _, m2, idx_t = _make_batch(3, torch.float64, index_kind="tensor")
    assert torch.equal(r, r2)
    for fn in (F.grpo, F.rloo, F.reinforce_pp_baseline):
        _close(fn(r, m, idx)[0], fn(r, m, idx_t)[0], 1e-12)


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------


def test_masked_statistics_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 13, generator=g, dtype=torch.float64)
    m = (torch.rand(7, 13, generator=g) > 0.4).double()
    sel = x[m.bool()]
    assert torch.allclose(masked_mean(x, m), sel.mean())
    assert torch.allclose(masked_mean(x, m, axis=-1), (x * m).sum(-1) / (m.sum(-1) + 1e-8))
    assert torch.allclose(masked_var(x, m), sel.var(unbiased=True))
    assert torch.allclose(masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    w = masked_whiten(x, m)
    assert torch.allclose(w, (x - sel.mean()) * torch.rsqrt(sel.var() + 1e-8))
    assert torch.allclose(masked_whiten(x, m, shift_mean=False), w + sel.mean())
    assert torch.equal(whiten_binary(x, m), w)  # the estimators' fast path gives the same numbers
    x_nan = x.masked_fill(~m.bool(), float("nan"))
    assert torch.allclose(masked_mean(x_nan, m), sel.mean())  # NaNs outside the mask ignored


def test_masked_var_needs_two_entries():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="at least one"):
        masked_var(x, torch.zeros(2, 3))
    one = torch.zeros(2, 3)
    one[0, 1] = 1
    with pytest.raises(ValueError, match="one"):
        masked_whiten(x, one)


# --------------------------------------------------------------------------------------------
# defining properties
# --------------------------------------------------------------------------------------------


def _scalars(adv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-row advantage, asserting it is the same on every policy token and zero elsewhere."""
    assert torch.all(adv[m == 0] == 0), "advantage must be zero outside response_mask"
    has = m.sum(-1) > 0
    first = torch.where(has, m.argmax(-1), torch.zeros_like(has, dtype=torch.long))
    s = adv.gather(1, first[:, None]).squeeze(1)
    spread = ((adv - s[:, None]).abs() * m).amax(-1)
    assert torch.all(spread <= 1e-12), "episode-level advantage must be equal on every policy token"
    return s


def _groups(idx) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, k in enumerate(torch.as_tensor(idx).tolist()):
        out.setdefault(k, []).append(i)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_properties(seed):
    r, _, m, idx = _make_batch(seed, torch.float64)
    m = torch.ones_like(m)  # every row has policy tokens, so every scalar is visible
    adv, _ = F.grpo(r, m, idx, epsilon=0.0)
    s = _scalars(adv, m)
    scores = r.sum(-1)
    for members in _groups(idx).values():
        a = s[members]
        if len(members) == 1:
            assert torch.allclose(a, scores[members])  # verl: mean 0, std 1
            continue
        assert abs(float(a.sum())) < 1e-9  # group-centred
        if float(scores[members].std()) > 1e-9:
            assert abs(float(a.std(unbiased=True)) - 1.0) < 1e-9  # unit unbiased std
    # without std normalization: s - group mean
    adv0, _ = F.grpo(r, m, idx, norm_adv_by_std=False)
    s0 = _scalars(adv0, m)
    for members in _groups(idx).values():
        expect = scores[members] - (scores[members].mean() if len(members) > 1 else 0.0)
        assert torch.allclose(s0[members], expect)


def test_grpo_zero_outside_mask_and_flat_group():
    r, _, m, idx = _make_batch(2, torch.float64)
    adv, _ = F.grpo(r, m, idx)
    _scalars(adv, m)
    flat = torch.ones(4, 5, dtype=torch.float64)
    adv, _ = F.grpo(flat, torch.ones(4, 5), [0, 0, 0, 0])
    assert torch.all(adv == 0)  # a group whose rollouts all score the same gives no signal


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_leave_one_out(seed):
    r, _, m, idx = _make_batch(seed, torch.float64)
    m = torch.ones_like(m)
    s = _scalars(F.rloo(r, m, idx)[0], m)
    scores = r.sum(-1)
    for members in _groups(idx).values():
        for i in members:
            others = [j for j in members if j != i]
            expect = scores[i] - scores[others].mean() if others else scores[i]
            assert abs(float(s[i] - expect)) < 1e-9


def _policy_return(r: torch.Tensor, m: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted sum of the rewards on the policy tokens from t on (per row loop; test helper)."""
    out = torch.zeros_like(r)
    for i in range(r.shape[0]):
        acc = 0.0
        for t in range(r.shape[1] - 1, -1, -1):
            if m[i, t]:
                acc = float(r[i, t]) + gamma * acc
                out[i, t] = acc
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_lambda_one_is_whitened_return_minus_value(seed):
    r, v, m, _ = _make_batch(seed, torch.float64)
    adv, ret = F.gae(r, v, m, gamma=1.0, lam=1.0)
    G = _policy_return(r, m)
    pol = m.bool()
    _close(adv[pol], masked_whiten(G - v, m)[pol], 1e-9)
    _close(ret[pol], G[pol], 1e-9)  # value targets are the Monte-Carlo returns


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_lambda_zero_is_whitened_td_error(seed):
    r, v, m, _ = _make_batch(seed, torch.float64)
    gamma = 0.9
    adv, _ = F.gae(r, v, m, gamma=gamma, lam=0.0)
    td = torch.zeros_like(r)
    for i in range(r.shape[0]):
        nxt = 0.0
        for t in range(r.shape[1] - 1, -1, -1):
            if m[i, t]:
                td[i, t] = r[i, t] + gamma * nxt - v[i, t]  # bootstraps from the next policy token
                nxt = float(v[i, t])
    pol = m.bool()
    _close(adv[pol], masked_whiten(td, m)[pol], 1e-9)


def _insert_observations(x: torch.Tensor, m: torch.Tensor, where: list[int], n: int, g: torch.Generator):
    """Insert ``n`` random masked (observation) tokens before each column in ``where``."""
    cols, mcols = [], []
    for t in range(x.shape[1]):
        if t in where:
            cols.append(torch.randn(x.shape[0], n, generator=g, dtype=x.dtype) * 5)
            mcols.append(torch.zeros(x.shape[0], n, dtype=m.dtype))
        cols.append(x[:, t : t + 1])
        mcols.append(m[:, t : t + 1])
    return torch.cat(cols, 1), torch.cat(mcols, 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_observation_tokens_are_transparent(seed):
    """Observation tokens between turns change neither GAE nor REINFORCE++ on policy tokens."""
    g = torch.Generator().manual_seed(seed)
    B, T = 9, 40
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.ones(B, T, dtype=torch.float64)
    where = [5, 17, 18, 33]
    r2, m2 = _insert_observations(r, m, where, 4, g)
    v2, _ = _insert_observations(v, m, where, 4, g)
    pol = m2.bool()
    a, ret = F.gae(r, v, m, 0.99, 0.95)
    a2, ret2 = F.gae(r2, v2, m2, 0.99, 0.95)
    _close(a2[pol].view(B, T), a, 1e-9)
    _close(ret2[pol].view(B, T), ret, 1e-9)
    a, ret = F.reinforce_pp(r, m, 0.97)
    a2, ret2 = F.reinforce_pp(r2, m2, 0.97)
    _close(a2[pol].view(B, T), a, 1e-9)
    _close(ret2[pol].view(B, T), ret, 1e-9)
    assert torch.all(ret2[~pol] == 0) and torch.all(a2[~pol] == 0)


def test_reinforce_pp_legacy_resets_at_observation_gap():
    r = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    _, ret = F.reinforce_pp(r, m, 1.0)
    assert ret.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0]]  # the final reward reaches turn 1
    _, ret = F.reinforce_pp(r, m, 1.0, reset_at_observations=True)
    assert ret.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]  # older verl: cut at the gap


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_baseline_is_whitened(seed):
    r, _, m, idx = _make_batch(seed, torch.float64)
    adv, _ = F.reinforce_pp_baseline(r, m, idx)
    sel = adv[m.bool()]
    assert abs(float(sel.mean())) < 1e-9  # zero mean over policy tokens
    assert abs(float(sel.var(unbiased=True)) - 1.0) < 1e-6  # unit variance (up to the 1e-8 floor)
    _scalars(adv, m)


def test_remax_subtracts_greedy_baseline():
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 3.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv, ret = F.remax(r, torch.tensor([0.5, 1.0]), m)
    assert ret.tolist() == [[1.0, 1.0, 0.0, 0.0], [8.0, 8.0, 8.0, 5.0]]
    assert adv.tolist() == [[0.5, 0.5, -0.5, 0.0], [7.0, 7.0, 7.0, 4.0]]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_bad_shapes_raise_clear_errors():
    r, m = torch.zeros(4, 6), torch.ones(4, 6)
    with pytest.raises(ValueError, match="values has shape"):
        F.gae(r, torch.zeros(4, 5), m, 1.0, 0.95)
    with pytest.raises(ValueError, match="response_mask has shape"):
        F.grpo(r, torch.ones(4, 7), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\(bs, response_length\)"):
        F.reinforce_pp(torch.zeros(6), torch.ones(6), 1.0)
    with pytest.raises(ValueError, match="index has 3 entries"):
        F.rloo(r, m, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="reward_baselines"):
        F.remax(r, torch.zeros(4, 1), m)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def _tensors(rewards: torch.Tensor, mask: torch.Tensor, index) -> BatchTensors:
    B, R = rewards.shape
    P = 3
    ids = torch.arange(B * (P + R)).view(B, P + R) % 50
    attn = torch.ones(B, P + R, dtype=torch.long)
    turn_ids = torch.where(mask.bool(), torch.zeros(B, R, dtype=torch.long), torch.full((B, R), -1))
    return BatchTensors(
        input_ids=ids,
        attention_mask=attn,
        position_ids=attn.cumsum(-1) - 1,
        prompt_len=P,
        response_ids=ids[:, P:],
        response_mask=mask.float(),
        old_logprobs=torch.zeros(B, R),
        entropies=torch.zeros(B, R),
        token_level_rewards=rewards.float(),
        episode_rewards=rewards.sum(-1).float(),
        index=torch.as_tensor(index, dtype=torch.long),
        turn_ids=turn_ids,
        num_turns=torch.ones(B, dtype=torch.long),
    )


class _FakeCritic:
    def __init__(self, values: torch.Tensor):
        self.v = values
        self.calls = 0

    def values(self, tensors: BatchTensors) -> torch.Tensor:
        self.calls += 1
        return self.v


EXPECTED = {
    # name: (granularity, needs, methodology)
    "grpo": ("episode", frozenset(), "MC (group baseline)"),
    "rloo": ("episode", frozenset(), None),
    "reinforce_pp": ("token", frozenset(), None),
    "reinforce_pp_baseline": ("episode", frozenset(), None),
    "gae": ("token", frozenset({"critic"}), "TD (GAE, learned critic)"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_with_declared_granularity_and_needs(name):
    assert name in method_names()
    cls = get_method_class(name)
    gran, needs, methodology = EXPECTED[name]
    assert cls.name == name and cls.granularity == gran and cls.needs == needs
    assert cls.episode_level_baseline is True
    if methodology:
        assert cls.methodology == methodology
    cfg = cls.Config()  # every field has a default
    assert cfg.method == name
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls.Config))


def test_no_separate_grpo_nostd_and_remax_needs_greedy_rollouts():
    names = method_names()
    assert "grpo_nostd" not in names
    assert get_method_class("remax").needs == frozenset({"greedy_rollout"})
    assert {f.name for f in dataclasses.fields(get_method_class("grpo").Config)} >= {"norm_adv_by_std", "epsilon"}


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp"])
def test_methods_wrap_functional(name):
    r, _, m, idx = _make_batch(1, torch.float32)
    t = _tensors(r, m, idx)
    cls = get_method_class(name)
    res = build_method(cls.Config())(t, Batch([]), CreditContext())
    assert res.advantages.shape == r.shape
    assert torch.all(res.advantages[m == 0] == 0)
    if name == "grpo":
        expect = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    elif name == "rloo":
        expect = F.rloo(t.token_level_rewards, t.response_mask, t.index)[0]
    elif name == "reinforce_pp_baseline":
        expect = F.reinforce_pp_baseline(t.token_level_rewards, t.response_mask, t.index)[0]
    else:
        expect = F.reinforce_pp(t.token_level_rewards, t.response_mask, 1.0)[0]
    _close(res.advantages, expect, 1e-6)
    if cls.granularity == "episode":
        assert res.credit.shape == (r.shape[0],)
        pol = m.sum(-1) > 0
        # the native credit is the value on every policy token of the episode
        _close((res.advantages.sum(-1) / m.sum(-1).clamp(min=1))[pol], res.credit[pol], 1e-5)
    else:
        assert res.credit.shape == r.shape
    assert res.overhead.extra_forward_passes == 0
    assert all(isinstance(v, float) for v in res.stats.values())


def test_grpo_norm_adv_by_std_option():
    r, _, m, idx = _make_batch(0, torch.float32)
    t = _tensors(r, m, idx)
    cls = get_method_class("grpo")
    res = build_method(cls.Config(norm_adv_by_std=False))(t, Batch([]), CreditContext())
    _close(res.advantages, F.grpo(t.token_level_rewards, t.response_mask, t.index, norm_adv_by_std=False)[0], 1e-6)


def test_gae_needs_a_critic():
    r, _, m, idx = _make_batch(0, torch.float32)
    method = build_method(get_method_class("gae").Config())
    with pytest.raises(ValueError, match="needs.*critic"):
        method(_tensors(r, m, idx), Batch([]), CreditContext(critic=None))


def test_gae_method_uses_critic_and_counts_forward_passes():
    r, v, m, idx = _make_batch(4, torch.float32)
    t = _tensors(r, m, idx)
    critic = _FakeCritic(v)
    method = build_method(get_method_class("gae").Config(gamma=0.99, lam=0.9))
    res = method(t, Batch([]), CreditContext(critic=critic))
    assert critic.calls == 1
    assert res.granularity == "token" and res.credit.shape == r.shape
    assert res.overhead.extra_forward_passes == r.shape[0]
    assert torch.equal(res.values, v)
    adv, ret = F.gae(t.token_level_rewards, v, t.response_mask, 0.99, 0.9)
    _close(res.advantages, adv * m, 1e-6)
    _close(res.returns, ret, 1e-6)
    assert torch.all(res.advantages[m == 0] == 0)
    bad = build_method(get_method_class("gae").Config())
    with pytest.raises(ValueError, match="critic.values"):
        bad(t, Batch([]), CreditContext(critic=_FakeCritic(v[:, :-1])))
