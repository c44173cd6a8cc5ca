"""SWEET-RL (Zhou et al. 2025; survey §5.1): a turn-level critic on privileged training-time
information, trained with Bradley–Terry on trajectory pairs, whose turn advantages feed the
``turn_dpo`` actor update. Defining properties: the actor's inputs never contain the privileged
information while the critic's do; the critic separates pairs that only the privileged
information tells apart (the same critic without it cannot); the credit lands on the turn where
chosen and rejected differ. Differential against GRPO: one-turn episodes give the same DPO pairs."""

from __future__ import annotations

import pytest
import torch

from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
import stages.credit.methods  # noqa: F401  (registers the methods)
from stages.credit.methods.privileged import privileged_text
from stages.schema import Batch
from stages.update.pairs import turn_pairs
from tests.agentic_batches import trajectory


class CharTokenizer:
    """Stand-in tokenizer for hand-built batches: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 997 for c in text]}


def _method(**kw):
    cls = get_method_class("sweet_rl")
    return cls(cls.Config(**{"critic_width": 16, "critic_buckets": 64, **kw}))


def _hidden(t, per_turn):
    """(B, R, H) hidden states whose value at every token of turn k of row b is ``per_turn[b][k]``."""
    B, R = t.response_mask.shape
    H = len(per_turn[0][0])
    h = torch.zeros(B, R, H)
    tid = t.turn_ids
    for b in range(B):  # test data construction
        for k, v in enumerate(per_turn[b]):
            h[b][tid[b] == k] = torch.tensor(v, dtype=torch.float32)
    return h


def _ambiguous_batch():
    """Two tasks; in each, two one-turn rollouts with actions 'X' (feature [1, 0]) and 'Y' ([0, 1]).
    Task 0's hidden rule wants X, task 1's wants Y: the features alone cannot tell who wins."""
    trajs = []
    for g, rule in enumerate(("X", "Y")):
        for act in ("X", "Y"):
            tr = trajectory(f"g{g}{act}", g, ["s0"], 1.0 if act == rule else 0.0)
            tr.privileged = {"answers": [rule]}
            trajs.append(tr)
    batch = Batch(trajectories=trajs)
    t = batch.to_tensors()
    feats = [[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]]
    return batch, t, _hidden(t, feats)


def test_the_critic_separates_pairs_only_the_privileged_information_tells_apart():
    batch, t, h = _ambiguous_batch()
    ctx = CreditContext(hidden_states=h, tokenizer=CharTokenizer())
    res = _method(critic_steps=80)(t, batch, ctx)
    assert res.stats["bt_pairs"] == 2 and res.stats["bt_accuracy_after"] == 1.0
    a = res.credit[:, 0]
    assert a[0] > a[1] and a[3] > a[2]  # the winner of each task: X in task 0, Y in task 1
    # the same critic without the privileged information sees identical features with opposite
    # outcomes: it cannot order both pairs (its advantages of X and Y are the same in both tasks)
    blind = _method(critic_steps=80, use_privileged=False)(t, batch, ctx)
    assert blind.stats["bt_accuracy_after"] <= 0.5
    assert torch.allclose(blind.credit[0], blind.credit[2]) and torch.allclose(blind.credit[1], blind.credit[3])


def test_credit_lands_on_the_turn_where_chosen_and_rejected_differ():
    # three turns; the rows share turns 0 and 2 (same features) and differ on turn 1
    trajs = [trajectory("w", 0, ["a", "b", "c"], 1.0), trajectory("l", 0, ["a", "b", "c"], 0.0)]
    for tr in trajs:
        tr.privileged = {"answers": [None, "X", None]}
    batch = Batch(trajectories=trajs)
    t = batch.to_tensors()
    h = _hidden(t, [[[1.0, 1.0], [1.0, 0.0], [0.5, 0.5]], [[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]]])
    res = _method(critic_steps=100)(t, batch, CreditContext(hidden_states=h, tokenizer=CharTokenizer()))
    a = res.credit
    assert torch.allclose(a[0, 0], a[1, 0]) and torch.allclose(a[0, 2], a[1, 2])  # shared turns: same credit
    assert float(a[0, 1] - a[1, 1]) > 1.0  # the decisive turn takes the whole preference
    # the turn_dpo actor pairs: only turn 1 (state "b") has a preference, chosen = the winner's turn
    pairs = turn_pairs(res.advantages, t.response_mask, t.index, t.turn_ids, t.turn_anchors)
    assert pairs.tolist() == [[0, 1, 1, 1]]
    # GRPO's episode advantage ranks every turn of the winner above the loser's: three pairs
    grpo = get_method_class("grpo")(get_method_class("grpo").Config())(t, batch, CreditContext())
    assert turn_pairs(grpo.advantages, t.response_mask, t.index, t.turn_ids, t.turn_anchors).shape[0] == 3


def test_one_turn_episodes_give_the_same_dpo_pairs_as_grpo():
    """Differential against GRPO: with one turn per episode the fitted Bradley–Terry critic orders a
    group's turns as their returns, so turn_dpo picks GRPO's pairs."""
    g = torch.Generator().manual_seed(0)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    trajs = []
    for i, r in enumerate(rewards):
        tr = trajectory(f"r{i}", i // 4, ["s"], r)
        tr.privileged = {"answers": ["X" if i // 4 == 0 else "Y"]}
        trajs.append(tr)
    batch = Batch(trajectories=trajs)
    t = batch.to_tensors()
    h = _hidden(t, [[torch.randn(4, generator=g).tolist()] for _ in rewards])
    res = _method(critic_steps=80)(t, batch, CreditContext(hidden_states=h, tokenizer=CharTokenizer()))
    assert res.stats["bt_accuracy_after"] == 1.0
    grpo = get_method_class("grpo")(get_method_class("grpo").Config())(t, batch, CreditContext())
    args = (t.response_mask, t.index, t.turn_ids, t.turn_anchors)
    ours, theirs = turn_pairs(res.advantages, *args), turn_pairs(grpo.advantages, *args)
    # pairs connect a success and a failure of the same group in both (best/worst ties may pick other rows)
    for p in (ours, theirs):
        assert p.shape[0] == 2 and all(rewards[w] == 1.0 and rewards[l] == 0.0 for w, _, l, _ in p.tolist())
    # the critic's advantages are ordered exactly as the returns inside each group
    a = res.credit[:, 0]
    for grp in (range(0, 4), range(4, 8)):
        wins = [a[i] for i in grp if rewards[i] == 1.0]
        losses = [a[i] for i in grp if rewards[i] == 0.0]
        assert min(wins) > max(losses)


def test_a_fresh_critic_gives_zero_advantage_and_no_pair_without_different_returns():
    trajs = [trajectory("a", 0, ["s", "t"], 1.0), trajectory("b", 0, ["s", "t"], 1.0)]
    batch = Batch(trajectories=trajs)
    t = batch.to_tensors()
    h = torch.randn(2, t.response_mask.shape[1], 3, generator=torch.Generator().manual_seed(1))
    res = _method()(t, batch, CreditContext(hidden_states=h, tokenizer=CharTokenizer()))
    assert res.stats["bt_pairs"] == 0 and torch.all(res.advantages == 0)
    assert res.stats["privileged_tokens_mean"] == 0.0  # no privileged information in these rows


def test_the_fit_is_adopted_by_the_update_stage_and_saved_as_a_helper():
    batch, t, h = _ambiguous_batch()
    m = _method(critic_steps=50)
    m.build_helpers(2, seed=0)
    before = {k: v.clone() for k, v in m.critic.state_dict().items()}
    res = m(t, batch, CreditContext(hidden_states=h, tokenizer=CharTokenizer()))
    assert all(torch.equal(before[k], v) for k, v in m.critic.state_dict().items())  # scoring fits a copy
    assert m.update_helpers(res, seed=0) == {"critic_adopted": 1.0}
    assert set(m.helper_modules()) == {"sweet_critic"}
    again = m(t, batch, CreditContext(hidden_states=h, tokenizer=CharTokenizer()))  # warm start: already fitted
    assert again.stats["bt_loss_before"] < res.stats["bt_loss_before"]


def test_actor_inputs_never_contain_the_privileged_information_and_the_critics_do():
    """A real bifurcation rollout with the tiny policy: the privileged text (the hidden rule's
    answers) is in the critic's token ids and nowhere in what the policy reads (prompt and
    observation tokens) or in the rendered prompt/observation text."""
    from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily
    from stages.rollout.config import ModelConfig, RolloutConfig
    from stages.rollout.policy import build_tiny_policy
    from stages.rollout.warmup import play_instances

    fam = BifurcationFamily(BifurcationConfig(horizon=4, num_decisive=2, num_actions=3))
    insts = [fam.instance("train", i, seed=0) for i in range(2)]
    texts = [p + "".join(a + o for a, o in steps) for p, steps in fam.warmup_corpus(8, 0)]
    model, tok = build_tiny_policy(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                               num_kv_heads=1, vocab_size=300), texts)
    trajs = play_instances(model, tok, fam, insts, seed=0, uid_prefix="p", cfg=RolloutConfig(max_new_tokens_per_turn=4))
    batch = Batch(trajectories=trajs)
    t = batch.to_tensors()
    m = _method(critic_steps=0)
    inputs, _ = m.critic_inputs(t, batch, CreditContext(hidden_states=torch.zeros(*t.response_mask.shape, 16),
                                                        tokenizer=tok))
    for i, tr in enumerate(trajs):
        secret = privileged_text(tr.privileged)
        assert "answers" in tr.privileged and tr.privileged["answers"] == insts[i].spec["answers"]
        ids = inputs["privileged_ids"][i][inputs["privileged_mask"][i]].tolist()
        assert tok.decode(ids) == secret  # the critic reads it
        shown = tok.decode(tr.prompt_ids) + "".join(turn.observation for turn in tr.turns)
        assert secret not in shown and "answers" not in shown and "decisive" not in shown
        row = t.input_ids[i].tolist()  # the actor's token ids: no window equals the privileged ids
        assert not any(row[j:j + len(ids)] == ids for j in range(len(row) - len(ids) + 1))


def test_config_rules_are_one_line():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.critic_lr=0.0: must be") as info:
        load_config(["env=bifurcation", "credit=sweet_rl", "credit.critic_lr=0"])
    assert "\n" not in str(info.value)
    cfg = load_config(["env=bifurcation", "credit=sweet_rl"])
    assert cfg["update"]["loss"] == "turn_dpo"  # its default update group
    with pytest.raises(ConfigError, match=r"^rollout.group_size=1: must be >= 2"):
        load_config(["env=bifurcation", "credit=sweet_rl", "rollout.group_size=1"])
