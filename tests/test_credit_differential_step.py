"""Differential tests of the judge / process-reward / implicit / attribution / hierarchy methods
against GRPO (issue 13): on a batch where a method's defining signal is present, its advantages
differ from GRPO's exactly where the signal says they must, and agree where it is absent. A
method that silently degenerates to GRPO fails its test here.

Each test computes GRPO's advantages on the same batch (the registry's ``grpo`` with its default
config). Providers: a real tiny Qwen2 policy as judge (CAPO), contrastive scorer (T-REG) and
attribution scorer (ACPO); deterministic test doubles of the ProcessRewards / Judge protocols
where the test is about the estimator's arithmetic (PURE, CAPO).

PURE (Cheng et al. 2025), SPRO (Fei et al. 2025), PRL (Yao et al. 2026): survey §3.3.1; CAPO
(Xie et al. 2025): §3.3.3; T-REG (Zhou et al. 2024): §3.1.2; ACPO (Yin et al. 2025): §3.3.2;
HICRA (Wang et al. 2025c): §3.3.4.
"""

from __future__ import annotations

import pytest
import torch

from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.reward.judge_hf import HFJudge
from stages.reward.judge_prompts import step_prompt
from stages.rollout.scorer import HFScorer
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy
from stages.schema import Batch
from tests.test_credit_acpo import _answer_logprob
from tests.test_credit_acpo import make_batch as acpo_batch
from tests.test_credit_capo_int import EPISODES as CAPO_EPISODES
from tests.test_credit_capo_int import ScriptedJudge
from tests.test_credit_capo_int import make_batch as capo_batch
from tests.test_credit_implicit import make_batch as implicit_batch
from tests.test_credit_process import FixedProcessRewards, make_traj, random_batch


def grpo(t, batch) -> torch.Tensor:
    """GRPO's (B, R) advantages on the same batch (registry method, default config)."""
    cls = get_method_class("grpo")
    return cls(cls.Config())(t, batch, CreditContext()).advantages


def method(name: str, **cfg):
    return build_method(get_method_class(name).Config(**cfg))


def step_tokens(t, b: int, k: int) -> torch.Tensor:
    """(R,) bool: the policy tokens of step (turn) k of row b."""
    return (t.turn_ids[b] == k) & (t.response_mask[b] != 0)


