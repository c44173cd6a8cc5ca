"""PRS + VSPO (Su et al. 2025) and the adaptive segment-level reward (Li et al. 2024b), survey §5.7:
the schedule of the shaped reward over iterations, VSPO's value-ordered sampling weights, balanced
segments whatever the response length, each token credited with its segment's value, and both
methods' differential tests against GRPO (stages/credit/methods/shaping.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from environments.construct import build_env_batch
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.credit.segments import balanced_segments
from stages.schema import Batch
from tests.agentic_batches import trajectory
from tests.reference_estimators import ref_grpo


def _method(name, **kw):
    cls = get_method_class(name)
    return cls(cls.Config(**kw))


# ------------------------------------------------------------------------------------------ PRS
def _prs_batch(iteration: int) -> Batch:
    """Two groups of two 3-turn episodes; some actions did not parse (format score 1/3 .. 1)."""
    specs = [(0, 1.0, [True, True, True]), (0, 0.0, [True, False, False]),
             (1, 1.0, [True, True, False]), (1, 1.0, [True, True, True])]
    trajs = []
    for i, (g, R, ok) in enumerate(specs):
        t = trajectory(f"r{i}", g, ["s0", "s1", "s2"], R)
        for turn, valid in zip(t.turns, ok):
            turn.action = "a" if valid else None
        t.success = R > 0
        trajs.append(t)
    return Batch(trajectories=trajs, iteration=iteration)


FORMAT = torch.tensor([1.0, 1 / 3, 2 / 3, 1.0])
OUTCOME = torch.tensor([1.0, 0.0, 1.0, 1.0])


def _ref_shaped_adv(batch: Batch, alpha: float) -> torch.Tensor:
    t = batch.to_tensors()
    shaped = alpha * FORMAT + (1 - alpha) * OUTCOME
    rewards = torch.zeros_like(t.token_level_rewards)
    rewards[:, 0] = shaped  # ref_grpo sums a row's rewards: the shaped reward as one token reward
    return _grpo_ref(rewards, t)


def _grpo_ref(rewards, t) -> torch.Tensor:
    return ref_grpo(rewards, t.response_mask, t.index.tolist())[0].float()


@pytest.mark.parametrize("schedule", ["linear", "step"])
def test_prs_schedule_shapes_the_reward_exactly_as_configured_and_ends_at_the_outcome(schedule):
    prs = _method("prs", format_weight=0.6, shaping_iterations=4, schedule=schedule)
    seen = []
    for it in range(6):
        batch = _prs_batch(it)
        t = batch.to_tensors()
        res = prs(t, batch, CreditContext())
        alpha = (0.6 * (1 - it / 4) if schedule == "linear" else 0.6) if it < 4 else 0.0
        assert res.stats["format_weight"] == pytest.approx(alpha)
        assert res.stats["format_score_mean"] == pytest.approx(float(FORMAT.mean()))
        assert res.stats["shaped_reward_mean"] == pytest.approx(float((alpha * FORMAT + (1 - alpha) * OUTCOME).mean()))
        assert torch.allclose(res.advantages, _ref_shaped_adv(batch, alpha), atol=1e-5)
        grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
        if it >= 4:  # the last stage is the pure outcome reward: GRPO exactly
            assert torch.allclose(res.advantages, grpo, atol=1e-7, rtol=0)
        else:  # group 1 (two successes) has a zero GRPO advantage, the format stage separates it
            assert not torch.allclose(res.advantages, grpo, atol=1e-3)
            assert float(res.advantages[2].abs().sum()) > 0
        seen.append(res.stats["format_weight"])
    if schedule == "linear":
        assert seen == pytest.approx([0.6, 0.45, 0.3, 0.15, 0.0, 0.0])  # strictly falling to 0
    # no extra passes, tokens or environment steps
    o = res.overhead
    assert (o.extra_forward_passes, o.forward_tokens, o.env_steps, o.env_resets, o.judge_calls) == (0, 0, 0, 0, 0)


def test_prs_without_format_stage_is_grpo_at_every_iteration():
    prs = _method("prs", format_weight=0.0)
    for it in (0, 3):
        batch = _prs_batch(it)
        t = batch.to_tensors()
        res = prs(t, batch, CreditContext())
        assert torch.allclose(res.advantages, _grpo_ref(t.token_level_rewards, t),
                              atol=1e-6)
        assert res.credit.shape == (4, 3)  # native credit per turn


def test_vspo_records_success_rates_and_weights_tasks_by_their_value():
    prs = _method("prs", vspo_strength=2.0, difficulty_weight=0.5)
    batch = _prs_batch(0)
    res = prs(batch.to_tensors(), batch, CreditContext())
    assert res.curriculum == {"t0": 0.5, "t1": 1.0}  # each instance's group success rate
    assert res.stats["zero_advantage_row_fraction"] == 0.0  # the format stage breaks group 1's tie
    cur = {"half": 0.5, "solved": 1.0, "unsolved": 0.0, "quarter": 0.25}
    w = prs.task_weights(cur, 1, 10)
    v = {"half": 0.75, "solved": 0.0, "unsolved": 0.5, "quarter": 0.75}  # (1-l) 4p(1-p) + l (1-p)
    vbar = sum(v.values()) / 4
    for k in cur:
        assert w[k] == pytest.approx(math.exp(2.0 * (v[k] - vbar)))
    assert w["solved"] < w["unsolved"] < w["half"] == pytest.approx(w["quarter"])
    assert prs.task_weights({}, 1, 10) is None and _method("prs", vspo_strength=0.0).task_weights(cur, 1, 10) is None


def test_vspo_weights_make_the_env_stage_sample_informative_tasks_more_often():
    """Through the env stage's weighted sampler: over 200 seeds, the highest-value instance is
    drawn clearly more often than the solved (zero-advantage) one; uniform weights would not."""
    import environments.tasks  # noqa: F401  (registers the families)
    from environments.registry import get_family_class

    cls = get_family_class("bifurcation")
    fam = cls(cls.Config())
    pool = fam.instances("train", 6, 0)
    ids = [inst.task_id for inst in pool]
    prs = _method("prs", vspo_strength=4.0)
    cur = {ids[0]: 0.5, ids[1]: 1.0}
    counts: Counter = Counter()
    for seed in range(200):
        envb = build_env_batch(fam, 2, 1, 6, 1, seed, weights=prs.task_weights(cur, 1, 10))
        counts.update(s.instance.task_id for s in envb.slots)
    assert counts[ids[0]] > 2 * counts[ids[1]]


def test_prs_config_rules_are_one_line_errors():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"format_weight"):
        load_config(["env=bifurcation", "credit=prs", "credit.format_weight=1.5"])
    with pytest.raises(ConfigError, match=r"schedule"):
        load_config(["env=bifurcation", "credit=prs", "credit.schedule=cosine"])
    with pytest.raises(ConfigError, match=r"num_segments"):
        load_config(["env=bifurcation", "credit=adaptseg", "credit.num_segments=0"])


# ------------------------------------------------------------------------------------ AdaptSeg
# token log-probs per turn (2 action tokens each); the reference is 0, so r_t = beta * logprob
LP_SHORT = [0.0, 0.0, 1.0, 1.0, -2.0, -2.0]  # 6 turns -> 12 policy tokens
LP_LONG = [0.0] * 3 + [1.0] * 3 + [-2.0] * 3 + [-2.0] * 3  # 12 turns -> 24 policy tokens


def _seg_batch() -> Batch:
    a = trajectory("a", 0, [f"s{k}" for k in range(6)], 1.0, logprobs=LP_SHORT)
    b = trajectory("b", 0, [f"s{k}" for k in range(12)], 0.0, logprobs=LP_LONG)
    c = trajectory("c", 1, [f"s{k}" for k in range(3)], 1.0, logprobs=[0.5, 0.5, 0.5])
    d = trajectory("d", 1, [f"s{k}" for k in range(3)], 0.0, logprobs=[0.5, 0.5, 0.5])
    return Batch([a, b, c, d])


def _ctx(t, ref=None):
    return CreditContext(ref_logprobs=torch.zeros_like(t.old_logprobs) if ref is None else ref)


def test_adaptseg_segment_counts_are_balanced_whatever_the_length_and_cut_at_the_pivots():
    batch = _seg_batch()
    t = batch.to_tensors()
    m = _method("adaptseg", num_segments=3, beta=1.0)
    res = m(t, batch, _ctx(t))
    mask = t.response_mask.bool()
    seg_counts = []
    for row in range(4):
        ids = torch.unique_consecutive(res.advantages[row][mask[row]])  # credit is constant per segment
        seg_counts.append(int((~torch.isnan(res.credit[row])).sum()))
        assert len(ids) <= seg_counts[-1]
    # 12, 24, 6, 6 policy tokens: 3 segments each (a fixed 4-token segmentation gives 3, 6, 2, 2)
    assert seg_counts == [3, 3, 3, 3]
    assert res.stats["segments_per_response"] == 3.0
    # the cut points are the reward changes (the pivots): row a at turns 2 and 4, row b at turns 3 and 6
    seg = balanced_segments((t.old_logprobs - _shift(t)).abs(), mask, 3)
    starts_a = [int(t.turn_ids[0, p]) for p in seg.starts[0, 1:3]]
    starts_b = [int(t.turn_ids[1, p]) for p in seg.starts[1, 1:3]]
    assert starts_a == [2, 4] and starts_b == [3, 6]
    # each token's credit is its segment's: c_s = 1[rho A >= 0] A + rho, rho the segment's mean reward
    A = F._grpo_scalars(t.token_level_rewards, t.response_mask, t.index, 1e-6, True)
    rho_a, rho_b = [0.0, 1.0, -2.0], [0.0, 1.0, -2.0]
    for row, rho in ((0, rho_a), (1, rho_b)):
        want = [(A[row] if r * A[row] >= 0 else 0.0) + r for r in rho]
        assert torch.allclose(res.credit[row, :3], torch.tensor(want, dtype=torch.float32), atol=1e-5)
        tok = res.advantages[row][mask[row]]
        segs = seg.seg_id[row][mask[row]]
        assert torch.allclose(tok, res.credit[row].gather(0, segs), atol=1e-6)
    # row b failed (A < 0): its positive segment is masked (only rho stays), row a (A > 0) its negative one
    assert res.stats["masked_segment_fraction"] > 0


def _shift(t):
    from stages.credit.methods.shaping import previous_policy_value

    return previous_policy_value(t.old_logprobs, t.response_mask)


def test_balanced_segments_fall_back_to_equal_sizes_and_short_rows():
    mask = torch.tensor([[1] * 12, [1] * 2 + [0] * 10, [1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0]])
    seg = balanced_segments(torch.zeros(3, 12), mask, 4)
    assert seg.count.tolist() == [4, 2, 4]
    assert seg.seg_id[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # flat signal: equal sizes
    assert seg.seg_id[1, :2].tolist() == [0, 1]
    assert seg.seg_id[2].tolist() == [0, 0, -1, 1, 1, -1, 2, 2, -1, 3, 3, -1]


def test_adaptseg_is_grpo_at_the_reference_and_differs_from_it_in_the_known_way():
    batch = _seg_batch()
    t = batch.to_tensors()
    grpo = _grpo_ref(t.token_level_rewards, t)
    m = _method("adaptseg", num_segments=3, beta=1.0)
    same = m(t, batch, _ctx(t, ref=t.old_logprobs.clone()))  # pi_old = pi_ref: every rho = 0
    assert torch.allclose(same.advantages, grpo, atol=1e-6)
    diff = m(t, batch, _ctx(t))
    assert not torch.allclose(diff.advantages, grpo, atol=1e-3)
    # masking only, no added reward: GRPO on aligned segments, 0 on misaligned ones
    only = _method("adaptseg", num_segments=3, beta=1.0, segment_weight=0.0)(t, batch, _ctx(t))
    nz = only.advantages != 0
    assert torch.allclose(only.advantages[nz], grpo[nz], atol=1e-6)
    assert bool(((grpo != 0) & ~nz & t.response_mask.bool()).any())
    keep = _method("adaptseg", num_segments=3, beta=1.0, segment_weight=0.0, mask_misaligned=False)
    assert torch.allclose(keep(t, batch, _ctx(t)).advantages, grpo, atol=1e-6)
    assert diff.overhead.extra_forward_passes == 0  # the reference pass is the context provider's


def test_adaptseg_entropy_boundary_cuts_at_the_high_entropy_tokens():
    a = trajectory("a", 0, [f"s{k}" for k in range(6)], 1.0, entropies=[0.1] * 6)
    a.entropies[6] = a.entropies[15] = 3.0  # the first tokens of turns 2 and 5 (3 response tokens per turn)
    b = trajectory("b", 0, [f"s{k}" for k in range(6)], 0.0)
    batch = Batch([a, b])
    t = batch.to_tensors()
    seg = balanced_segments(t.entropies, t.response_mask, 3)
    assert [int(t.turn_ids[0, p]) for p in seg.starts[0, 1:3]] == [2, 5]
    res = _method("adaptseg", num_segments=3, boundary="entropy")(t, batch, _ctx(t))
    assert res.stats["segments_per_response"] == 3.0
