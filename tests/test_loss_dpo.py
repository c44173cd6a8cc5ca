"""DPO-family losses of stage 5 (Rafailov et al. 2023, eq. 7; issue 17 "Update stage"): ``dpo`` on a
group's best vs worst trajectory, ``turn_dpo`` on turns at the same anchor state. The loss equals
the direct computation, its gradient raises the chosen response's log-ratio through the real
trainer, pairs are built from the credit stage's advantages, and combinations that cannot learn
are one config line before compute."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import stages.update.losses  # noqa: F401  (registers the losses)
from stages.schema import CreditResult
from stages.update.loss_registry import get_loss
from stages.update.pairs import group_major_permutation, restrict, trajectory_pairs, turn_pairs

BETA = 0.5
CFG = SimpleNamespace(dpo_beta=BETA, clip_ratio=0.2)


def _direct(lw, refw, ll, refl):
    return -F.logsigmoid(BETA * ((lw - refw) - (ll - refl)))


def test_dpo_equals_the_direct_computation_on_trajectory_pairs():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0  # observation / padding tokens never enter a response's log-prob
    lp_bogus = lp.clone()
    lp_bogus[1, 3:] = 50.0
    pairs = torch.tensor([[0, 1], [3, 2]])
    loss, stats = get_loss("dpo")(lp_bogus, lp, torch.zeros(4, 5), mask, CFG, ref_logprobs=ref,
                                  trajectory_pairs=pairs)
    s = ((lp - ref) * mask).sum(-1)
    direct = (_direct(s[0], 0, s[1], 0) + _direct(s[3], 0, s[2], 0)) / 2
    assert torch.allclose(loss, direct, atol=1e-6)
    assert stats["dpo_pairs"] == 2.0 and 0.0 <= stats["dpo_accuracy"] <= 1.0


def test_turn_dpo_equals_the_direct_computation_on_turn_pairs():
    g = torch.Generator().manual_seed(1)
    lp, ref = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    tid = torch.tensor([[0, 0, -1, 1, 1, 1], [0, 0, 0, -1, 1, 1]])
    mask = (tid >= 0).float()
    pairs = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = get_loss("turn_dpo")(lp, lp, torch.zeros(2, 6), mask, CFG, ref_logprobs=ref, turn_ids=tid,
                                   turn_pairs=pairs)
    d = lp - ref
    t01, t00, t11, t10 = d[0, 3:].sum(), d[0, :2].sum(), d[1, 4:].sum(), d[1, :3].sum()
    direct = (_direct(t01, 0, t11, 0) + _direct(t10, 0, t00, 0)) / 2
    assert torch.allclose(loss, direct, atol=1e-6)


def test_no_pairs_is_a_zero_loss_with_zero_gradient():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, stats = get_loss("dpo")(lp, lp.detach(), torch.zeros(2, 3), torch.ones(2, 3), CFG,
                                  ref_logprobs=torch.zeros(2, 3), trajectory_pairs=torch.zeros((0, 2), dtype=torch.long))
    (grad,) = torch.autograd.grad(loss, lp)
    assert float(loss.detach()) == 0.0 and torch.all(grad == 0) and stats["dpo_pairs"] == 0.0


def test_trajectory_pairs_are_a_groups_best_vs_worst_and_ties_give_none():
    adv = torch.tensor([0.3, 1.0, -1.0, 0.0, 0.5, 0.5, 2.0, -2.0]).unsqueeze(1).expand(8, 3).clone()
    mask = torch.ones(8, 3)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pairs = trajectory_pairs(adv, mask, index)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 2), (6, 7)]  # group 1 is a tie: no pair


def test_turn_pairs_only_compare_turns_at_the_same_anchor_of_a_group():
    # two rows of group 0: turn 0 at state A in both, turn 1 at B (row 0) and C (row 1): only A pairs
    adv = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -1.0, -5.0]])
    mask = torch.ones(2, 3)
    tid = torch.tensor([[0, 0, 1], [0, 0, 1]])
    anchors = torch.tensor([[0, 1], [0, 2]])
    pairs = turn_pairs(adv, mask, torch.tensor([0, 0]), tid, anchors)
    assert pairs.tolist() == [[0, 0, 1, 0]]
    # the same anchor id in another group is another anchor
    assert turn_pairs(adv, mask, torch.tensor([0, 1]), tid, anchors).numel() == 0
    # without anchors the turn index is the anchor
    assert sorted(map(tuple, turn_pairs(adv, mask, torch.tensor([0, 0]), tid, None).tolist())) == [(0, 0, 1, 0), (0, 1, 1, 1)]


def test_group_major_minibatches_never_split_a_pair():
    index = torch.tensor([3, 1, 3, 1, 2, 2, 0, 0])
    perm = group_major_permutation(index, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(8))
    for start in range(0, 8, 2):  # mini-batches of the group size hold one whole group each
        assert index[perm[start:start + 2]].unique().numel() == 1
    pairs = torch.tensor([[0, 2], [1, 3], [4, 5], [6, 7]])
    kept = sum(restrict(pairs, perm[s:s + 4], 8).shape[0] for s in range(0, 8, 4))
    assert kept == 4


def test_dpo_gradient_at_the_reference_is_parallel_to_grpos_in_a_group_of_two():
    """Differential against GRPO: at pi = pi_ref, a group of two equal-length responses with
    GRPO advantages +a / -a, DPO's gradient is beta * L / a times GRPO's (both push the same
    direction: up the winner, down the loser); in a group of four, DPO leaves the middle rows alone
    where GRPO moves every row."""
    L = 3
    lp0 = torch.randn(2, L, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, L)
    a = 0.7
    adv = torch.tensor([[a] * L, [-a] * L])

    def grads(name, lp0, adv, mask, **kw):
        lp = lp0.clone().requires_grad_(True)
        loss, _ = get_loss(name)(lp, lp0, adv, mask, CFG, **kw)
        return torch.autograd.grad(loss, lp)[0]

    g_grpo = grads("grpo", lp0, adv, mask)
    g_dpo = grads("dpo", lp0, adv, mask, ref_logprobs=lp0, trajectory_pairs=trajectory_pairs(adv, mask, torch.zeros(2)))
    assert torch.allclose(g_dpo, BETA * L / a * g_grpo, atol=1e-6)
    # a group of four: GRPO moves all rows, DPO only the best and the worst
    lp4 = torch.randn(4, L, generator=torch.Generator().manual_seed(3))
    adv4 = torch.tensor([1.2, 0.3, -0.2, -1.3]).unsqueeze(1).expand(4, L).clone()
    m4 = torch.ones(4, L)
    g4_grpo = grads("grpo", lp4, adv4, m4)
    g4_dpo = grads("dpo", lp4, adv4, m4, ref_logprobs=lp4, trajectory_pairs=trajectory_pairs(adv4, m4, torch.zeros(4)))
    assert torch.all(g4_grpo[1:3] != 0) and torch.all(g4_dpo[1:3] == 0)
    assert torch.all(g4_dpo[0] < 0) and torch.all(g4_dpo[3] > 0)  # descent raises row 0, lowers row 3


def _policy_and_batch():
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy
    from tests.test_turn_level import make_batch

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\ngo right\nno\n"] * 8)
    batch, t, _ = make_batch([(0, [2, 3], 1.0), (0, [3, 2], 0.0), (1, [3, 2], 0.0), (1, [2, 3], 1.0)])
    return model, t


def _logratios(model, ref, t):
    from stages.rollout.policy import sequence_logprobs

    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
        rp, _ = sequence_logprobs(ref, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    return ((lp - rp) * t.response_mask).sum(-1)


@pytest.mark.parametrize("loss", ["dpo", "turn_dpo"])
def test_the_real_trainer_raises_the_chosen_log_ratio_and_lowers_the_rejected(loss):
    from stages.update.config import UpdateConfig
    from stages.update.trainer import PolicyTrainer

    model, t = _policy_and_batch()
    ref = copy.deepcopy(model)
    # episode advantages: row 0 beats row 1 (group 0), row 3 beats row 2 (group 1)
    adv = t.response_mask * torch.tensor([1.0, -1.0, -1.0, 1.0]).unsqueeze(1)
    credit = CreditResult(advantages=adv, granularity="episode", credit=torch.tensor([1.0, -1.0, -1.0, 1.0]))
    trainer = PolicyTrainer(model, UpdateConfig(loss=loss, epochs=1, minibatch_size=2, lr=1e-3, dpo_beta=0.5),
                            temperature=1.0, needs_critic=False)
    stats = trainer.update(t, credit, seed=0)
    assert stats["skipped_steps"] == 0 and stats["minibatches"] == 2
    built = stats["trajectory_pairs_built" if loss == "dpo" else "turn_pairs_built"]
    assert built == (2 if loss == "dpo" else 4)  # turn pairs: 2 turns (anchored by turn index) x 2 groups
    assert stats["dpo_pairs"] == built / 2  # a mini-batch is one whole group: every pair is used
    s = _logratios(model, ref, t)
    assert float(s[0] - s[1]) > 0 and float(s[3] - s[2]) > 0  # chosen above rejected, from 0 at the start


def test_refused_combinations_are_one_line_before_compute():
    from flows.config import ConfigError, load_config

    cases = [
        (["credit=gae", "update=ppo", "update.loss=dpo"], r"^update.loss=dpo: ranks a group's trajectories .*credit.method=gae gives token-level"),
        (["credit=gae", "update=ppo", "update.loss=turn_dpo"], r"^update.loss=turn_dpo: ranks turns .*credit.method=gae gives token-level"),
        (["credit=itpo", "update.loss=dpo"], r"^update.loss=dpo: .*credit.method=itpo gives turn-level"),
        (["credit=rloo", "update.loss=dpo", "rollout.group_size=1"], r"^rollout.group_size=1: must be >= 2"),
        (["update.loss=dpo", "rollout.group_size=4", "update.minibatch_size=6"], r"^update.minibatch_size=6: must be a multiple of rollout.group_size=4"),
    ]
    for over, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            load_config(["env=bifurcation"] + over)
        assert "\n" not in str(info.value)
    load_config(["env=bifurcation", "credit=grpo", "update.loss=dpo"])
    load_config(["env=bifurcation", "credit=itpo", "update.loss=turn_dpo"])


def test_the_rpo_term_adds_the_chosen_mean_nll():
    g = torch.Generator().manual_seed(4)
    lp, ref = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    tid = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    mask = torch.ones(2, 4)
    pairs = torch.tensor([[0, 1, 1, 1]])
    cfg = SimpleNamespace(dpo_beta=BETA, dpo_nll_coef=0.3)
    loss, _ = get_loss("turn_dpo")(lp, lp, torch.zeros(2, 4), mask, cfg, ref_logprobs=ref, turn_ids=tid, turn_pairs=pairs)
    d = lp - ref
    direct = _direct(d[0, 2:].sum(), 0, d[1, 3:].sum(), 0) + 0.3 * (-lp[0, 2:].mean())
    assert torch.allclose(loss, direct, atol=1e-6)
    tp = torch.tensor([[0, 1]])
    loss, _ = get_loss("dpo")(lp, lp, torch.zeros(2, 4), mask, cfg, ref_logprobs=ref, trajectory_pairs=tp)
    assert torch.allclose(loss, _direct(d[0].sum(), 0, d[1].sum(), 0) + 0.3 * (-lp[0].mean()), atol=1e-6)


def test_every_method_composes_with_the_dpo_losses_that_accept_its_credit():
    """Each registered method whose granularity a DPO loss accepts loads with it; the others are
    refused with the granularity line (never a crash, never a silent run)."""
    from flows.config import ConfigError, load_config
    from stages.credit.registry import get_method_class, method_names

    for loss in ("dpo", "turn_dpo"):
        accepts = get_loss(loss).accepts
        for name in method_names():
            over = ["env=bifurcation", f"credit={name}", f"update={loss}"]
            ok = get_method_class(name).granularity in accepts
            try:
                load_config(over)
            except ConfigError as e:
                msg = str(e)
                assert "\n" not in msg
                if ok:  # refused for a reason of its own (e.g. a family feature), never for the loss
                    assert not msg.startswith("update.loss="), (name, loss, msg)
                elif msg.startswith("update.loss="):  # refused by granularity (or earlier, by a rule of its own)
                    assert msg.startswith(f"update.loss={loss}: ") and "average away" in msg, (name, loss, msg)
            else:
                assert ok, (name, loss)