def policy_ordinals(t) -> torch.Tensor:
    """(B, R) index of each policy token among its row's policy tokens (-1 elsewhere)."""
    m = t.response_mask != 0
    return torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(t.turn_ids, -1))


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen2 policy whose corpus holds the judge prompt, the contrastive instructions and
    math steps (so judge, scorer and attribution see non-trivial log-probs)."""
    torch.set_num_threads(1)
    texts = [step_prompt("3+4*2", ["4*2=8"], "3+8=11") + " yes\n", "3+4*2\n4*2=8\n3+8=11\nanswer 11\n",
             "5+1\n5+1=6\nanswer 6\n", "Solve this correctly, checking every step.\n",
             "Solve this carelessly, with mistakes.\n"] * 8
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


# --------------------------------------------------------------------------------------------
# PURE: min-form credit
# --------------------------------------------------------------------------------------------


def test_pure_caps_every_step_before_a_bad_step_where_grpo_is_flat():
    """All four responses solve the task (GRPO: 0 everywhere); response 0 has one bad step (3).
    Min-form credit gives every step up to and including the bad one the bad step's reward
    (minus the leave-one-out baseline), the step after it is not capped."""
    trajs = [make_traj(f"r{j}", 0, [2] * 5, obs_len=1, reward=1.0, seed=j) for j in range(4)]
    batch = Batch(trajs)
    t = batch.to_tensors()
    r = torch.full((4, 5), 0.9)
    r[0, 3] = 0.05
    res = method("pure")(t, batch, CreditContext(process_rewards=FixedProcessRewards(r)))
    g = grpo(t, batch)
    assert torch.equal(g, torch.zeros_like(g))  # premise: no outcome signal, GRPO is flat
    adv = res.advantages
    # differ: every step before the bad step is capped at the bad step's reward; baseline = the
    # other responses' first-step values (all 0.9)
    for k in range(4):
        assert torch.allclose(adv[0][step_tokens(t, 0, k)], torch.tensor(0.05 - 0.9), atol=1e-6), k
    # ... a sum-form return would rank the early steps above the bad one (more good steps follow)
    summed = r[0].flip(-1).cumsum(-1).flip(-1)
    assert float(summed[0]) > float(summed[3]) + 1
    # agree: the step after the bad step is not capped; its value equals the baseline -> GRPO's 0
    assert torch.allclose(adv[0][step_tokens(t, 0, 4)], torch.tensor(0.0), atol=1e-6)
    # the responses without a bad step are flat (no cap) and above their baseline (which holds row 0's 0.05)
    for b in range(1, 4):
        m = t.response_mask[b] != 0
        assert torch.allclose(adv[b][m], torch.tensor(0.9 - (0.05 + 0.9 + 0.9) / 3), atol=1e-6)
    assert (adv[t.response_mask == 0] == 0).all()
    assert res.stats["capped_step_fraction"] == pytest.approx(3 / 20)


@pytest.mark.parametrize("signal", ["absent", "uniform"])
def test_pure_without_process_signal_is_the_outcome_advantage(signal):
    """No process signal (absent rewards, or the same reward on every step of every response):
    PURE is its verifiable-reward RLOO term, n/(n-1) (R - mean_g R) -- GRPO's direction and
    within-group ratios, without GRPO's std division."""
    batch = random_batch(7, groups=3, per_group=4)
    t = batch.to_tensors()
    K = t.max_turns
    r = torch.full((len(batch), K), float("nan") if signal == "absent" else 0.7)
    res = method("pure")(t, batch, CreditContext(process_rewards=FixedProcessRewards(r)))
    g = grpo(t, batch)
    m = t.response_mask != 0
    dr = F.grpo(t.token_level_rewards, t.response_mask, t.index, norm_adv_by_std=False)[0]
    assert torch.allclose(res.advantages, 4 / 3 * dr, atol=1e-6)
    assert torch.equal(torch.sign(res.advantages[m]), torch.sign(g[m]))
    mixed = g.abs().amax(-1) > 0
    assert mixed.any()
    # GRPO's scale differs (std-normalised); the sign and the zero pattern agree
    assert not torch.allclose(res.advantages[mixed], g[mixed], atol=1e-3)


# --------------------------------------------------------------------------------------------
# SPRO: cumulative self-guided process rewards, masked step advantage
# --------------------------------------------------------------------------------------------


def test_spro_masked_step_advantage_against_grpo():
    """Group 0: responses with 6, 4 and 2 policy tokens; only response 0 diverges from the
    reference, at its policy token 2 (log pi - log pi_ref = 1). The cumulative process reward
    beta*1 from that token on is compared, at each policy-token index, with the members still
    active there: GRPO + MSA with MSA = +-beta/2 at indices 2, 3 (two members active), 0 where
    response 0 is alone (4, 5) and before the divergence (0, 1). Group 1 never diverges: GRPO."""
    trajs = [make_traj("a", 0, [3, 3], obs_len=2, reward=1.0, seed=1),
             make_traj("b", 0, [2, 2], obs_len=2, reward=0.0, seed=2),
             make_traj("c", 0, [2], reward=0.0, seed=3),
             make_traj("d", 1, [2, 1], obs_len=1, reward=1.0, seed=4),
             make_traj("e", 1, [3], reward=0.0, seed=5)]
    batch = Batch(trajs)
    t = batch.to_tensors()
    ordn = policy_ordinals(t)
    ref = t.old_logprobs.clone()
    ref[0][ordn[0] == 2] -= 1.0
    beta = 0.5
    res = method("spro", beta=beta)(t, batch, CreditContext(ref_logprobs=ref))
    g = grpo(t, batch)
    diff = res.advantages - g
    expect = torch.zeros_like(diff)
    expect[0][(ordn[0] == 2) | (ordn[0] == 3)] = beta / 2
    expect[1][(ordn[1] == 2) | (ordn[1] == 3)] = -beta / 2
    assert torch.allclose(diff, expect, atol=1e-6)
    # the masked baseline, not the plain group mean over all three (which would give beta*2/3 at 2, 3
    # and beta*2/3 at 4, 5 for response 0)
    assert (expect[0][ordn[0] >= 4] == 0).all() and (ordn[0] >= 4).sum() == 2
    assert (diff[3:] == 0).all() and (res.advantages[t.response_mask == 0] == 0).all()


