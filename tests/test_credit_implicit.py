"""Defining properties of implicit DPO token credit and T-REG (survey §3.1.2–§3.1.3), on a real
tiny Qwen2 policy."""

from __future__ import annotations

import copy

import pytest
import torch

import stages.credit.methods.implicit as I  # registers dpo_implicit, t_reg
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import get_method_class
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy, sequence_logprobs
from stages.schema import Batch, Trajectory, Turn

CORPUS = ["Solve 3+4*2\n4*2=8\n3+8=11\nanswer 11\n", "Solve this correctly, checking every step.\n",
          "Solve this carelessly, with mistakes.\n"] * 8


@pytest.fixture(scope="module")
def models():
    model, tok = build_tiny_policy(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                               num_kv_heads=1, vocab_size=300), CORPUS)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, ref, tok


def make_batch(tok, groups: int = 2, per_group: int = 3, seed: int = 0) -> Batch:
    """Multi-turn episodes: action tokens, then observation tokens (not the policy's)."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    trajs = []
    for gi in range(groups):
        prompt = tok("Solve 3+4*2\n", add_special_tokens=False)["input_ids"]
        for j in range(per_group):
            ids, mask, turns = [], [], []
            n_turns = 1 + (j % 3)
            for k in range(n_turns):
                a = len(ids)
                n = int(torch.randint(1, 5, (1,), generator=g))
                ids += torch.randint(3, V, (n,), generator=g).tolist()
                mask += [True] * n
                b = len(ids)
                o = 2 if k < n_turns - 1 else 0
                ids += torch.randint(3, V, (o,), generator=g).tolist()
                mask += [False] * o
                turns.append(Turn(index=k, action_span=(a, b), obs_span=(b, b + o), action_text="x", observation=""))
            reward = float((gi + j) % 2)
            trajs.append(Trajectory(uid=f"{gi}-{j}", group_id=gi, task_id=f"t{gi}", env_name="test",
                                    prompt_ids=list(prompt), response_ids=ids, policy_mask=mask,
                                    logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids), turns=turns,
                                    reward=reward, success=reward > 0, prompt_text="Solve 3+4*2\n"))
    return Batch(trajs)


def _batched_lp(model, t):
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    return lp * t.response_mask


def _row_logprobs(model, context: list[int], target: list[int]) -> torch.Tensor:
    """Direct computation: one unpadded forward pass of context + target."""
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(context) - 1 : -1], -1)
    return lp.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)


def _grpo(t, batch):
    cls = get_method_class("grpo")
    return cls(cls.Config())(t, batch, CreditContext())


# --------------------------------------------------------------------------------------------
# dpo_implicit
# --------------------------------------------------------------------------------------------


def test_dpo_token_credits_sum_to_the_sequence_implicit_reward(models):
    model, ref, tok = models
    batch = make_batch(tok)
    pad = tok.pad_token_id
    t = batch.to_tensors(pad_token_id=pad)
    t.old_logprobs = _batched_lp(model, t)
    ref_lp = _batched_lp(ref, t)
    beta = 0.2
    cls = get_method_class("dpo_implicit")
    res = cls(cls.Config(beta=beta))(t, batch, CreditContext(ref_logprobs=ref_lp))
    for i, tr in enumerate(batch.trajectories):
        m = torch.tensor(tr.policy_mask)
        seq_pi = float(_row_logprobs(model, tr.prompt_ids, tr.response_ids)[m].sum())
        seq_ref = float(_row_logprobs(ref, tr.prompt_ids, tr.response_ids)[m].sum())
        assert float(res.credit[i].sum()) == pytest.approx(beta * (seq_pi - seq_ref), abs=1e-4)
    m = t.response_mask != 0
    assert (res.credit[~m] == 0).all() and (res.advantages[~m] == 0).all()
    grpo = _grpo(t, batch)
    assert torch.allclose(res.advantages, grpo.advantages + res.credit, atol=1e-6)
    assert res.granularity == "token" and res.credit.shape == t.response_mask.shape


def test_dpo_per_token_credit_is_the_direct_per_token_log_ratio(models):
    """Pins every token's credit, not only the row sums: moving a row's whole implicit reward onto
    its last token (same sums) fails here."""
    model, ref, tok = models
    batch = make_batch(tok, seed=3)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    t.old_logprobs = _batched_lp(model, t)
    beta, weight = 0.3, 0.5
    cls = get_method_class("dpo_implicit")
    res = cls(cls.Config(beta=beta, credit_weight=weight))(t, batch, CreditContext(ref_logprobs=_batched_lp(ref, t)))
    spread = 0
    for i, tr in enumerate(batch.trajectories):
        n = len(tr.response_ids)
        m = torch.tensor(tr.policy_mask)
        assert torch.equal(t.response_mask[i, :n].bool(), m)  # response column j is response token j
        direct = beta * (_row_logprobs(model, tr.prompt_ids, tr.response_ids)
                         - _row_logprobs(ref, tr.prompt_ids, tr.response_ids)) * m
        assert torch.allclose(res.credit[i, :n], direct, atol=1e-4), (i, res.credit[i, :n], direct)
        assert (res.credit[i, n:] == 0).all()
        lumped = torch.zeros_like(direct)
        lumped[int(m.nonzero()[-1])] = direct.sum()  # the whole implicit reward on the last policy token
        spread += not torch.allclose(lumped, direct, atol=1e-4)
    assert spread >= len(batch) - 1  # the test can tell per-token credit from a lumped one
    # differential vs GRPO: exactly weight * credit apart on every token
    g = _grpo(t, batch).advantages
    assert torch.allclose(res.advantages - g, weight * res.credit, atol=1e-6)


def test_dpo_differs_from_grpo_exactly_where_policy_and_reference_differ(models):
    _, _, tok = models
    batch = make_batch(tok, seed=4)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    t.old_logprobs = -torch.rand(t.old_logprobs.shape, generator=g) * t.response_mask
    shift = torch.zeros_like(t.old_logprobs)
    shift[:, 1::2] = 0.4  # the reference disagrees with the policy on every other position only
    ref = (t.old_logprobs - shift) * t.response_mask
    cls = get_method_class("dpo_implicit")
    res = cls(cls.Config(beta=0.5))(t, batch, CreditContext(ref_logprobs=ref))
    grpo = _grpo(t, batch).advantages
    on = t.response_mask != 0
    same = on & (shift == 0)
    moved = on & (shift != 0)
    assert same.any() and moved.any()
    assert torch.equal(res.advantages[same], grpo[same])  # agree where log pi = log pi_ref
    assert torch.allclose(res.advantages[moved], grpo[moved] + 0.2, atol=1e-6)  # beta * 0.4 where they differ
    assert (res.advantages[~on] == 0).all()


def test_dpo_credit_weight_zero_is_grpo_and_needs_reference(models):
    _, _, tok = models
    batch = make_batch(tok, seed=2)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    t.old_logprobs = -torch.rand(t.old_logprobs.shape, generator=g) * t.response_mask
    ref = (t.old_logprobs - 0.3) * t.response_mask
    cls = get_method_class("dpo_implicit")
    res = cls(cls.Config(credit_weight=0.0))(t, batch, CreditContext(ref_logprobs=ref))
    assert torch.equal(res.advantages, _grpo(t, batch).advantages)
    assert torch.allclose(I.implicit_token_credit(t.old_logprobs, ref, t.response_mask, 0.1), 0.03 * t.response_mask)
    with pytest.raises(ValueError, match="needs \\['ref_logprobs'\\]"):
        cls(cls.Config())(t, batch, CreditContext())
    bad = ref.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="ref_logprobs\\[0, 0\\] must be finite"):
        cls(cls.Config())(t, batch, CreditContext(ref_logprobs=bad))


# --------------------------------------------------------------------------------------------
# T-REG
# --------------------------------------------------------------------------------------------


class RefusingScorer:
    """Test double: a scorer that must not be called."""

    forward_passes = 0

    def __call__(self, contexts, targets):
        raise AssertionError("the scorer was called")


def test_treg_reg_weight_zero_is_grpo_exactly(models):
    _, _, tok = models
    batch = make_batch(tok, seed=3)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    cls = get_method_class("t_reg")
    res = cls(cls.Config(reg_weight=0.0))(t, batch, CreditContext(scorer=RefusingScorer(), tokenizer=tok))
    assert torch.equal(res.advantages, _grpo(t, batch).advantages)
    assert res.overhead.extra_forward_passes == 0


@pytest.mark.parametrize("squash", ["sigmoid", "none"])
def test_treg_token_rewards_match_direct_contrastive_computation(models, squash):
    from stages.rollout.scorer import HFScorer

    model, _, tok = models
    batch = make_batch(tok, seed=4)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    cls = get_method_class("t_reg")
    cfg = cls.Config(reg_weight=0.5, squash=squash)
    scorer = HFScorer(model, tok.pad_token_id)
    res = cls(cfg)(t, batch, CreditContext(scorer=scorer, tokenizer=tok))
    good = tok(cfg.good_instruction, add_special_tokens=False)["input_ids"]
    bad = tok(cfg.bad_instruction, add_special_tokens=False)["input_ids"]
    for i, tr in enumerate(batch.trajectories):
        d = _row_logprobs(model, good + tr.prompt_ids, tr.response_ids) - _row_logprobs(model, bad + tr.prompt_ids, tr.response_ids)
        r = torch.sigmoid(d) - 0.5 if squash == "sigmoid" else d
        m = torch.tensor(tr.policy_mask, dtype=torch.float32)
        n = len(tr.response_ids)
        assert torch.allclose(res.credit[i, :n], r * m, atol=1e-4)
        assert (res.credit[i, n:] == 0).all()
    assert (res.credit != 0).any()
    grpo = _grpo(t, batch)
    m = t.response_mask
    centred = (res.credit - res.credit.sum(-1, keepdim=True) / m.sum(-1, keepdim=True)) * m
    assert torch.allclose(res.advantages, grpo.advantages + 0.5 * centred, atol=1e-6)
    assert res.overhead.extra_forward_passes == scorer.forward_passes == 1
    assert res.granularity == "token"
    # redistribute=false: the token rewards are added uncentred
    raw = cls(cls.Config(reg_weight=0.5, squash=squash, redistribute=False))(t, batch, CreditContext(scorer=scorer, tokenizer=tok))
    assert torch.allclose(raw.advantages, grpo.advantages + 0.5 * res.credit, atol=1e-6)


def test_treg_rejects_unknown_squash_and_needs_scorer(models):
    _, _, tok = models
    batch = make_batch(tok, seed=5)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    cls = get_method_class("t_reg")
    with pytest.raises(ValueError, match="needs \\['scorer', 'tokenizer'\\]"):
        cls(cls.Config())(t, batch, CreditContext())
    with pytest.raises(ValueError, match="credit.squash"):
        I.contrastive_token_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), squash="tanh")
