"""SPA-RL (Wang et al. 2025b; stages/credit/methods/progress.py): the progress estimator's
increments sum to the episode reward after training, it never reads a later turn (real tiny
Qwen2 policy's hidden states), the step reward adds the grounding signal, differential vs GRPO,
and the estimator persists in the policy checkpoint."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.schema import Batch, BatchTensors
from tests.test_turn_level import make_batch

# (group, action lengths of its turns, terminal reward): turn counts 1..4, rewards not a function of them
ROWS = [(0, [3, 2, 4], 1.0), (0, [2, 2], 0.0), (0, [4], 0.5), (0, [2, 3, 2, 2], 1.0),
        (1, [3, 3], 1.0), (1, [2, 2, 2], 0.25), (1, [3], 0.0), (1, [2, 4, 2, 3], 0.0)]
H = 16


def _spa(**kw):
    cls = get_method_class("spa")
    m = cls(cls.Config(**kw))
    m.build_helpers(H, seed=3)
    return m


def _hidden(t: BatchTensors, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*t.response_mask.shape, H, generator=g)


def _with_actions(batch: Batch, valid: "list[list[bool]] | None" = None) -> Batch:
    for i, tr in enumerate(batch.trajectories):
        for k, turn in enumerate(tr.turns):
            turn.action = "A" if (valid is None or valid[i][k]) else None
    return batch


def test_increments_sum_to_the_episode_reward_after_training_on_a_fixed_batch():
    batch, t, _ = make_batch(ROWS)
    ctx = CreditContext(hidden_states=_hidden(t))
    m = _spa(estimator_steps=600, estimator_lr=1e-2, grounding_coef=0.0)
    first = m(t, batch, ctx)
    assert torch.count_nonzero(first.credit) == 0  # a fresh estimator's output layer is 0
    fit = m.update_helpers(first, seed=0)
    assert fit["progress_loss_after"] < 1e-3 < fit["progress_loss_before"]
    c = m(t, batch, ctx).credit
    R = torch.tensor([r for _, _, r in ROWS])
    K = torch.tensor([len(lens) for _, lens, _ in ROWS], dtype=torch.float32)
    assert torch.allclose(c.sum(-1), R, atol=0.05)
    # the assertion tells a degenerate estimator apart: a constant increment a (the best one,
    # least squares of a*K on R) or per-step regression on the reward (every c_k = R, sum K*R)
    a = float((K * R).sum() / (K * K).sum())
    assert (a * K - R).abs().max() > 0.05
    assert (K * R - R).abs().max() > 0.05
    # increments differ between the turns of a row (not one share per row)
    assert float((c[0, :3] - c[0, :3].mean()).abs().max()) > 1e-3


def test_the_estimator_never_reads_a_later_turn_of_the_real_policy():
    """Changing the tokens of turn k+1 changes the hidden states from there on only: turn k's
    feature (its last policy token's hidden state) and its increment are unchanged."""
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy
    from stages.rollout.scorer import response_hidden_states

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=H, intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\ngo right\nno\n"] * 8)
    rows = [(0, [3, 2, 4], 1.0), (0, [2, 3, 2], 0.0)]
    batch, t, _ = make_batch(rows)
    batch2, _, _ = make_batch(rows)
    for tr in batch2.trajectories:  # replace turn 1's action tokens (same length)
        a, b = tr.turns[1].action_span
        tr.response_ids[a:b] = [60 + j for j in range(b - a)]
    t2 = BatchTensors.from_batch(batch2)
    m = _spa(grounding_coef=0.0)
    with torch.no_grad():  # a non-trivial estimator
        m.estimator.out.weight.normal_(generator=torch.Generator().manual_seed(1))
    c1 = m(t, batch, CreditContext(hidden_states=response_hidden_states(model, batch, 0))).credit
    c2 = m(t2, batch2, CreditContext(hidden_states=response_hidden_states(model, batch2, 0))).credit
    assert torch.allclose(c1[:, 0], c2[:, 0], atol=1e-6)  # turn 0 is before the change
    assert bool(((c1[:, 1:] - c2[:, 1:]).abs() > 1e-6).all())  # turns 1 and 2 read it


def test_step_reward_adds_the_grounding_signal_of_executable_actions():
    rows = [(0, [2, 2], 1.0), (0, [2, 2], 1.0)]
    batch, t, _ = make_batch(rows)
    _with_actions(batch, [[True, True], [False, True]])
    m = _spa(grounding_coef=0.5, baseline="none")
    res = m(t, batch, CreditContext(hidden_states=_hidden(t)))
    # fresh estimator: r_k = 0.5 * g_k; return-to-go over turns (gamma 1): row 0 [1.0, 0.5], row 1 [0.5, 0.5]
    first = res.advantages[:, 0]
    last_turn = t.turn_ids == 1
    assert first.tolist() == pytest.approx([1.0, 0.5])
    assert res.advantages[last_turn].unique().tolist() == pytest.approx([0.5])
    assert res.stats["grounding_mean"] == pytest.approx(0.75)


def test_differential_vs_grpo():
    """GRPO gives every token of a row one advantage; SPA, with an estimator trained on a batch
    where only turn 1's feature predicts the reward, moves the credit onto turn 1. With one turn
    per row and no grounding, a fitted estimator gives c = R and SPA is GRPO."""
    from stages.credit.registry import build_method

    rows = [(g, [2, 2, 2], float(w)) for g in range(4) for w in (0, 1, 1, 0)]
    batch, t, _ = make_batch(rows)
    hidden = _hidden(t, seed=5) * 0.1
    decisive = t.turn_ids == 1
    sign = torch.tensor([1.0 if r > 0 else -1.0 for _, _, r in rows]).unsqueeze(1)
    hidden[..., 0] += (decisive.float() * sign).to(hidden.dtype) * 3.0  # turn 1's feature carries the outcome
    ctx = CreditContext(hidden_states=hidden)
    m = _spa(estimator_steps=800, estimator_lr=1e-2, grounding_coef=0.0, baseline="none", gamma=1.0)
    m.update_helpers(m(t, batch, ctx), seed=0)
    spa = m(t, batch, ctx)
    grpo = build_method(get_method_class("grpo").Config())(t, Batch([]), CreditContext())
    c = spa.credit
    win = torch.tensor([r > 0 for _, _, r in rows])
    # the sum constrains a row's total only: the turns whose features do not tell winners from losers
    # get one common share, the decisive turn carries the difference between winners and losers
    assert float(c[win, 1].mean() - c[~win, 1].mean()) > 0.8
    assert abs(float(c[win][:, [0, 2]].mean() - c[~win][:, [0, 2]].mean())) < 0.15
    # GRPO: one advantage per row, so the turn after the decision is credited with the outcome;
    # SPA (return-to-go of the increments): turn 2 of a winner and of a loser get the same credit
    g, a = grpo.advantages, spa.advantages

    def turn_mean(adv, rows_mask, k):
        sel = (t.turn_ids == k) & rows_mask.unsqueeze(1)
        return float(adv[sel].mean())

    assert turn_mean(g, win, 2) - turn_mean(g, ~win, 2) > 1.0
    assert abs(turn_mean(a, win, 2) - turn_mean(a, ~win, 2)) < 0.15
    assert turn_mean(a, win, 0) - turn_mean(a, ~win, 0) > 0.8  # the turns before the decision see it coming

    one = [(g, [3], float(w)) for g in range(3) for w in (0, 1, 1, 0)]
    b1, t1, _ = make_batch(one)
    h1 = _hidden(t1, seed=7)
    m1 = _spa(estimator_steps=800, estimator_lr=1e-2, grounding_coef=0.0, baseline="grpo")
    ctx1 = CreditContext(hidden_states=h1)
    m1.update_helpers(m1(t1, b1, ctx1), seed=0)
    spa1 = m1(t1, b1, ctx1).advantages
    grpo1 = build_method(get_method_class("grpo").Config())(t1, Batch([]), CreditContext()).advantages
    assert torch.allclose(spa1, grpo1, atol=0.1)


def test_the_estimator_persists_in_the_policy_checkpoint(tmp_path):
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy
    from stages.update.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=H, intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\n"] * 4)
    batch, t, _ = make_batch(ROWS)
    ctx = CreditContext(hidden_states=_hidden(t))
    m = _spa(estimator_steps=50, estimator_lr=1e-2, grounding_coef=0.0)
    m.update_helpers(m(t, batch, ctx), seed=0)
    trained = m(t, batch, ctx).credit
    path = save_checkpoint(tmp_path, "iter_0000", model, helpers=m.helper_modules())
    fresh = _spa(grounding_coef=0.0)
    assert not torch.allclose(fresh(t, batch, ctx).credit, trained)
    load_checkpoint(path, model, None, fresh.helper_modules())
    assert torch.equal(fresh(t, batch, ctx).credit, trained)
    bare = save_checkpoint(tmp_path, "bare", model)
    with pytest.raises(CheckpointError, match="helper.progress.safetensors"):
        load_checkpoint(bare, model, None, fresh.helper_modules())
