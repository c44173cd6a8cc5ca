"""CriticSearch (Zhang et al. 2025, survey §5.2), TARL (Tan et al. 2025, §5.1) and LaRe (Qu et al. 2025,
§5.7): turn credit from an LLM judge reading agent trajectories.

The defining properties are checked with a scripted judge (a test double of the Judge protocol
whose ``prompt_scores`` reads the turn number out of each prompt); the real HFJudge on the tiny
Qwen2 policy runs every method end to end here, and the flow runs with ``credit.judge=policy`` are
in tests/test_methods_flow_turn.py."""

from __future__ import annotations

import re

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, Trajectory, Turn

TURN = re.compile(r"(?:was|did) turn (\d+)", re.IGNORECASE)


class ScriptedJudge:
    """Judge double: ``scores[(task, turn)]`` (default 0.5) for each prompt; records the prompts."""

    def __init__(self, scores=None, default=0.5, explanations=None):
        self.scores = scores or {}
        self.default = default
        self.explanations = explanations or {}
        self.calls = 0
        self.prompts: list[str] = []
        self.proposed: list[str] = []

    def _key(self, prompt):
        task = re.search(r"Task: (\S+)", prompt).group(1)
        return task, int(TURN.findall(prompt)[-1]) - 1

    def prompt_scores(self, prompts):
        self.calls += len(prompts)
        self.prompts += prompts
        return torch.tensor([self.scores.get(self._key(p), self.default) for p in prompts])

    def propose(self, prompts, max_new_tokens):
        self.calls += len(prompts)
        self.proposed += prompts
        out = []
        for p in prompts:
            task = re.search(r"Task: (\S+)", p).group(1)
            k = int(re.search(r"why turn (\d+)", p).group(1)) - 1
            out.append(self.explanations.get((task, k), f"turn {k + 1} of {task} was ordinary"))
        return out

    def step_verdicts(self, batch):  # pragma: no cover - not used by these methods
        raise AssertionError("turn judges use prompt_scores")


def traj(uid, group, n, reward, privileged=None, tokens=2):
    resp, mask, turns = [], [], []
    for k in range(n):
        a0 = len(resp)
        resp += [10 + k] * tokens + [3]
        mask += [True] * tokens + [False]
        turns.append(Turn(index=k, action_span=(a0, a0 + tokens), obs_span=(a0 + tokens, a0 + tokens + 1),
                          action_text=f"act{k}", observation=f"obs{k}"))
    m = len(resp)
    return Trajectory(uid=uid, group_id=group, task_id=f"t{group}", env_name="tooluse", prompt_ids=[1, 2],
                      response_ids=resp, policy_mask=mask, logprobs=[0.0] * m, entropies=[0.0] * m, turns=turns,
                      reward=float(reward), success=reward > 0, prompt_text=f"{uid} question",
                      privileged={"answer": "Paris"} if privileged is None else privileged)


SHAPE = [("r0", 0, 3, 1.0), ("r1", 0, 3, 0.0), ("r2", 0, 2, 1.0), ("r3", 1, 2, 0.0), ("r4", 1, 3, 1.0)]


def make_batch():
    return Batch([traj(*x) for x in SHAPE])


def run(name, batch, judge, **cfg):
    method = build_method(get_method_class(name).Config(**cfg))
    t = batch.to_tensors()
    return method(t, batch, CreditContext(judge=judge)), t


def per_turn(res, t, b, k):
    vals = res.advantages[b][(t.turn_ids[b] == k) & (t.response_mask[b] != 0)]
    assert vals.numel() and torch.allclose(vals, vals[0].expand_as(vals))
    return float(vals[0])


def episode_adv(t):
    return F._grpo_scalars(t.token_level_rewards.float(), (t.response_mask != 0).float(), t.index, 1e-6, True)


def grpo(t):
    return F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]


# --------------------------------------------------------------------------- CriticSearch


