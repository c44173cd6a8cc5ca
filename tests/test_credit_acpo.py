"""ACPO (Yin et al. 2025; survey §3.3.2): information-gain attribution of steps to the answer,
factorized hierarchical rewards, difficulty-aware step credit. The attribution source is the real
HFScorer on the tiny Qwen2 policy."""

from __future__ import annotations

import math

import pytest
import torch

import stages.credit.methods.attribution  # noqa: F401  (registers acpo)
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.rollout.scorer import HFScorer
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy
from stages.schema import Batch, Trajectory, Turn


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    texts = ["3+4*2\n4*2=8\n3+8=11\nanswer 11\n", "5+1\n5+1=6\nanswer 6\n", "9-2\n9-2=7\nanswer 7\n"] * 8
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


EPISODES = [
    ("3+4*2", ["4*2=8", "3+8=11", "answer 11"], 1.0, 0),
    ("3+4*2", ["3+4=7", "7*2=14", "answer 14"], 0.0, 0),
    ("3+4*2", ["4*2=8", "3+8=12", "8-1=7", "answer 12"], 0.0, 0),
    ("3+4*2", ["4*2=8", "answer 11"], 1.0, 0),
    ("5+1", ["answer 6"], 1.0, 1),
    ("5+1", ["5+1=7", "answer 7"], 0.0, 1),
    ("5+1", ["5+1=6", "answer 6"], 1.0, 1),
]


def make_batch(tok, episodes=EPISODES) -> Batch:
    trajs = []
    for i, (problem, steps, reward, gid) in enumerate(episodes):
        ids, turns = [], []
        for k, s in enumerate(steps):
            a = len(ids)
            ids += tok(s + "\n", add_special_tokens=False)["input_ids"]
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)), action_text=s,
                              observation=""))
        n = len(ids)
        trajs.append(Trajectory(uid=f"a{i}", group_id=gid, task_id=f"task{gid}", env_name="math",
                                prompt_ids=tok(problem + "\n", add_special_tokens=False)["input_ids"], response_ids=ids,
                                policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns,
                                reward=float(reward), success=reward > 0, prompt_text=problem + "\n"))
    return Batch(trajs)


def run(tiny, **cfg):
    model, tok = tiny
    batch = make_batch(tok)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    scorer = HFScorer(model, pad_token_id=tok.pad_token_id, batch_size=8)
    ctx = CreditContext(scorer=scorer)
    method = build_method(get_method_class("acpo").Config(**cfg))
    return method(t, batch, ctx), t, ctx, batch, scorer


def _answer_logprob(model, tok, batch, b, upto_step):
    """log p(answer tokens | prompt + response up to the start of step ``upto_step``), unbatched."""
    tr = batch.trajectories[b]
    a_last, e_last = tr.turns[-1].action_span
    target = tr.response_ids[a_last:e_last]
    ctx = tr.prompt_ids + tr.response_ids[: tr.turns[upto_step].action_span[0]]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + target])).logits[0].float(), -1)
    return float(logp[len(ctx) - 1 : len(ctx) - 1 + len(target)].gather(-1, torch.tensor(target)[:, None]).sum())


def test_registered():
    cls = get_method_class("acpo")
    assert cls.needs == frozenset({"scorer"}) and cls.granularity == "step" and cls.methodology == "Attribution"
    assert "§3.3.2" in cls.reference
    with pytest.raises(ValueError, match="step_weight"):
        build_method(cls.Config(step_weight=1.5))


def test_gains_are_information_gain_about_the_answer(tiny):
    model, tok = tiny
    res, t, ctx, batch, scorer = run(tiny)
    g = ctx.extras["acpo"]["gains"]
    for b, tr in enumerate(batch.trajectories):
        n = len(tr.turns)
        for k in range(n - 1):
            expect = _answer_logprob(model, tok, batch, b, k + 1) - _answer_logprob(model, tok, batch, b, k)
            assert abs(float(g[b, k]) - expect) < 1e-3
        assert torch.isnan(g[b, n - 1:]).all()  # the answer step and absent steps carry no gain
    # one batched scorer call: sum(n) contexts in ceil(./8) forwards; no judge queries
    n_ctx = sum(len(tr.turns) for tr in batch.trajectories if len(tr.turns) >= 2)
    assert res.overhead.extra_forward_passes == scorer.forward_passes == math.ceil(n_ctx / 8)
    assert res.overhead.judge_calls == 0


