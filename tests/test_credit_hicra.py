"""HICRA (Wang et al. 2025c; survey §3.3.4): A' = A + alpha*|A| on the tokens of the task family's
planning text (its strategic grams), GRPO elsewhere. Tokens come from the real locally trained
BPE tokenizer; the family texts are the families' own warm-up episodes (real observations)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import stages.credit.methods.planning  # noqa: F401  (registers hicra)
import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.planning_text import STRATEGIC_GRAMS, grams_pattern
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.methods.planning import _step_token_plan
from stages.rollout.policy import _episode_texts, build_tokenizer
from stages.schema import Batch, Trajectory, Turn

PROSE = grams_pattern(STRATEGIC_GRAMS)


def _family(name: str, **cfg):
    cls = get_family_class(name)
    return cls(cls.Config(**cfg))


@pytest.fixture(scope="module")
def tok():
    texts = _episode_texts(_family("math").warmup_corpus(64, 0)) + _episode_texts(_family("tooluse").warmup_corpus(64, 0))
    texts += ["Let's try the product first\nfirst multiply 4 by 2\nWait, we need to add 3\nalternatively\n"] * 4
    return build_tokenizer(384, texts)


def make_batch(tok, episodes, env="math") -> Batch:
    """``episodes``: (prompt, [action text, ...], reward, group id); token ids from the tokenizer and
    ``action_text`` decoded from them, as the agent loop does."""
    trajs = []
    for i, (prompt, steps, reward, gid) in enumerate(episodes):
        ids, turns = [], []
        for k, s in enumerate(steps):
            a = len(ids)
            step_ids = tok(s if s.endswith("\n") else s + "\n", add_special_tokens=False)["input_ids"]
            ids += step_ids
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)),
                              action_text=tok.decode(step_ids, skip_special_tokens=True), observation=""))
        n = len(ids)
        trajs.append(Trajectory(uid=f"h{i}", group_id=gid, task_id=f"task{gid}", env_name=env,
                                prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"], response_ids=ids,
                                policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns,
                                reward=float(reward), success=reward > 0, prompt_text=prompt))
    return Batch(trajs)


EPISODES = [
    ("3+4*2\n", ["Let's try the product first", "4*2=8", "3+8=11", "answer 11"], 1.0, 0),
    ("3+4*2\n", ["3+4=7", "7*2=14", "answer 14"], 0.0, 0),
    ("3+4*2\n", ["first multiply 4 by 2", "4*2=8", "Wait, we need to add 3", "answer 11"], 1.0, 0),
    ("3+4*2\n", ["4*2=8", "answer 12"], 0.0, 0),
    ("5+1\n", ["5+1=6", "answer 6"], 1.0, 1),
    ("5+1\n", ["alternatively 1+5=6", "answer 6"], 0.0, 1),
]


def run(tok, batch, pattern, **cfg):
    method = build_method(get_method_class("hicra").Config(**cfg))
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    ctx = CreditContext(tokenizer=tok, planning_pattern=pattern)
    return method(t, batch, ctx), t, method


def plan_text(tok, batch, mask, b, k) -> str:
    """The decoded planning tokens of step ``k`` of trajectory ``b``."""
    tr = batch.trajectories[b]
    a, e = tr.turns[k].action_span
    return "".join(tok.decode([i]) for i, m in zip(tr.response_ids[a:e], mask[b, a:e].tolist()) if m)


def test_registered():
    cls = get_method_class("hicra")
    assert cls.granularity == "step" and cls.methodology == "Hierarchy"
    assert cls.needs == frozenset({"planning_pattern", "tokenizer"})
    assert "§3.3.4" in cls.reference
    for f in dataclasses.fields(cls.Config):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_planning_tokens_are_the_strategic_grams(tok):
    batch = make_batch(tok, EPISODES)
    _, t, m = run(tok, batch, PROSE)
    mask = m.planning_tokens(batch, t.response_ids.shape[1], tok, PROSE)
    assert plan_text(tok, batch, mask, 0, 0).lower().replace(" ", "") == "let'stryfirst"  # not "the product"
    assert plan_text(tok, batch, mask, 2, 2).lower().replace(" ", "") == "waitweneedto"
    assert plan_text(tok, batch, mask, 5, 0).strip() == "alternatively"  # not "1+5=6"
    for b, k in [(0, 1), (1, 0), (1, 2), (3, 0), (4, 0)]:
        assert plan_text(tok, batch, mask, b, k) == ""
    assert not re.search(PROSE, "the letter meets") and re.search(PROSE, "Let me think")  # whole words


def test_tokens_that_do_not_decode_piece_by_piece_mark_the_whole_step():
    rx = re.compile(PROSE)
    assert _step_token_plan(rx, "first add", ["fir", "st", " add"]).tolist() == [True, True, False]
    assert _step_token_plan(rx, "first add", ["fir", "\ufffd", " add"]).tolist() == [True, True, True]
    assert _step_token_plan(rx, "3+4=7", ["3", "+", "4", "=", "7"]).tolist() == [False] * 5


@pytest.mark.parametrize("alpha", [0.2, 0.5, 1.0])
def test_amplification_on_planning_tokens_only(tok, alpha):
    batch = make_batch(tok, EPISODES)
    res, t, m = run(tok, batch, PROSE, alpha=alpha)
    base = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    tok_plan = m.planning_tokens(batch, t.response_ids.shape[1], tok, PROSE) & (t.response_mask > 0)
    assert tok_plan.any() and (~tok_plan & (t.response_mask > 0)).any()
    assert torch.equal(res.advantages[~tok_plan], base[~tok_plan])  # execution tokens: exactly GRPO
    assert torch.allclose(res.advantages[tok_plan], base[tok_plan] + alpha * base[tok_plan].abs(), atol=1e-7)
    pos, neg = tok_plan & (base > 0), tok_plan & (base < 0)
    assert pos.any() and neg.any()  # (1 + alpha) on good responses, (1 - alpha) on bad ones
    assert torch.allclose(res.advantages[pos], (1 + alpha) * base[pos]) and torch.allclose(res.advantages[neg], (1 - alpha) * base[neg])
    assert torch.all(res.advantages[t.response_mask == 0] == 0)
    assert res.granularity == "step" and res.credit.shape == (6, 4)
    assert res.stats["planning_token_fraction"] == pytest.approx(float(tok_plan.sum() / (t.response_mask > 0).sum()))
    assert 0 < res.stats["planning_token_fraction"] < 1
    assert res.stats["planning_step_fraction"] == pytest.approx(4 / 17)


def test_alpha_zero_is_grpo(tok):
    batch = make_batch(tok, EPISODES)
    res, t, _ = run(tok, batch, PROSE, alpha=0.0)
    grpo = build_method(get_method_class("grpo").Config())(t, batch, CreditContext())
    assert torch.equal(res.advantages, grpo.advantages)


def _warmup_batch(tok, family, n=48):
    """The family's own warm-up episodes (real prompts, actions, observations), two groups with
    different rewards so the GRPO advantages are not zero."""
    corpus = family.warmup_corpus(n, 1)
    eps = [(prompt, [a for a, _ in turns], float(i % 2), i % 4) for i, (prompt, turns) in enumerate(corpus)]
    return make_batch(tok, eps, env=family.name)


def test_math_family_plans_with_default_settings(tok):
    """Math steps are one operation: the left-hand side (operands, operator) plans, '=<result>' and
    the answer line execute; with the family's declared pattern and default alpha."""
    fam = _family("math")
    batch = _warmup_batch(tok, fam)
    res, t, m = run(tok, batch, fam.planning_pattern)
    assert 0 < res.stats["planning_token_fraction"] < 1
    mask = m.planning_tokens(batch, t.response_ids.shape[1], tok, fam.planning_pattern)
    seen = 0
    for b, tr in enumerate(batch.trajectories):
        for k, turn in enumerate(tr.turns):
            text, planned = turn.action_text, plan_text(tok, batch, mask, b, k)
            if text.lower().startswith("answer"):
                assert planned == ""
            else:  # "a+b=c": the planning tokens are the left-hand side
                lhs = text.split("=", 1)[0]
                assert planned.strip() == lhs.strip(), (text, planned)
                seen += 1
    assert seen > 10
    plan = mask & (t.response_mask > 0)
    base = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    assert torch.allclose(res.advantages[plan], base[plan] + 0.2 * base[plan].abs(), atol=1e-7)
    assert torch.equal(res.advantages[~plan], base[~plan])


