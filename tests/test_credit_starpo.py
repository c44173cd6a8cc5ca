"""StarPO-S uncertainty filtering (RAGEN, Wang et al. 2025d §4; survey §5.7): only the groups of
highest in-group reward std keep their (GRPO) advantage; the kept share is logged."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from tests.agentic_batches import batch, trajectory


def _run(b, **cfg):
    return build_method(get_method_class("starpo").Config(**cfg))(b.to_tensors(), b, CreditContext())


def _grpo(b, by_std=True):
    t = b.to_tensors()
    return F.grpo(t.token_level_rewards, t.response_mask, t.index, norm_adv_by_std=by_std)[0]


def _hand():
    """4 groups of 4 rollouts; reward stds: g0 0.577 (1,1,0,0), g1 0.5 (1,0,0,0), g2 0 (flat),
    g3 0.289 (0.5, 0, 0, 0), listed g3 first so that order is not rank."""
    rows = {3: [0.5, 0, 0, 0], 0: [1, 1, 0, 0], 2: [1, 1, 1, 1], 1: [1, 0, 0, 0]}
    return batch(*[trajectory(f"{g}{j}", g, ["s", "t"], float(r)) for g, rs in rows.items() for j, r in enumerate(rs)])


def _kept_groups(res, b):
    nz = res.credit != 0
    return {b.trajectories[i].group_id for i in range(len(b)) if bool(nz[i])}


def test_exactly_the_highest_std_groups_keep_their_advantage():
    b = _hand()
    assert _kept_groups(_run(b, keep_fraction=0.25), b) == {0}
    assert _kept_groups(_run(b, keep_fraction=0.5), b) == {0, 1}
    assert _kept_groups(_run(b, keep_fraction=0.75), b) == {0, 1, 3}
    res = _run(b, keep_fraction=0.5)
    ep = _grpo(b)
    kept = torch.tensor([t.group_id in (0, 1) for t in b.trajectories])
    assert torch.equal(res.advantages[kept], ep[kept]) and torch.all(res.advantages[~kept] == 0)
    assert res.stats["kept_group_fraction"] == 0.5 and res.stats["kept_row_fraction"] == 0.5
    assert res.stats["kept_reward_std_mean"] > res.stats["reward_std_mean"]


def test_keep_fraction_one_is_grpo_exactly_and_ties_keep_the_lower_group():
    b = _hand()
    for by_std in (True, False):
        assert torch.equal(_run(b, keep_fraction=1.0, norm_adv_by_std=by_std).advantages, _grpo(b, by_std))
    tie = batch(*[trajectory(f"{g}{j}", g, ["s"], float(j % 2)) for g in (5, 2) for j in range(2)])
    res = _run(tie, keep_fraction=0.5)
    assert _kept_groups(res, tie) == {2}  # equal stds: the lower group id is kept
    assert res.overhead.extra_forward_passes == 0 and res.overhead.env_resets == 0


def test_config_rules():
    cls = get_method_class("starpo")
    assert cls.needs == frozenset() and cls.needs_group
    with pytest.raises(ValueError, match=r"^credit.keep_fraction"):
        build_method(cls.Config(keep_fraction=0.0))