# --------------------------------------------------------------------------------------------
# PRL: entropy-regularized process rewards
# --------------------------------------------------------------------------------------------


def test_prl_steps_after_a_kl_spend_lose_credit_against_grpo():
    """Response 0 of group 0 spends log pi/pi_ref = 1 on both tokens of its step 1; PRL's process
    reward of steps >= 1 is R - beta*2, step 0 keeps R; the baseline is the group's
    entropy-regularized return. GRPO is constant along every response. Group 1 has no KL spend:
    PRL equals GRPO there."""
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    trajs = [make_traj(f"p{j}", 0 if j < 4 else 1, [2, 2, 2], obs_len=1, reward=rw, seed=j)
             for j, rw in enumerate(rewards)]
    batch = Batch(trajs)
    t = batch.to_tensors()
    ref = t.old_logprobs.clone()
    ref[0][step_tokens(t, 0, 1)] -= 1.0
    beta = 0.25
    res = method("prl", beta=beta)(t, batch, CreditContext(ref_logprobs=ref))
    g = grpo(t, batch)
    adv = res.advantages
    final = torch.tensor([1.0 - beta * 2, 0.0, 0.0, 1.0])  # R - beta * KL of group 0
    mean, std = final.mean(), final.std()
    a0 = adv[0][step_tokens(t, 0, 0)]
    assert torch.allclose(a0, (1.0 - mean) / (std + 1e-6), atol=1e-5)
    for k in (1, 2):  # differ: the steps after the KL spend carry R - beta*KL
        assert torch.allclose(adv[0][step_tokens(t, 0, k)], (final[0] - mean) / (std + 1e-6), atol=1e-5)
    assert float(a0[0] - adv[0][step_tokens(t, 0, 2)][0]) == pytest.approx(beta * 2 / float(std), rel=1e-4)
    m = t.response_mask != 0
    assert float(g[0][m[0]].max() - g[0][m[0]].min()) == 0  # GRPO cannot tell the steps apart
    for b in (1, 2, 3):  # no KL spend: constant along the response, GRPO's sign
        assert torch.allclose(adv[b][m[b]], ((final[b] - mean) / (std + 1e-6)).expand(int(m[b].sum())), atol=1e-5)
        assert torch.equal(torch.sign(adv[b][m[b]]), torch.sign(g[b][m[b]]))
    assert torch.allclose(adv[4:], g[4:], atol=1e-6)  # agree: group 1 has no process signal


# --------------------------------------------------------------------------------------------
# CAPO: judge-flagged steps penalised
# --------------------------------------------------------------------------------------------


def _capo_check(res, t, g, wrong: torch.Tensor, penalty: float) -> None:
    wrong_tok = torch.stack([wrong[b].gather(0, t.turn_ids[b].clamp(min=0)) & (t.turn_ids[b] >= 0)
                             for b in range(wrong.shape[0])]) & (t.response_mask != 0)
    ok_tok = (t.response_mask != 0) & ~wrong_tok
    assert wrong_tok.any() and ok_tok.any()
    assert torch.allclose(res.advantages[wrong_tok], g[wrong_tok] - penalty, atol=1e-6)  # differ: penalised
    assert torch.allclose(res.advantages[ok_tok], g[ok_tok], atol=1e-6)  # agree: unflagged = GRPO
    assert (res.advantages[t.response_mask == 0] == 0).all()


