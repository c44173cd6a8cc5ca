"""VinePPO and SPO (survey §3.1.1, §3.2): MC values from forked continuations.

The MC provider is a test double of the ``MCRollouts`` protocol on a toy MDP whose exact values
are computed by enumeration: each turn the policy emits a decision token (action 1 with
probability p_t), two filler tokens, and the environment one observation token; turn rewards
``c_t * a_t`` and a non-linear terminal reward.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stages.credit.methods.montecarlo as mc  # noqa: F401  (registers vineppo, spo)
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import Segments
from stages.schema import Batch, Overhead, Trajectory, Turn

P = [0.3, 0.6, 0.5, 0.8]
C = [0.0, 0.25, 0.0, -0.5]
STRIDE = 4  # decision, filler, filler, observation


def terminal(a) -> float:
    return 1.0 if a[0] == 1 and sum(a[1:]) >= 2 else 0.0


def rtg(a, t: int) -> float:
    return sum(C[u] * a[u] for u in range(t, len(a))) + terminal(a)


def exact_value(prefix, t: int) -> float:
    """E[return-to-go from turn t | actions in prefix fixed] by enumeration."""
    rest = len(P) - len(prefix)
    total = 0.0
    for tail in itertools.product([0, 1], repeat=rest):
        a = list(prefix) + list(tail)
        pr = math.prod(P[len(prefix) + j] if x else 1 - P[len(prefix) + j] for j, x in enumerate(tail))
        total += pr * rtg(a, t)
    return total


def exact_step_advantage(a, t: int) -> float:
    n = len(P)
    nxt = C[t] * a[t] + (exact_value(a[: t + 1], t + 1) if t + 1 < n else terminal(a))
    return nxt - exact_value(a[:t], t)


def make_traj(a, uid, group=0, split_steps=False) -> Trajectory:
    ids, pm, lps, turns = [], [], [], []
    for t, x in enumerate(a):
        s = len(ids)
        ids += [10 + x, 5, 5, 3]
        pm += [True, True, True, False]
        lps += [math.log(P[t] if x else 1 - P[t]), 0.0, 0.0, 0.0]
        turns.append(Turn(index=t, action_span=(s, s + 3), obs_span=(s + 3, s + 4), action_text=str(x),
                          observation="o", reward=C[t] * x))
    steps = []
    if split_steps:  # two steps per turn: the decision token, then the fillers
        for t in range(len(a)):
            steps += [(t * STRIDE, t * STRIDE + 1), (t * STRIDE + 1, t * STRIDE + 3)]
    return Trajectory(uid=uid, group_id=group, task_id="toy", env_name="toy", prompt_ids=[1, 2], response_ids=ids,
                      policy_mask=pm, logprobs=lps, entropies=[0.0] * len(ids), turns=turns, reward=terminal(a),
                      step_spans=steps, meta={"actions": list(a)})


class ToyMC:
    """MCRollouts test double: continuations of the toy policy from (row, position)."""

    def __init__(self, batch: Batch, seed: int):
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.requests: list[tuple[list[tuple[int, int]], int]] = []

    def __call__(self, starts, k):
        self.requests.append((list(starts), k))
        out = torch.empty(len(starts), k, dtype=torch.float64)
        n = len(P)
        p = torch.tensor(P, dtype=torch.float64)
        c = torch.tensor(C, dtype=torch.float64)
        oh = Overhead()
        for i, (row, pos) in enumerate(starts):
            acts = self.batch.trajectories[row].meta["actions"]
            t, off = divmod(pos, STRIDE)
            assert off < 3, "continuations start on policy tokens"
            fixed = acts[:t] + ([acts[t]] if off > 0 else [])
            a = (torch.rand(k, n, generator=self.gen, dtype=torch.float64) < p).double()
            a[:, : len(fixed)] = torch.tensor(fixed, dtype=torch.float64)
            term = ((a[:, 0] == 1) & (a[:, 1:].sum(-1) >= 2)).double()
            out[i] = (a[:, t:] * c[t:]).sum(-1) + term
            oh.extra_tokens += k * (n * STRIDE - pos)
            oh.extra_forward_passes += k * (n * STRIDE - pos)
            oh.env_resets += k
        return out, oh


def sample_actions(gen, B):
    return (torch.rand(B, len(P), generator=gen) < torch.tensor(P)).long().tolist()


FIXED = [[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]]


def _batch(actions, split_steps=False):
    return Batch([make_traj(a, f"t{i}", group=i // 2, split_steps=split_steps) for i, a in enumerate(actions)])


def _run(name, batch, seed, **cfg):
    method = build_method(get_method_class(name).Config(**cfg))
    double = ToyMC(batch, seed)
    res = method(batch.to_tensors(), batch, CreditContext(mc_rollouts=double))
    return res, double


# ---------------------------------------------------------------------------- VinePPO


def test_vineppo_converges_to_exact_step_advantages():
    batch = _batch(FIXED)
    res, _ = _run("vineppo", batch, 0, k=4000)
    exact = torch.tensor([[exact_step_advantage(a, t) for t in range(len(P))] for a in FIXED], dtype=torch.float64)
    assert res.granularity == "step" and res.credit.shape == exact.shape
    assert torch.allclose(res.credit.double(), exact, atol=0.04)
    t = batch.to_tensors()
    # every token of step t carries the step's advantage; zero off the policy tokens
    for i in range(len(FIXED)):
        for s in range(len(P)):
            assert torch.all(res.advantages[i, s * STRIDE : s * STRIDE + 3] == res.credit[i, s])
    assert torch.all(res.advantages[t.response_mask == 0] == 0)


def test_vineppo_estimates_are_unbiased_at_k1():
    """The mean over many independent k=1 estimates is the exact advantage (fixed seed)."""
    batch = _batch(FIXED * 500)  # 2000 rows, each a fresh k=1 estimate
    res, _ = _run("vineppo", batch, 3, k=1)
    exact = torch.tensor([[exact_step_advantage(a, t) for t in range(len(P))] for a in FIXED], dtype=torch.float64)
    est = res.credit.double().reshape(500, len(FIXED), len(P)).mean(0)
    assert torch.allclose(est, exact, atol=0.1)
    err_k1 = (res.credit.double().reshape(500, 4, 4) - exact).pow(2).mean()
    res16, _ = _run("vineppo", batch, 4, k=16)
    err_k16 = (res16.credit.double().reshape(500, 4, 4) - exact).pow(2).mean()
    assert err_k16 < err_k1 / 4  # the MC error shrinks as k grows


def test_vineppo_requests_k_continuations_per_step_and_reports_overhead():
    batch = _batch(FIXED)
    res, double = _run("vineppo", batch, 0, k=5)
    assert len(double.requests) == 1
    starts, k = double.requests[0]
    assert k == 5 and len(starts) == len(FIXED) * len(P)
    assert sorted(starts) == [(i, s * STRIDE) for i in range(len(FIXED)) for s in range(len(P))]
    assert res.stats["mc_continuations"] == 5 * len(FIXED) * len(P)
    assert res.overhead.env_resets == 5 * len(FIXED) * len(P)
    assert res.overhead.extra_tokens > 0 and res.overhead.extra_forward_passes > 0
    cls = get_method_class("vineppo")
    assert cls.needs == frozenset({"mc_rollouts"}) and "critic" not in cls.needs


def test_vineppo_uses_step_spans_when_given():
    batch = _batch(FIXED, split_steps=True)
    res, double = _run("vineppo", batch, 1, k=2000)
    starts, _ = double.requests[0]
    assert len(starts) == len(FIXED) * 2 * len(P)
    assert (0, 1) in starts and (0, 5) in starts  # inside the turns
    # the decision step carries the decision's advantage; the filler step after it ~0
    exact = torch.tensor([[exact_step_advantage(a, t) for t in range(len(P))] for a in FIXED], dtype=torch.float64)
    assert torch.allclose(res.credit[:, 0::2].double(), exact, atol=0.05)
    assert res.credit[:, 1::2].abs().max() < 0.05


def test_vineppo_without_provider_and_bad_provider_are_clear_errors():
    batch = _batch(FIXED)
    method = build_method(get_method_class("vineppo").Config(k=2))
    with pytest.raises(ValueError, match=r"needs \['mc_rollouts'\]"):
        method(batch.to_tensors(), batch, CreditContext())
    bad = lambda starts, k: (torch.zeros(len(starts), k + 1), Overhead())  # noqa: E731
    with pytest.raises(ValueError, match=r"mc_rollouts returned shape"):
        method(batch.to_tensors(), batch, CreditContext(mc_rollouts=bad))


# ---------------------------------------------------------------------------- SPO


@pytest.mark.parametrize("variant", ["chain", "tree"])
@pytest.mark.parametrize("partition", ["cutpoint", "fixed"])
def test_spo_segment_advantages_telescope(variant, partition):
    batch = _batch(FIXED)
    t = batch.to_tensors()
    res, _ = _run("spo", batch, 2, k=3, variant=variant, partition=partition, segment_tokens=5, probability_mask=False)
    values_first = res.values[:, 0]  # V(s_0) on the first token
    ret = (t.token_level_rewards * t.response_mask).sum(-1)
    assert torch.allclose(torch.nansum(res.credit, -1).double(), (ret - values_first).double(), atol=1e-9)


def test_spo_cutpoints_are_low_probability_tokens_and_probability_mask():
    batch = _batch(FIXED)
    t = batch.to_tensors()
    method = build_method(get_method_class("spo").Config(cutpoint_threshold=0.9))
    seg, cut = method.segments(t, batch)
    decision = torch.zeros_like(cut)
    decision[:, 0::STRIDE] = True
    assert torch.equal(cut, decision & (t.response_mask != 0))
    assert torch.equal(seg.starts, torch.arange(len(P)).mul(STRIDE).expand(len(FIXED), -1))  # one cut per segment
    res, _ = _run("spo", batch, 0, k=4)
    assert torch.all(res.advantages[~cut] == 0)  # probability mask: only cut-point tokens
    assert torch.equal(res.advantages[:, 0::STRIDE], res.credit)
    two = build_method(get_method_class("spo").Config(cutpoints_per_segment=2))
    seg2, _ = two.segments(t, batch)
    assert torch.equal(seg2.starts, torch.tensor([0, 2 * STRIDE]).expand(len(FIXED), -1))
    fixed = build_method(get_method_class("spo").Config(partition="fixed", segment_tokens=4))
    segf, _ = fixed.segments(t, batch)
    assert segf.starts[0].tolist() == [0, 5, 10]  # every 4 policy tokens (observations skipped)


def test_spo_chain_with_step_cuts_equals_vineppo():
    batch = _batch(FIXED)
    spo, _ = _run("spo", batch, 7, k=3, probability_mask=False)
    vine, _ = _run("vineppo", batch, 7, k=3)
    assert torch.allclose(spo.advantages, vine.advantages)


def test_spo_tree_and_chain_agree_in_expectation():
    """Both value estimators are unbiased given the node: their mean error over trajectories
    sampled from the policy is ~0; the tree pools more continuations and has lower variance."""
    gen = torch.Generator().manual_seed(11)
    actions = sample_actions(gen, 600)
    batch = _batch(actions)
    exact = torch.tensor([[exact_value(a[:s], s) for s in range(len(P))] for a in actions], dtype=torch.float64)
    errs = {}
    for variant in ("chain", "tree"):
        res, _ = _run("spo", batch, 5, k=3, variant=variant, probability_mask=False)
        v = res.values[:, 0::STRIDE].double()
        errs[variant] = v - exact
        assert errs[variant].mean(0).abs().max() < 0.06, (variant, errs[variant].mean(0))
    assert errs["tree"].pow(2).mean() < errs["chain"].pow(2).mean()
    # the two estimators' means agree with each other too
    assert (errs["tree"].mean(0) - errs["chain"].mean(0)).abs().max() < 0.08


def test_tree_values_formula():
    G = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)  # 1 row, 2 segments, k=2
    rewards = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    seg = Segments(seg_id=torch.tensor([[0, 1]]), starts=torch.tensor([[0, 1]]),
                      present=torch.tensor([[True, True]]), count=torch.tensor([2]))
    V = mc.tree_values(G, rewards, seg)
    v1 = (1 + 1 + 1.0) / 3
    v0 = (1 + 0 + 0.0 + v1) / 3
    assert torch.allclose(V, torch.tensor([[v0, v1]], dtype=torch.float64))
