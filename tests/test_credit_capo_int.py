"""CAPO (Xie et al. 2025) and InT (Yang et al. 2026): LLM-judged step credit (survey §3.3.3, §3.3.1).

Defining properties are tested with a scripted judge (a test double of the Judge protocol: it
returns given verdicts); the methods are also run end to end with the real HFJudge on the tiny
Qwen2 policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import stages.credit.methods.critic_llm  # noqa: F401  (registers capo, int)
from stages.credit import functional as F
from stages.credit.base import CreditContext, build_method, get_method_class
from stages.reward.judge import HFJudge, correction_prompt, step_prompt
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy
from stages.schema import Batch, Trajectory, Turn

NAN = float("nan")


class ScriptedJudge:
    """Test double of the Judge protocol: fixed verdicts, echo proposals."""

    def __init__(self, verdicts):
        self.verdicts = torch.tensor(verdicts, dtype=torch.float32)
        self.calls = 0
        self.proposed: list[str] = []

    def step_verdicts(self, batch):
        rows = [int(t.uid[1:]) for t in batch.trajectories]
        self.calls += int((~torch.isnan(self.verdicts[rows])).sum())
        return self.verdicts[rows].clone()

    def propose(self, prompts, max_new_tokens):
        self.calls += len(prompts)
        self.proposed += prompts
        return [f"fix{i}" for i in range(len(prompts))]


def make_batch(episodes, tokens_per_step=3, tok=None) -> Batch:
    """``episodes``: list of (steps, reward, group). Steps are one policy turn each; without a
    tokenizer every step is ``tokens_per_step`` arbitrary token ids."""
    trajs = []
    for i, (steps, reward, gid) in enumerate(episodes):
        ids, turns = [], []
        for k, s in enumerate(steps):
            a = len(ids)
            ids += tok(s + "\n", add_special_tokens=False)["input_ids"] if tok else [7 + k] * tokens_per_step
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)), action_text=s,
                              observation=""))
        n = len(ids)
        prompt_text = "3+4*2\n"
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"] if tok else [1, 2]
        trajs.append(Trajectory(uid=f"t{i}", group_id=gid, task_id=f"task{gid}", env_name="math", prompt_ids=prompt_ids,
                                response_ids=ids, policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n,
                                turns=turns, reward=float(reward), success=reward > 0, prompt_text=prompt_text))
    return Batch(trajs)


EPISODES = [
    (["4*2=8", "3+8=11", "answer 11"], 1.0, 0),
    (["3+4=7", "7*2=14", "answer 14"], 0.0, 0),
    (["4*2=8", "3+8=12", "answer 12"], 0.0, 0),
    (["4*2=8", "answer 11"], 1.0, 0),
]


def grpo_adv(t):
    return F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]


def run(name, batch, judge, **cfg):
    cls = get_method_class(name)
    method = build_method(cls.Config(**cfg))
    ctx = CreditContext(judge=judge)
    t = batch.to_tensors()
    return method(t, batch, ctx), t, ctx


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name,methodology", [("capo", "LLM-as-Critic"), ("int", "Intervention")])
def test_registered(name, methodology):
    cls = get_method_class(name)
    assert cls.needs == frozenset({"judge"}) and cls.granularity == "step" and cls.methodology == methodology
    assert "survey §3.3" in cls.reference and not cls.episode_level_baseline
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls.Config))
    with pytest.raises(ValueError, match=r"needs \['judge'\]"):
        build_method(cls.Config())(make_batch(EPISODES).to_tensors(), make_batch(EPISODES), CreditContext())


# --------------------------------------------------------------------------- CAPO


def test_capo_all_correct_is_the_outcome_advantage():
    batch = make_batch(EPISODES)
    res, t, _ = run("capo", batch, ScriptedJudge([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, NAN]]))
    assert torch.allclose(res.advantages, grpo_adv(t), atol=1e-6)
    assert res.granularity == "step" and res.credit.shape == (4, 3)


def test_capo_penalises_exactly_the_wrong_steps():
    batch = make_batch(EPISODES)
    verdicts = [[1, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, NAN]]
    judge = ScriptedJudge(verdicts)
    res, t, _ = run("capo", batch, judge, outcome_weight=2.0, process_weight=1.0)
    base = grpo_adv(t)
    step_tok = t.turn_ids
    wrong = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    expect = base.clone()
    for b in range(4):
        for k in range(3):
            if wrong[b, k]:
                expect[b][step_tok[b] == k] -= 0.5  # W_process / W_whole
    assert torch.allclose(res.advantages, expect, atol=1e-6)
    assert torch.all(res.advantages[t.response_mask == 0] == 0)
    # incorrect-step tokens strictly below correct-step tokens of the same response
    for b in range(3):
        a = res.advantages[b]
        bad = a[(step_tok[b] >= 0) & wrong[b][step_tok[b].clamp(min=0)]]
        good = a[(step_tok[b] >= 0) & ~wrong[b][step_tok[b].clamp(min=0)]]
        assert bad.max() < good.min()
    # asymmetric weighting: a correct response's flawed step still beats every token of a failed one
    assert res.advantages[0][t.response_mask[0] > 0].min() > res.advantages[1:3][t.response_mask[1:3] > 0].max()
    assert res.overhead.judge_calls == judge.calls == 11
    assert res.stats["judged_steps"] == 11 and abs(res.stats["wrong_step_fraction"] - 4 / 11) < 1e-9
    # native step credit: the mean advantage of each step
    assert torch.allclose(res.credit[0], torch.tensor([base[0, 0], base[0, 0] - 0.5, base[0, 0]]), atol=1e-6)


def test_capo_voting():
    batch = make_batch(EPISODES[:2])

    class Alternating(ScriptedJudge):
        def __init__(self, seq):
            super().__init__(seq[0])
            self.seq, self.i = [torch.tensor(s, dtype=torch.float32) for s in seq], 0

        def step_verdicts(self, batch):
            self.verdicts = self.seq[self.i % len(self.seq)]
            self.i += 1
            return super().step_verdicts(batch)

    votes = [[[0, 1, 1], [0, 0, 1]], [[0, 1, 1], [1, 0, 1]], [[1, 0, 1], [1, 0, 1]]]
    # step (0,0) flagged 2/3, (0,1) 1/3, (1,0) 1/3, (1,1) 3/3
    for vote, expect in [("majority", [[1, 0, 0], [0, 1, 0]]), ("intersection", [[0, 0, 0], [0, 1, 0]]),
                         ("union", [[1, 1, 0], [1, 1, 0]])]:
        method = build_method(get_method_class("capo").Config(votes=3, vote=vote))
        wrong, judged = method.wrong_steps(batch, Alternating(votes), 2, 3)
        assert wrong.int().tolist() == expect and judged.all()


def test_capo_config_validation(tmp_path):
    Config = get_method_class("capo").Config
    with pytest.raises(ValueError, match="outcome_weight"):
        build_method(Config(outcome_weight=1.0, process_weight=1.0))
    with pytest.raises(FileNotFoundError, match="credit.judge"):
        build_method(Config(judge=str(tmp_path / "nope")))  # before any compute


# --------------------------------------------------------------------------- InT


def test_int_penalises_exactly_the_first_wrong_step_and_records_the_proposal():
    batch = make_batch(EPISODES)
    judge = ScriptedJudge([[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, NAN]])
    res, t, ctx = run("int", batch, judge, penalty=0.75)
    base = grpo_adv(t)
    expect = base.clone()
    expect[1][t.turn_ids[1] == 1] -= 0.75  # first wrong step of response 1 is step 1 (step 2 untouched)
    expect[2][t.turn_ids[2] == 0] -= 0.75  # first wrong step of response 2 is step 0
    assert torch.allclose(res.advantages, expect, atol=1e-6)
    # steps before the first wrong step are unaffected; so is the successful response 0
    assert torch.equal(res.advantages[1][t.turn_ids[1] == 0], base[1][t.turn_ids[1] == 0])
    assert torch.equal(res.advantages[0], base[0])
    iv = ctx.extras["int_interventions"]
    assert [(i["uid"], i["step"], i["wrong_step"], i["proposal"]) for i in iv] == [
        ("t1", 1, "7*2=14", "fix0"), ("t2", 0, "4*2=8", "fix1")]
    assert iv[0]["prompt"] == correction_prompt("3+4*2\n", ["3+4=7"], "7*2=14")
    assert res.stats["interventions"] == 2 and res.stats["judged_responses"] == 2  # only the failed ones
    assert res.overhead.judge_calls == judge.calls == 6 + 2  # 6 judged steps of 2 failed responses + 2 proposals


def test_int_without_wrong_steps_is_the_base_advantage():
    batch = make_batch(EPISODES)
    judge = ScriptedJudge([[1, 1, 1], [1, 1, 1], [1, 1, NAN], [1, 1, NAN]])
    res, t, ctx = run("int", batch, judge, only_failed=False)
    assert torch.allclose(res.advantages, grpo_adv(t), atol=1e-6)
    assert ctx.extras["int_interventions"] == [] and judge.calls == 10


# --------------------------------------------------------------------------- with a real judge


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    texts = [step_prompt("3+4*2", ["4*2=8"], "3+8=11") + " yes\n", "3+4*2\n4*2=8\n3+8=11\nanswer 11\n"] * 8
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


def test_capo_and_int_with_the_policy_as_judge(tiny):
    model, tok = tiny
    batch = make_batch(EPISODES, tok=tok)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    base = grpo_adv(t)
    for margin in (-1.0, 0.0, 1.0):
        judge = HFJudge(model, tok, margin=margin)
        res = build_method(get_method_class("capo").Config(judge_margin=margin))(t, batch, CreditContext(judge=judge))
        ref = HFJudge(model, tok, margin=margin).step_verdicts(batch)  # the judge's verdicts, recomputed
        wrong = (ref == 0)
        pen = torch.stack([wrong[b].gather(0, t.turn_ids[b].clamp(min=0)) & (t.turn_ids[b] >= 0) for b in range(4)])
        assert torch.allclose(res.advantages, (base - 0.5 * pen.float()) * t.response_mask, atol=1e-6)
        assert res.overhead.judge_calls == 11 and res.overhead.extra_forward_passes >= 1

    judge = HFJudge(model, tok, margin=50.0)  # a strict judge: every step is wrong
    ctx = CreditContext(judge=judge)
    res = build_method(get_method_class("int").Config(propose_max_new_tokens=4))(t, batch, ctx)
    iv = ctx.extras["int_interventions"]
    assert [i["step"] for i in iv] == [0, 0] and all(isinstance(i["proposal"], str) for i in iv)
    assert res.overhead.judge_calls == 6 + 2 and res.overhead.extra_tokens >= 2
    for b in (1, 2):
        on0 = t.turn_ids[b] == 0
        assert torch.allclose(res.advantages[b][on0], base[b][on0] - 1.0)
        assert torch.equal(res.advantages[b][~on0], base[b][~on0])