def test_capo_penalises_flagged_steps_and_agrees_with_grpo_elsewhere():
    """Scripted verdicts on a mixed-outcome group and on a group whose responses all fail (GRPO
    0 there): flagged steps' tokens get GRPO - W_process/W_whole, unflagged ones GRPO's."""
    episodes = CAPO_EPISODES + [(["5+1=7", "answer 7"], 0.0, 1), (["5+1=8", "answer 8"], 0.0, 1)]
    batch = capo_batch(episodes)
    t = batch.to_tensors()
    nan = float("nan")
    verdicts = [[1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, nan], [0, 1, nan], [1, 1, nan]]
    judge = ScriptedJudge(verdicts)
    res = method("capo", outcome_weight=2.0, process_weight=0.5)(t, batch, CreditContext(judge=judge))
    g = grpo(t, batch)
    wrong = torch.tensor(verdicts) == 0
    _capo_check(res, t, g, wrong, 0.25)
    assert (g[4:] == 0).all() and (res.advantages[4][step_tokens(t, 4, 0)] == -0.25).all()
    # the outcome stays dominant: a correct response's flagged step keeps more credit than any
    # token of an incorrect response of its group
    assert float(res.advantages[0][step_tokens(t, 0, 1)].min()) > float(res.advantages[1:3][t.response_mask[1:3] != 0].max())
    assert res.overhead.judge_calls == judge.calls == 15
    assert res.stats["judged_steps"] == 15 and res.stats["wrong_step_fraction"] == pytest.approx(3 / 15)


def test_capo_with_the_policy_as_judge_differs_exactly_on_its_flags(tiny):
    """The real HFJudge on the tiny policy, its margin set to the median of its own step scores
    so that it flags some steps and passes others: CAPO differs from GRPO on exactly the flagged
    steps' tokens."""
    model, tok = tiny
    batch = capo_batch(CAPO_EPISODES, tok=tok)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    probe = HFJudge(model, tok)
    probe.step_verdicts(batch)
    scores = probe.last_scores[~torch.isnan(probe.last_scores)]
    margin = float(scores.median())
    judge = HFJudge(model, tok, margin=margin)
    res = method("capo", judge_margin=margin)(t, batch, CreditContext(judge=judge))
    wrong = HFJudge(model, tok, margin=margin).step_verdicts(batch) == 0  # the judge's verdicts, recomputed
    assert 0 < int(wrong.sum()) < int((~torch.isnan(probe.last_scores)).sum())
    _capo_check(res, t, grpo(t, batch), wrong, 0.5)
    assert res.overhead.judge_calls == 11 and res.overhead.extra_forward_passes >= 1


# --------------------------------------------------------------------------------------------
# T-REG: contrastive self-generated token rewards
# --------------------------------------------------------------------------------------------


def test_treg_redistributes_the_outcome_along_each_response(tiny):
    """Real contrastive scoring by the tiny policy. T-REG's advantages differ from GRPO's token by
    token (by reg_weight times the centred token reward), but every response keeps GRPO's total:
    row sums equal GRPO's, also in a group where every response succeeds (GRPO 0, T-REG not)."""

    model, tok = tiny
    batch = implicit_batch(tok, groups=2, per_group=3, seed=6)
    for tr in batch.trajectories[3:]:
        tr.reward, tr.success = 1.0, True
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    scorer = HFScorer(model, tok.pad_token_id, batch_size=None, max_tokens=None)
    treg = method("t_reg", reg_weight=0.1)
    res = treg(t, batch, CreditContext(scorer=scorer, tokenizer=tok))
    g = grpo(t, batch)
    m = t.response_mask != 0
    # the contrastive token rewards, scored separately (their values are pinned against direct
    # forwards in tests/test_credit_implicit.py)
    r, _ = treg.token_rewards(t, batch, CreditContext(scorer=HFScorer(model, tok.pad_token_id, batch_size=None, max_tokens=None), tokenizer=tok))
    n = m.sum(-1, keepdim=True)
    diff = res.advantages - g
    assert torch.allclose(diff, 0.1 * (r - r.sum(-1, keepdim=True) / n) * m, atol=1e-6)
    assert torch.allclose(res.credit, r, atol=1e-6)  # the native credit is the token reward
    # differ: within a response, tokens the good instruction prefers get more credit than GRPO's flat value
    varied = [b for b in range(len(batch)) if int(m[b].sum()) > 1 and float(r[b][m[b]].std()) > 1e-4]
    assert len(varied) >= 4
    for b in varied:
        assert float(diff[b][m[b]].abs().max()) > 1e-5
        hi, lo = int(r[b].masked_fill(~m[b], -9).argmax()), int(r[b].masked_fill(~m[b], 9).argmin())
        assert float(res.advantages[b, hi]) > float(res.advantages[b, lo])
    # agree: every row sums to GRPO's (the outcome fixes each response's total credit) ...
    assert torch.allclose(res.advantages.sum(-1), g.sum(-1), atol=1e-5)
    assert res.stats["row_sum_shift_max"] < 1e-5
    assert (g[3:] == 0).all() and float(res.advantages[3:].abs().max()) > 1e-5
    # ... and the self-reward never flips the outcome's sign where GRPO has one
    s = m & (g != 0)
    assert s.any() and torch.equal(torch.sign(res.advantages[s]), torch.sign(g[s]))
    assert res.overhead.extra_forward_passes == scorer.forward_passes == 1