def test_criticsearch_dense_turn_rewards_from_a_critic_with_the_gold_answer():
    """Defining property: the critic reads the *whole* trajectory (later turns included) and the gold
    answer; its turn scores, normalised over the group's pooled turns, are added to the outcome
    advantage, so a turn it calls useless drops below its row's other turns by exactly that amount."""
    scores = {("r0", 1): 0.0, ("r0", 0): 1.0, ("r1", 2): 0.9, ("r3", 0): 0.2}
    judge = ScriptedJudge(scores)
    res, t = run("criticsearch", make_batch(), judge, turn_coef=0.5)
    ep = episode_adv(t)
    for g in (0, 1):
        rows = [i for i, x in enumerate(SHAPE) if x[1] == g]
        pool = torch.tensor([scores.get((SHAPE[i][0], k), 0.5) for i in rows for k in range(SHAPE[i][2])])
        mean, std = pool.mean(), pool.std()
        for i in rows:
            for k in range(SHAPE[i][2]):
                c = scores.get((SHAPE[i][0], k), 0.5)
                want = float(ep[i]) + 0.5 * float((c - mean) / (std + 1e-6))
                assert per_turn(res, t, i, k) == pytest.approx(want, abs=1e-5)
    assert per_turn(res, t, 0, 1) < per_turn(res, t, 0, 2) < per_turn(res, t, 0, 0)
    # one retrospective query per turn, each with the full trajectory and the gold answer
    assert judge.calls == sum(x[2] for x in SHAPE) == res.overhead.judge_calls
    first = judge.prompts[0]
    assert "Gold answer: Paris" in first and "Turn 3: action: act2" in first and "Outcome: success" in first
    assert res.stats["judged_turns"] == 13


def test_criticsearch_with_a_constant_critic_is_grpo_and_needs_a_gold_reference():
    """Differential: a critic that scores every turn alike adds nothing (pooled deviation 0): GRPO."""
    res, t = run("criticsearch", make_batch(), ScriptedJudge(default=0.7))
    assert torch.allclose(res.advantages, grpo(t), atol=1e-6)
    res, t = run("criticsearch", make_batch(), ScriptedJudge({("r2", 0): 0.0}))
    assert not torch.allclose(res.advantages, grpo(t), atol=1e-3)
    # the text game's gold path is a gold reference too; a trajectory with neither is refused
    b = Batch([traj("r0", 0, 2, 1.0, {"gold_path": ["open door", "go east"]}), traj("r1", 0, 2, 0.0, {"gold_path": ["x"]})])
    judge = ScriptedJudge()
    run("criticsearch", b, judge)
    assert "Gold path: open door; go east" in judge.prompts[0]
    with pytest.raises(ValueError, match=r"carries no gold answer or gold path"):
        run("criticsearch", Batch([traj("r0", 0, 2, 1.0, {}), traj("r1", 0, 2, 0.0, {})]), ScriptedJudge())
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.method=criticsearch: needs privileged training-time information "
                                          r"\(answer or gold_path in Trajectory.privileged\) and env.name=bifurcation"):
        load_config(["env=bifurcation", "credit=criticsearch"])


# --------------------------------------------------------------------------- TARL


def test_tarl_adjudicated_turn_rewards_enter_as_a_return_to_go():
    """Defining property: each turn is adjudicated -1 / 0 / +1 from the judge's P(yes) (thresholds 0.6 / 0.4);
    turn k's advantage is the outcome advantage plus lambda times the adjudicated rewards of turns k and later."""
    scores = {("r0", 0): 0.9, ("r0", 1): 0.1, ("r0", 2): 0.5, ("r1", 2): 0.95, ("r4", 0): 0.05, ("r4", 2): 0.6}
    judge = ScriptedJudge(scores)
    res, t = run("tarl", make_batch(), judge, turn_coef=0.5, gamma=0.9)
    ep = episode_adv(t)
    adj = lambda s: 1.0 if s >= 0.6 else (-1.0 if s <= 0.4 else 0.0)  # noqa: E731
    for i, (uid, _, n, _) in enumerate(SHAPE):
        r = [adj(scores.get((uid, k), 0.5)) for k in range(n)]
        for k in range(n):
            want = float(ep[i]) + 0.5 * sum(0.9 ** (j - k) * r[j] for j in range(k, n))
            assert per_turn(res, t, i, k) == pytest.approx(want, abs=1e-5)
    # the judge saw the whole trajectory and its outcome, no privileged answer
    assert all("Gold" not in p and "Outcome:" in p and "Did turn" in p for p in judge.prompts)
    assert judge.calls == res.overhead.judge_calls == 13
    assert res.stats["positive_turn_fraction"] == pytest.approx(3 / 13)
    assert res.stats["negative_turn_fraction"] == pytest.approx(2 / 13)


