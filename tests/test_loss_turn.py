"""Turn-level losses (survey §5.1): Turn-PPO's per-turn geometric-mean ratio and clip (Li et al.
2025b §3) and SORL's clipping-triggered normalization (Li et al. 2025a §4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import stages.update.losses  # noqa: F401  (registers the losses)
from stages.update.loss_registry import get_loss

CFG = SimpleNamespace(clip_ratio=0.2)
TID = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]])
MASK = torch.ones(2, 6)
ADV = torch.ones(2, 6)


def _grad(name, lp0, old):
    lp = lp0.clone().requires_grad_(True)
    loss, stats = get_loss(name)(lp, old, ADV, MASK, CFG, turn_ids=TID)
    (g,) = torch.autograd.grad(loss, lp)
    return loss, stats, g


def test_turn_ratio_is_the_geometric_mean_and_shared_by_the_turn():
    g = torch.Generator().manual_seed(0)
    lp, old = 0.1 * torch.randn(2, 6, generator=g), 0.1 * torch.randn(2, 6, generator=g)
    loss, stats, grad = _grad("turn_ppo", lp, old)
    # direct: per turn exp(mean log ratio) * A, mean over the 5 turns (A=1, ratios inside the region here)
    d = lp - old
    turns = [d[0, :3], d[0, 3:], d[1, :2], d[1, 2:4], d[1, 4:]]
    ratios = torch.stack([t.mean().exp() for t in turns])
    assert torch.allclose(loss, -torch.minimum(ratios, ratios.clamp(0.8, 1.2)).mean(), atol=1e-6)
    # every token of a turn gets the same gradient (one ratio per turn), different turns differ
    assert torch.allclose(grad[0, :3], grad[0, :1].expand(3)) and torch.allclose(grad[1, 4:], grad[1, 4:5].expand(2))
    assert not torch.allclose(grad[0, 0], grad[0, 3])


def test_clipping_triggers_per_turn():
    lp, old = torch.zeros(2, 6), torch.zeros(2, 6)
    lp[0, 3:] = 1.0  # only turn 1 of row 0 has ratio e > 1.2 (A > 0: clipped branch)
    _, stats, grad = _grad("turn_ppo", lp, old)
    assert abs(stats["clip_fraction"] - 1 / 5) < 1e-6
    assert torch.all(grad[0, 3:] == 0) and torch.all(grad[0, :3] != 0) and torch.all(grad[1] != 0)


def test_sorl_suppresses_stale_trajectories_where_turn_ppo_does_not():
    lp, old = torch.zeros(2, 6), torch.zeros(2, 6)
    old[0] = 3.0  # stale behaviour log-probs on every turn of row 0: ratio e^-3, far outside [0.8, 1.2]
    old[1, :2] = 3.0  # one of row 1's three turns stale
    _, _, g_ppo = _grad("turn_ppo", lp, old)
    _, stats, g_sorl = _grad("sorl", lp, old)
    assert g_ppo[0].abs().sum() > 0  # PPO's min() keeps the unclipped branch for A>0, r<1-eps: an update
    assert torch.all(g_sorl[0] == 0)  # SORL: every turn left the trust region -> no update from row 0
    # row 1 keeps 2/3 of its turns in the region: its fresh turns' gradient is scaled by 2/3
    _, _, g_fresh = _grad("sorl", lp, torch.zeros(2, 6))
    assert torch.allclose(g_sorl[1, 2:], (2 / 3) * g_fresh[1, 2:], atol=1e-6)
    assert stats["sorl_suppressed_fraction"] == 1.0


def test_sorl_on_fresh_samples_equals_per_trajectory_turn_ppo():
    g = torch.Generator().manual_seed(1)
    lp = 0.05 * torch.randn(2, 6, generator=g)
    loss, stats, _ = _grad("sorl", lp, torch.zeros(2, 6))
    assert stats["sorl_weight_mean"] == 1.0
    r = [lp[0, :3].mean().exp(), lp[0, 3:].mean().exp(), lp[1, :2].mean().exp(), lp[1, 2:4].mean().exp(),
         lp[1, 4:].mean().exp()]
    assert torch.allclose(loss, -0.5 * ((r[0] + r[1]) / 2 + (r[2] + r[3] + r[4]) / 3), atol=1e-6)


def test_turn_losses_refuse_token_level_credit_before_compute():
    """turn_ppo / sorl read one advantage per turn: token-level credit (GAE) is refused with one line,
    episode- and turn-level credit is accepted."""
    from flows.config import ConfigError, load_config

    for loss in ("turn_ppo", "sorl"):
        with pytest.raises(ConfigError, match=r"^update.loss=.*credit.method=gae gives token-level credit"):
            load_config(["env=bifurcation", f"update.loss={loss}", "credit=gae", "update=ppo", f"update.loss={loss}"])
        load_config(["env=bifurcation", f"update.loss={loss}", "credit=grpo"])


def _trainer_delta(loss: str, stale_rows: list[int], rows: list[int]) -> list[torch.Tensor]:
    """Parameter change of one real PolicyTrainer step (tiny Qwen2 policy, AdamW) on ``rows`` of a
    fixed two-trajectory batch whose behaviour log-probs are the policy's own, except on
    ``stale_rows``, where they are 3 nats too high on every token (a stale behaviour policy: every
    turn's ratio is e^-3, far outside the trust region)."""
    import copy

    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy, sequence_logprobs
    from stages.schema import CreditResult
    from stages.update.config import UpdateConfig
    from stages.update.trainer import PolicyTrainer
    from tests.test_turn_level import make_batch

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\ngo right\nno\n"] * 8)
    batch, t, _ = make_batch([(0, [2, 3], 1.0), (0, [3, 1, 2], 1.0)])
    t = copy.copy(t)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    old = lp * t.response_mask
    for r in stale_rows:
        old[r] = (lp[r] + 3.0) * t.response_mask[r]
    t.old_logprobs = old
    keep = torch.tensor(rows)
    sub = copy.copy(t)
    for f in ("input_ids", "attention_mask", "position_ids", "response_ids", "response_mask", "old_logprobs",
              "entropies", "token_level_rewards", "episode_rewards", "index", "turn_ids", "num_turns"):
        setattr(sub, f, getattr(t, f)[keep])
    adv = sub.response_mask.clone()  # A = 1 on every turn
    credit = CreditResult(advantages=adv, granularity="episode", credit=torch.ones(len(rows)))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PolicyTrainer(model, UpdateConfig(loss=loss, epochs=1, minibatch_size=2, lr=1e-3), temperature=1.0,
                            needs_critic=False)
    stats = trainer.update(sub, credit, seed=0)
    assert stats["minibatches"] == 1 and stats["skipped_steps"] == 0
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_sorl_through_the_real_trainer_drops_the_stale_trajectory_turn_ppo_does_not():
    """The update from a batch with one stale trajectory: SORL's step equals the step on the fresh
    trajectory alone (AdamW's first step is invariant to the loss's scale), Turn-PPO's does not."""
    fresh_only = _trainer_delta("sorl", [], [1])
    sorl = _trainer_delta("sorl", [0], [0, 1])
    ppo = _trainer_delta("turn_ppo", [0], [0, 1])
    ppo_fresh_only = _trainer_delta("turn_ppo", [], [1])
    moved = sum(float(d.abs().sum()) for d in sorl)
    assert moved > 0
    # (AdamW's eps=1e-8 makes elements with a gradient near 1e-8 scale-dependent: tolerance 1e-5 of lr=1e-3)
    assert max(float((a - b).abs().max()) for a, b in zip(sorl, fresh_only)) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(ppo, ppo_fresh_only)) > 1e-4