# --------------------------------------------------------------------------------------------
# ACPO: attribution-weighted factorized credit
# --------------------------------------------------------------------------------------------


def test_acpo_reweights_reasoning_steps_by_their_information_gain(tiny):
    """The real HFScorer on the tiny policy attributes the answer to the reasoning steps. ACPO
    scales GRPO's advantage on each reasoning step by 1 + beta((n-1) softmax(g/tau)_k - 1) of its
    information gain g_k (recomputed here by direct, unbatched forwards), keeps GRPO's value on
    the answer step, and averages to GRPO over the reasoning steps."""
    model, tok = tiny
    batch = acpo_batch(tok)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    beta = 0.5
    scorer = HFScorer(model, pad_token_id=tok.pad_token_id, batch_size=8)
    res = method("acpo", step_weight=beta, attribution_temperature=1.0, difficulty_weight=0.0)(
        t, batch, CreditContext(scorer=scorer))
    g = grpo(t, batch)
    reshaped = 0
    for b, tr in enumerate(batch.trajectories):
        n = len(tr.turns)
        answer = step_tokens(t, b, n - 1)
        assert torch.allclose(res.advantages[b][answer], g[b][answer], atol=1e-6)  # agree: the answer step
        if n < 2:
            m = t.response_mask[b] != 0
            assert torch.allclose(res.advantages[b][m], g[b][m], atol=1e-6)
            continue
        gains = torch.tensor([_answer_logprob(model, tok, batch, b, k + 1) - _answer_logprob(model, tok, batch, b, k)
                              for k in range(n - 1)])
        factors = 1 + beta * ((n - 1) * torch.softmax(gains, -1) - 1)
        step_adv = []
        for k in range(n - 1):
            sel = step_tokens(t, b, k)
            assert torch.allclose(res.advantages[b][sel], g[b][sel] * factors[k], atol=1e-4), (b, k)
            step_adv.append(float(res.advantages[b][sel][0]))
        base = float(g[b][answer][0])
        assert sum(step_adv) / (n - 1) == pytest.approx(base, abs=1e-5)  # conservative decomposition
        if base != 0 and n >= 3:
            reshaped += float(factors.max() - factors.min()) > 1e-3
            # the step carrying the most information about the answer gets the largest |credit|
            assert max(range(n - 1), key=lambda k: abs(step_adv[k])) == int(gains.argmax())
        m = t.response_mask[b] != 0
        assert torch.equal(torch.sign(res.advantages[b][m]), torch.sign(g[b][m]))  # no sign flips (beta <= 1)
    assert reshaped >= 2  # differ: the attribution really reshapes multi-step responses


# HICRA's differential test against GRPO lives with its planning split (the family's declared
# planning text, token by token): tests/test_credit_hicra.py::test_amplification_on_planning_tokens_only