def test_tarl_with_an_all_neutral_judge_is_grpo():
    """Differential: every turn adjudicated 0 (P(yes) inside the neutral band, or unparsed) leaves GRPO."""
    res, t = run("tarl", make_batch(), ScriptedJudge(default=0.5))
    assert torch.allclose(res.advantages, grpo(t), atol=1e-6)
    res, t = run("tarl", make_batch(), ScriptedJudge(default=float("nan")))
    assert torch.allclose(res.advantages, grpo(t), atol=1e-6) and res.stats["judged_turns"] == 0
    res, t = run("tarl", make_batch(), ScriptedJudge({("r1", 0): 1.0}))
    assert not torch.allclose(res.advantages, grpo(t), atol=1e-3)
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"credit.negative_threshold"):
        load_config(["env=bifurcation", "credit=tarl", "credit.negative_threshold=0.7"])


# --------------------------------------------------------------------------- LaRe


class ExplanationJudge(ScriptedJudge):
    """LaRe double: the explanation of (task, step) is given; its score is 0.9 when the explanation says
    "helped", 0.1 when it says "hurt", 0.5 otherwise — the scalar comes from the explanation text only."""

    def prompt_scores(self, prompts):
        self.calls += len(prompts)
        self.prompts += prompts
        out = []
        for p in prompts:
            e = re.search(r"Explanation: (.*)", p).group(1)
            out.append(0.9 if "helped" in e else (0.1 if "hurt" in e else 0.5))
        return torch.tensor(out)


def test_lare_step_rewards_come_from_the_written_explanations():
    """Defining property: the judge first writes why each step helped or hurt; that explanation (and
    only it) is turned into the scalar s, and the step gets A_ep + lambda * (2s - 1). The explanations
    are kept as records (the flow logs them as an MLflow artifact)."""
    expl = {("r0", 0): "it helped: found the city", ("r0", 2): "it hurt: wrong answer", ("r3", 1): "it hurt the search",
            ("r4", 0): "", ("r1", 1): "this helped a bit"}
    judge = ExplanationJudge(explanations=expl)
    res, t = run("lare", make_batch(), judge, step_coef=0.5)
    ep = episode_adv(t)
    for i, (uid, _, n, _) in enumerate(SHAPE):
        for k in range(n):
            e = expl.get((uid, k), f"turn {k + 1} of {uid} was ordinary")
            s = 0.9 if "helped" in e else (0.1 if "hurt" in e else 0.5)
            want = float(ep[i]) + (0.5 * (2 * s - 1) if e else 0.0)  # an empty explanation: no step reward
            assert per_turn(res, t, i, k) == pytest.approx(want, abs=1e-5)
    rec = res.records["explanations"]
    assert len(rec) == 13 and {"prompt", "explanation", "score", "step_reward", "action"} <= set(rec[0])
    r00 = next(r for r in rec if r["uid"] == "r0" and r["step"] == 0)
    assert r00["explanation"] == "it helped: found the city" and r00["score"] == pytest.approx(0.9)
    assert "why turn 1 helped or hurt" in r00["prompt"] and "Turn 3: action: act2" in r00["prompt"]
    assert next(r for r in rec if r["uid"] == "r4" and r["step"] == 0)["score"] is None
    assert judge.calls == res.overhead.judge_calls == 13 + 13  # one explanation + one scoring query per step
    assert res.stats["empty_explanations"] == 1 and res.stats["scored_steps"] == 12