def test_factorized_rewards_recombine_to_the_total(tiny):
    res, t, ctx, batch, _ = run(tiny, attribution_temperature=0.5)
    ex = ctx.extras["acpo"]
    R = (t.token_level_rewards * t.response_mask).sum(-1)
    assert torch.allclose(torch.nansum(ex["step_rewards"], -1), R, atol=1e-6)
    shares = ex["shares"]
    for b, tr in enumerate(batch.trajectories):
        n = len(tr.turns)
        if n >= 2:  # shares: a distribution over the reasoning steps, answer step 0
            assert abs(float(shares[b, : n - 1].sum()) - 1) < 1e-6 and float(shares[b, n - 1]) == 0
            w = torch.softmax(ex["gains"][b, : n - 1] / 0.5, -1)
            assert torch.allclose(shares[b, : n - 1], w, atol=1e-6)
        else:
            assert float(shares[b, 0]) == 1.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_step_credit_averages_to_the_episode_advantage(tiny, beta):
    res, t, ctx, batch, _ = run(tiny, step_weight=beta)
    base = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0][:, 0]
    for b, tr in enumerate(batch.trajectories):
        n = len(tr.turns)
        credit = res.credit[b, :n]
        assert abs(float(credit[n - 1]) - float(base[b])) < 1e-6  # the answer step keeps the episode advantage
        if n >= 2:
            assert abs(float(credit[: n - 1].mean()) - float(base[b])) < 1e-5
            assert (ex_f := ctx.extras["acpo"]["factors"][b, : n - 1]).min() >= 0  # no sign flips
            assert torch.allclose(credit[: n - 1], base[b] * ex_f, atol=1e-6)
    assert torch.all(res.advantages[t.response_mask == 0] == 0)
    if beta == 0.0:
        grpo = build_method(get_method_class("grpo").Config())(t, batch, CreditContext())
        assert torch.allclose(res.advantages, grpo.advantages, atol=1e-7)
    else:
        assert not torch.allclose(res.advantages, F.grpo(t.token_level_rewards, t.response_mask, t.index)[0])


def test_difficulty_weight_and_curriculum(tiny):
    res0, t, _, _, _ = run(tiny, difficulty_weight=0.0)
    res, _, ctx, batch, _ = run(tiny, difficulty_weight=2.0)
    # group 0: 2/4 solved -> d = 1 + 2*0.5 = 2; group 1: 2/3 solved -> d = 1 + 2/3
    d = torch.tensor([2.0] * 4 + [1 + 2 / 3] * 3)
    assert torch.allclose(ctx.extras["acpo"]["difficulty"], d)
    assert torch.allclose(res.advantages, res0.advantages * d[:, None], atol=1e-6)
    cur = res.curriculum  # persisted with the credit stage's result; the next env stage samples by it
    assert set(cur) == {"task0", "task1"} and all(0 <= v <= 1 for v in cur.values())
    conc = ctx.extras["acpo"]["concentration"]
    assert float(conc[3]) == 1.0 and torch.isnan(conc[4])  # one reasoning step: fully concentrated; none: undefined
    # task0's value is the mean concentration of its four responses (task1: rows 5, 6; row 4 has none)
    assert cur["task0"] == pytest.approx(float(conc[:4].mean()), abs=1e-6)
    assert cur["task1"] == pytest.approx(float(conc[5:7].mean()), abs=1e-6)


def test_curriculum_schedule_concentrated_first_then_uniform():
    """Sampling weights exp(s (1-p) (c - mean c)): concentrated-credit problems preferred early,
    the preference fades to uniform at the last iteration; s = 0 or no scores: uniform (None)."""
    m = build_method(get_method_class("acpo").Config())
    cur = {"sharp": 0.9, "mid": 0.5, "diffuse": 0.1}
    w0 = m.task_weights(cur, 0, 5)
    assert w0["sharp"] > w0["mid"] > w0["diffuse"]
    assert w0["sharp"] == pytest.approx(math.exp(3.0 * 0.4)) and w0["diffuse"] == pytest.approx(math.exp(-3.0 * 0.4))
    w2 = m.task_weights(cur, 2, 5)
    assert 1 < w2["sharp"] < w0["sharp"] and w0["diffuse"] < w2["diffuse"] < 1  # the preference fades
    assert all(v == pytest.approx(1.0) for v in m.task_weights(cur, 4, 5).values())  # last iteration: uniform
    assert m.task_weights({}, 0, 5) is None
    assert build_method(get_method_class("acpo").Config(curriculum_strength=0.0)).task_weights(cur, 0, 5) is None
    with pytest.raises(ValueError, match="curriculum_strength"):
        build_method(get_method_class("acpo").Config(curriculum_strength=-1.0))


def test_env_batch_samples_by_the_weights():
    """The environment stage's weighted draw: deterministic in (seed, iteration, weights), distinct
    instances, and heavily weighted instances are drawn far more often than uniformly."""
    import environments.tasks  # noqa: F401  (registers the built-in families)
    from environments.registry import get_family_class
    from environments.construct import build_env_batch

    fam = get_family_class("math")(get_family_class("math").Config(train_size=40))
    pool = [i.task_id for i in fam.instances("train", 40, 0)]
    heavy = {tid: 50.0 for tid in pool[:5]}
    a = build_env_batch(fam, 5, 2, 40, 3, 0, weights=heavy)
    b = build_env_batch(fam, 5, 2, 40, 3, 0, weights=heavy)
    assert [s.instance.task_id for s in a.slots] == [s.instance.task_id for s in b.slots]
    assert [s.episode_seed for s in a.slots] == [s.episode_seed for s in b.slots]
    hits = uniform_hits = 0
    for it in range(20):
        ids = {s.instance.task_id for s in build_env_batch(fam, 5, 1, 40, it, 0, weights=heavy).slots}
        assert len(ids) == 5
        hits += len(ids & set(pool[:5]))
        uniform_hits += len({s.instance.task_id for s in build_env_batch(fam, 5, 1, 40, it, 0).slots} & set(pool[:5]))
    assert hits >= 60 and uniform_hits <= 30  # of 100 draws: ~4 heavy per batch weighted, ~0.6 uniformly
    with pytest.raises(ValueError, match="weights"):
        build_env_batch(fam, 5, 1, 40, 0, 0, weights={pool[0]: float("nan")})
