"""SCAR (Cao et al. 2025; survey §3.2): Shapley values of reasoning steps, v(S) = log p(answer | S).

The scorer is a test double of the ``Scorer`` protocol whose log-likelihood of the answer line is
a known set function of which steps are in the context (each step carries a marker token)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stages.credit.methods.shapley as sh  # noqa: F401  (registers scar)
from stages.credit import functional as F
from stages.credit.group_stats import group_stats
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, Trajectory, Turn

ANSWER = [90, 91]


class SetScorer:
    """log p(target | context) = (sum of weights of present markers + pair bonuses) spread over
    the target tokens."""

    def __init__(self, weights: dict[int, float], pairs: dict[tuple[int, int], float] | None = None):
        self.weights, self.pairs = weights, pairs or {}
        self.forward_passes = 0
        self.contexts = []

    def value(self, present: set[int]) -> float:
        v = sum(w for m, w in self.weights.items() if m in present) - 3.0
        v += sum(b for (a, c), b in self.pairs.items() if a in present and c in present)
        return v

    def __call__(self, contexts, targets):
        out = []
        for c, tg in zip(contexts, targets):
            assert tg == ANSWER
            self.forward_passes += 1
            self.contexts.append(list(c))
            out.append(torch.full((len(tg),), self.value(set(c)) / len(tg)))
        return out


def make_traj(markers, reward, uid, group=0) -> Trajectory:
    ids, pm, turns = [], [], []
    for k, m in enumerate(list(markers) + [None]):
        s = len(ids)
        act = [m, 5] if m is not None else list(ANSWER)
        ids += act + [3]
        pm += [True] * len(act) + [False]
        turns.append(Turn(index=k, action_span=(s, s + len(act)), obs_span=(s + len(act), s + len(act) + 1),
                          action_text="", observation="o"))
    return Trajectory(uid=uid, group_id=group, task_id="t", env_name="toy", prompt_ids=[1, 2], response_ids=ids,
                      policy_mask=pm, logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids), turns=turns, reward=reward)


def brute_shapley(players, value):
    n = len(players)
    phi = []
    for i in range(n):
        others = [p for j, p in enumerate(players) if j != i]
        tot = 0.0
        for r in range(n):
            for S in itertools.combinations(others, r):
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                tot += w * (value(set(S) | {players[i]}) - value(set(S)))
        phi.append(tot)
    return torch.tensor(phi, dtype=torch.float64)


def _run(batch, scorer, **cfg):
    method = build_method(get_method_class("scar").Config(**cfg))
    return method(batch.to_tensors(), batch, CreditContext(scorer=scorer))


def test_exact_shapley_efficiency_symmetry_null_player():
    # markers 20, 21 symmetric (equal weight, same bonus with 23), 22 null, 23 interacts
    scorer = SetScorer({20: 1.0, 21: 1.0, 22: 0.0, 23: 0.5}, {(20, 23): 0.4, (21, 23): 0.4})
    batch = Batch([make_traj([20, 21, 22, 23], 1.0, "a"), make_traj([23, 22], 0.0, "b")])
    res = _run(batch, scorer)
    phi = res.credit[0, :4].double()
    assert torch.isclose(phi.sum(), torch.tensor(scorer.value({20, 21, 22, 23}) - scorer.value(set()), dtype=torch.float64))
    assert torch.isclose(phi[0], phi[1])  # symmetry
    assert abs(float(phi[2])) < 1e-9  # null player
    assert torch.allclose(phi, brute_shapley([20, 21, 22, 23], scorer.value))
    assert torch.isnan(res.credit[0, 4])  # the answer step is the target, not a player
    # 2^n coalition contexts per trajectory, counted as forward passes
    assert res.overhead.extra_forward_passes == 2**4 + 2**2 == scorer.forward_passes
    assert res.stats["exact_rows"] == 2.0


def test_sampled_shapley_is_close_to_exact_on_six_steps():
    weights = {20: 1.0, 21: 0.2, 22: 0.0, 23: -0.5, 24: 0.7, 25: 0.3}
    pairs = {(20, 21): 0.6, (23, 24): -0.4, (21, 25): 0.3}
    batch = Batch([make_traj(list(weights), 1.0, "a")])
    exact = _run(batch, SetScorer(weights, pairs)).credit[0, :6].double()
    sampled_res = _run(batch, SetScorer(weights, pairs), exact_max_segments=5, num_permutations=600, seed=3)
    sampled = sampled_res.credit[0, :6].double()
    assert sampled_res.stats["sampled_rows"] == 1.0
    assert torch.allclose(sampled, exact, atol=0.05)
    assert torch.isclose(sampled.sum(), exact.sum())  # every sampled order telescopes: exact efficiency
    again = _run(batch, SetScorer(weights, pairs), exact_max_segments=5, num_permutations=600, seed=3)
    assert torch.equal(again.credit.nan_to_num(), sampled_res.credit.nan_to_num())  # seeded


def test_shaped_rewards_are_proportional_and_advantages_average_to_grpo():
    scorer = SetScorer({20: 3.0, 21: 1.0, 22: 0.0})
    batch = Batch([make_traj([20, 21, 22], 1.0, "a"), make_traj([20, 21, 22], 0.0, "b"),
                   make_traj([21, 21, 21], 1.0, "c")])
    t = batch.to_tensors()
    res = _run(batch, scorer)
    grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    _, mean, std, _ = group_stats(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), t.index, True)
    step = torch.stack([res.advantages[:, 3 * k] for k in range(4)], 1).double()  # first token of each step
    # reasoning steps: (3 * R * share - mean) / std, shares 3/4, 1/4, 0 for row a
    expect_a = (3 * torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64) - mean[0]) / (std[0] + 1e-6)
    assert torch.allclose(step[0, :3], expect_a, atol=1e-6)
    # their mean is GRPO's advantage; the answer step keeps GRPO's advantage
    assert torch.allclose(step[:, :3].mean(1), grpo[:, 0].double(), atol=1e-6)
    assert torch.allclose(step[:, 3], grpo[:, 0].double(), atol=1e-6)
    # a failed episode has nothing to distribute: GRPO on every step
    assert torch.allclose(step[1], grpo[1, 0].double().expand(4), atol=1e-6)
    assert torch.all(res.advantages[t.response_mask == 0] == 0)


def test_without_a_scorer_is_a_clear_error():
    batch = Batch([make_traj([20, 21], 1.0, "a")])
    with pytest.raises(ValueError, match=r"needs \['scorer'\]"):
        build_method(get_method_class("scar").Config())(batch.to_tensors(), batch, CreditContext())


def test_rows_that_fall_back_to_grpo_are_counted_by_reason():
    """Issue 13: a failed episode, Shapley values summing to zero and a single-step episode are
    each GRPO exactly; SCAR counts them so a run sees how often it is GRPO."""
    scorer = SetScorer({20: 1.0, 21: 0.5, 22: 0.0})
    batch = Batch([make_traj([20, 21], 1.0, "ok"),    # informative: not a fallback
                   make_traj([20, 21], 0.0, "fail"),  # failed: nothing to distribute
                   make_traj([22, 22], 1.0, "null"),  # both steps null players: sum phi = 0
                   make_traj([], 1.0, "single")])     # only the answer step: no players
    stats = _run(batch, scorer).stats
    assert stats["fallback_failed"] == 1 and stats["fallback_zero_sum"] == 1 and stats["fallback_single_step"] == 1
    assert stats["fallback_rows"] == 3