def test_tooluse_family_plans_with_search_and_write(tok):
    fam = _family("tooluse")
    batch = _warmup_batch(tok, fam)
    res, t, m = run(tok, batch, fam.planning_pattern)
    assert 0 < res.stats["planning_token_fraction"] < 1
    mask = m.planning_tokens(batch, t.response_ids.shape[1], tok, fam.planning_pattern)
    tools = set()
    for b, tr in enumerate(batch.trajectories):
        for k, turn in enumerate(tr.turns):
            tool = turn.action_text.split(" ", 1)[0].strip()
            tools.add(tool)
            planned = plan_text(tok, batch, mask, b, k)
            assert planned.rstrip("\n") == (turn.action_text.rstrip("\n") if tool in ("search", "write") else "")
    assert {"search", "write", "calc", "read", "answer"} <= tools


@pytest.mark.parametrize("name", ["bifurcation", "code"])
def test_families_without_planning_text_refuse_hicra(name):
    """One-letter actions (bifurcation, also its sandboxed mode) and one ``return`` line (code) have
    no planning text: HICRA there would be GRPO, so the loader refuses it with the reason."""
    from flows.config import ConfigError, load_config

    assert get_family_class(name).planning_pattern is None
    with pytest.raises(ConfigError, match=rf"^credit.method=hicra: needs planning text and env.name={name} declares none"):
        load_config([f"env={name}", "credit=hicra"])


def test_math_and_tooluse_accept_hicra():
    from flows.config import load_config

    for exp in ("math", "tooluse"):
        assert load_config([f"experiment={exp}", "credit=hicra"]).credit.method == "hicra"


def test_negative_alpha_rejected():
    with pytest.raises(ValueError, match="alpha"):
        build_method(get_method_class("hicra").Config(alpha=-0.1))
