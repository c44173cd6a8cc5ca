"""Credit-uncertainty-driven branching (``uncertainty_branching``; creditflow's own, survey §8.1,
§9.2): VinePPO's continuation budget, a first pass of k0 per step boundary, the rest allocated to
the boundaries whose value estimates have the largest variance, values from the pooled continuations.

The bifurcation batch and its real-environment MC provider come from tests/test_credit_differential.py;
the estimator-error test (c) uses a stubbed sampler (Bernoulli returns with the ground-truth
values of the bifurcation episodes), allowed only there.
"""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.methods.montecarlo import allocate_extra
from stages.credit.registry import build_method, get_method_class
from stages.credit.segments import step_segments
from stages.schema import Overhead, turn_credit
from tests.test_credit_differential import BifurcationMC, bifurcation_batch


def _run(name, batch, t, mc, **cfg):
    return build_method(get_method_class(name).Config(**cfg))(t, batch, CreditContext(mc_rollouts=mc))


@pytest.fixture(scope="module")
def bif():
    batch = bifurcation_batch()
    return batch, batch.to_tensors()


class CountingMC(BifurcationMC):
    """The real-environment provider, counting every continuation asked for."""

    def __init__(self, batch, seed=0):
        super().__init__(batch, seed)
        self.asked = 0

    def __call__(self, starts, k, replacements=None):
        self.asked += len(starts) * k
        return super().__call__(starts, k, replacements)


def test_total_continuations_equal_the_parent_budget(bif):
    """(a) k x boundaries continuations in all, the same as VinePPO with the same k."""
    batch, t = bif
    ours, vine = CountingMC(batch, 1), CountingMC(batch, 1)
    res = _run("uncertainty_branching", batch, t, ours, k=6, k0=2)
    ref = _run("vineppo", batch, t, vine, k=6)
    points = int(t.num_turns.sum())
    assert ours.asked == vine.asked == 6 * points
    assert res.stats["mc_continuations"] == ref.stats["mc_continuations"] == 6 * points
    assert res.stats["branch_first_pass"] + res.stats["branch_extra"] == 6 * points
    rec = res.records["branching"]
    assert rec["spent"] == rec["budget"] == 6 * points
    assert sum(rec["histogram"].values()) == points
    assert res.overhead.env_resets == 6 * points  # every continuation billed in the Overhead
    assert len(ours.requests) >= 2  # the first pass, then the extra continuations


def test_extra_continuations_go_to_the_high_variance_boundaries():
    """(b) The allocation follows the variance; a uniform one would fail these checks."""
    var = torch.tensor([0.0, 0.25, 0.0, 0.01, 0.25, 0.0])
    n = allocate_extra(var, first=2, extra=6 * 4, cap=24, rule="variance")
    assert int(n.sum()) == 24
    assert torch.all(n[var == 0] == 0) and torch.all(n[var == 0.25] > n[3])
    assert abs(int(n[1]) - int(n[4])) <= 1  # equal variances, equal shares (to one continuation)
    assert not torch.equal(n, torch.full_like(n, 4))  # not VinePPO's uniform split
    # Neyman: n_total about proportional to sigma (0.5 : 0.1)
    tot = (n + 2).double()
    assert 3.0 < float(tot[1] / tot[3]) < 7.0
    m = allocate_extra(var, first=2, extra=24, cap=24, rule="max_se")
    assert int(m.sum()) == 24 and torch.all(m[var == 0] == 0) and m[1] > m[3]
    # equal (here zero) variances: the uniform split (VinePPO's allocation)
    assert torch.equal(allocate_extra(torch.zeros(6), 2, 24, 24, "variance"), torch.full((6,), 4))
    # the cap holds
    assert int(allocate_extra(var, 2, 24, 8, "variance").max()) <= 6


def test_on_bifurcation_the_decided_boundaries_get_fewer(bif):
    """(b) on the real environment: boundaries whose first pass all agreed get less than the others."""
    batch, t = bif
    method = build_method(get_method_class("uncertainty_branching").Config(k=6, k0=3, prior_strength=0.0))
    res = method(t, batch, CreditContext(mc_rollouts=BifurcationMC(batch, seed=4)))
    assert res.stats["branch_alloc_min"] == 3 and res.stats["branch_alloc_max"] > 6
    assert res.stats["branch_alloc_std_corr"] > 0.5
    assert res.stats["branch_variance_ratio"] < 1.0