def test_lare_with_uninformative_explanations_is_grpo():
    """Differential: explanations that say neither helped nor hurt score 0.5, step reward 0: GRPO exactly."""
    res, t = run("lare", make_batch(), ExplanationJudge())
    assert torch.allclose(res.advantages, grpo(t), atol=1e-6)
    res, t = run("lare", make_batch(), ExplanationJudge(explanations={("r2", 1): "hurt"}))
    assert not torch.allclose(res.advantages, grpo(t), atol=1e-3)


# --------------------------------------------------------------------------- real judge


@pytest.fixture(scope="module")
def tiny():
    from stages.reward.judge_prompts import critic_turn_prompt
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy

    torch.set_num_threads(1)
    t = traj("r0", 0, 2, 1.0)
    texts = [critic_turn_prompt(t, 0, "Gold answer: Paris") + " yes\n", "act0\nobs0\nact1 answer Paris\n"] * 4
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


@pytest.mark.parametrize("name", ["criticsearch", "tarl", "lare"])
def test_turn_judges_with_the_policy_as_judge(tiny, name):
    """The real HFJudge (the tiny policy): its P(yes) per turn, recomputed here, is what the method used."""
    from stages.reward.judge_hf import HFJudge

    model, tok = tiny
    batch = make_batch()
    # TARL: thresholds around the tiny judge's (near-uniform) P(yes), so that its adjudications are not all neutral
    cfg = {"tarl": dict(positive_threshold=0.01, negative_threshold=0.0)}.get(name, {})
    res, t = run(name, batch, HFJudge(model, tok), **cfg)
    assert res.overhead.judge_calls >= 13 and res.overhead.extra_forward_passes >= 1 and res.overhead.forward_tokens > 0
    assert torch.isfinite(res.advantages).all()
    assert not torch.allclose(res.advantages, grpo(t), atol=1e-6)  # a real judge's scores differ across turns
    if name == "lare":  # real written explanations (greedy text of the tiny policy), each scored
        rec = res.records["explanations"]
        assert len(rec) == 13 and all(isinstance(r["explanation"], str) for r in rec)
        assert res.overhead.extra_tokens > 0  # the explanations' generated tokens


def test_turn_judges_on_an_openai_compatible_endpoint(monkeypatch):
    """credit.judge=openai: the same methods on a scripted OpenAI-compatible server (test double of the
    endpoint, tests/test_judge.py): each turn is one request, the reply's first word the verdict."""
    from stages.reward.judge import make_judge
    from tests.test_judge import _Endpoint

    class TurnEndpoint(_Endpoint):
        @staticmethod
        def reply(body):
            prompt = body["messages"][-1]["content"]
            if "Explanation:" in prompt and "Given this explanation" not in prompt:
                return "it helped" if "why turn 1 " in prompt else "it hurt"
            if "Given this explanation" in prompt:
                return "Yes" if "it helped" in prompt else "No"
            return " Yes." if re.search(r"(?:was|did) turn 1 ", prompt, re.IGNORECASE) else "no"

    ep = TurnEndpoint()
    try:
        monkeypatch.setenv("CF_TEST_TURN_KEY", "sk-test")
        cfg = dict(judge="openai", judge_url=ep.url, judge_model="critic", judge_api_key_env="CF_TEST_TURN_KEY")
        batch = make_batch()
        for name in ("criticsearch", "tarl", "lare"):
            method = build_method(get_method_class(name).Config(**cfg))
            judge = make_judge(method.cfg)
            t = batch.to_tensors()
            res = method(t, batch, CreditContext(judge=judge))
            ep_adv = episode_adv(t)
            # turn 1 is judged useful, the others not: turn 1 of every row is credited above its turn 2
            for i in range(len(SHAPE)):
                assert per_turn(res, t, i, 0) > per_turn(res, t, i, 1)
            assert res.overhead.judge_calls == (26 if name == "lare" else 13)
            if name == "tarl":  # +1 on turn 1, -1 elsewhere, as a return-to-go
                assert per_turn(res, t, 0, 2) == pytest.approx(float(ep_adv[0]) - 0.5, abs=1e-5)
    finally:
        ep.close()