def _bernoulli_setup(bif):
    """Exact values at every boundary (the episodes' ground truth) and a Bernoulli sampler of them."""
    batch, t = bif
    B, R = t.response_mask.shape
    V = torch.full((B, R + 1), float("nan"), dtype=torch.float64)
    for b, tr in enumerate(batch.trajectories):
        for turn, v in zip(tr.turns, tr.ground_truth.value):
            V[b, turn.action_span[0]] = v
    seg = step_segments(t, batch)
    rows, cols = seg.present.nonzero(as_tuple=True)
    true = torch.full(seg.present.shape, float("nan"), dtype=torch.float64)
    true[rows, cols] = V[rows, seg.starts[rows, cols]]

    class NoisyMC:
        """Stubbed sampler: the exact value plus Gaussian noise, sd 1 at the boundaries whose true
        value is 0.5 (the uncertain ones) and 0.1 elsewhere."""

        def __init__(self, seed):
            self.g = torch.Generator().manual_seed(seed)

        def __call__(self, starts, k, replacements=None):
            r = torch.tensor([s[0] for s in starts])
            p = torch.tensor([s[1] for s in starts])
            v = V[r, p].unsqueeze(1)
            sd = torch.where(v == 0.5, 1.0, 0.1)
            return v + sd * torch.randn(len(starts), k, generator=self.g, dtype=torch.float64), Overhead()

    return true, seg.present, NoisyMC


def test_error_at_high_variance_boundaries_is_lower_than_vineppo_at_equal_budget(bif):
    """(c) Mean squared value error at the high-variance boundaries over seeds: lower than VinePPO's
    at the same budget, and the summed error too (Neyman allocation). The returns are a stub (exact
    bifurcation values + heteroscedastic Gaussian noise). NB: on the 0/1 returns of bifurcation
    itself a k0-sample variance is a poor guide (a boundary whose first pass agrees by chance gets
    no extras), and there the method does not beat VinePPO (see the report)."""
    batch, t = bif
    true, present, NoisyMC = _bernoulli_setup(bif)
    hi = present & (true == 0.5)
    assert hi.sum() >= 6

    def err(name, seed, **cfg):
        res = _run(name, batch, t, NoisyMC(seed), **cfg)
        v = turn_credit(res.values.double(), t.turn_ids, t.max_turns)
        e = (v - true) ** 2
        return torch.tensor([float(e[hi].mean()), float(e[present].sum())])

    seeds = range(40)
    ours = sum(err("uncertainty_branching", s, k=8, k0=3) for s in seeds) / len(seeds)
    vine = sum(err("vineppo", s, k=8) for s in seeds) / len(seeds)
    assert ours[0] < 0.8 * vine[0] and ours[1] < vine[1]


def test_zero_extra_budget_is_vineppo_exactly(bif):
    batch, t = bif
    res = _run("uncertainty_branching", batch, t, BifurcationMC(batch, seed=3), k=5, k0=5)
    ref = _run("vineppo", batch, t, BifurcationMC(batch, seed=3), k=5)
    assert torch.equal(res.advantages, ref.advantages) and torch.equal(res.credit.nan_to_num(7), ref.credit.nan_to_num(7))
    assert res.stats["branch_extra"] == 0


def test_differs_from_grpo_where_the_outcome_is_decided(bif):
    """vs GRPO: after a wrong decisive turn every boundary's continuations agree (value 0), so the
    turns there get exactly 0 (GRPO: the failure's negative advantage)."""
    from tests.test_credit_differential import _grpo, _masks, _turn_adv

    batch, t = bif
    _, _, off, _ = _masks(t)
    grpo = _turn_adv(_grpo(t, batch), t)
    ours = _turn_adv(_run("uncertainty_branching", batch, t, BifurcationMC(batch, seed=5), k=6, k0=2).advantages, t)
    assert off.any()
    assert torch.all(ours[off] == 0) and torch.all(grpo[off] < -0.5)
    total = torch.nansum(ours, -1)  # telescopes to R - V(s_0)
    assert torch.all(total[grpo[:, 0] > 0] > 0)


def test_config_rules():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"credit.k0"):
        load_config(["env=bifurcation", "credit=uncertainty_branching", "credit.k=3", "credit.k0=4"])
    with pytest.raises(ConfigError, match=r"credit.k0"):
        load_config(["env=bifurcation", "credit=uncertainty_branching", "credit.k0=1"])


def test_one_train_flow_iteration_on_bifurcation(prefect_harness, shared_home):
    """The real train flow: the mc_rollouts provider (live policy, forked environments), both
    passes billed in the overhead, the allocation logged as metrics."""
    from flows import api

    out = api.start_run(["env=bifurcation", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                         "eval_episodes=2", "tracking.heatmap_every=0", "credit=uncertainty_branching",
                         "credit.k=4", "credit.k0=2"], home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["creditflow.method"] == "uncertainty_branching"
    points = m["credit.method.mc_points"]
    assert points >= 4 and m["credit.method.mc_continuations"] == 4 * points
    assert m["credit.method.branch_first_pass"] + m["credit.method.branch_extra"] == 4 * points
    assert 2 <= m["credit.method.branch_alloc_min"] <= m["credit.method.branch_alloc_max"] <= 16
    assert m["overhead.credit.extra_tokens"] > 0 and m["overhead.credit.env_resets"] > 0
    assert "update.loss" in m
