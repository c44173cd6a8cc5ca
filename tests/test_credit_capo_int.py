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
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.reward.judge_hf import HFJudge
from stages.reward.judge_prompts import correction_prompt, step_prompt
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy
from stages.schema import Batch, Overhead, Trajectory, Turn

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


class ScriptedContinuations:
    """Test double of the MCRollouts provider for InT's arithmetic (the real provider is tested in
    tests/test_credit_int_rollout.py): a rewrite containing "good" rescues the trace (return 1)."""

    def __init__(self):
        self.calls: list = []
        self.last_continuations: list = []

    def __call__(self, starts, k, replacements=None):
        self.calls.append((list(starts), k, list(replacements or [])))
        self.last_continuations = [[[r]] * k for r in replacements]
        ret = torch.tensor([[1.0 if "good" in r else 0.0] * k for r in replacements])
        return ret, Overhead(env_resets=len(starts) * k, env_steps=len(starts) * k)


def run(name, batch, judge, mc=None, **cfg):
    cls = get_method_class(name)
    method = build_method(cls.Config(**cfg))
    ctx = CreditContext(judge=judge, mc_rollouts=mc if mc is not None else ScriptedContinuations())
    t = batch.to_tensors()
    return method(t, batch, ctx), t, ctx


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name,methodology,needs", [("capo", "LLM-as-Critic", {"judge"}),
                                                   ("int", "Intervention", {"judge", "mc_rollouts"})])
def test_registered(name, methodology, needs):
    cls = get_method_class(name)
    assert cls.needs == frozenset(needs) and cls.granularity == "step" and cls.methodology == methodology
    assert "survey §3.3" in cls.reference and not cls.episode_level_baseline
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls.Config))
    with pytest.raises(ValueError, match=r"needs \['judge'"):
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


class Proposer(ScriptedJudge):
    """Scripted judge whose rewrites are given per call (``texts``)."""

    def __init__(self, verdicts, texts):
        super().__init__(verdicts)
        self.texts = list(texts)

    def propose(self, prompts, max_new_tokens):
        self.calls += len(prompts)
        self.proposed += prompts
        return self.texts[: len(prompts)]


def test_int_blames_the_first_wrong_step_by_the_outcome_change_of_its_intervention():
    batch = make_batch(EPISODES)
    verdicts = [[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, NAN]]
    judge = Proposer(verdicts, ["good 7*2=14", "4*2=8 again"])
    mc = ScriptedContinuations()
    res, t, ctx = run("int", batch, judge, mc=mc, penalty=0.75, k=3)
    base = grpo_adv(t)
    expect = base.clone()
    expect[1][t.turn_ids[1] == 1] -= 0.75 * 1.0  # its rewrite rescues the trace: effect 1 - 0
    # response 2's rewrite of step 0 changes nothing (effect 0): no blame, GRPO's advantage
    assert torch.allclose(res.advantages, expect, atol=1e-6)
    assert torch.equal(res.advantages[1][t.turn_ids[1] == 0], base[1][t.turn_ids[1] == 0])
    assert torch.equal(res.advantages[0], base[0]) and torch.equal(res.advantages[2], base[2])
    # the continuation starts at each first wrong step's action start, with the rewrite as its action
    (starts, k, repl), = mc.calls
    assert starts == [(1, batch.trajectories[1].turns[1].action_span[0]), (2, 0)] and k == 3 and repl == ["good 7*2=14", "4*2=8 again"]
    iv = res.records["interventions"]
    assert [(i["uid"], i["step"], i["wrong_step"], i["proposal"], i["effect"]) for i in iv] == [
        ("t1", 1, "7*2=14", "good 7*2=14", 1.0), ("t2", 0, "4*2=8", "4*2=8 again", 0.0)]
    assert iv[0]["prompt"] == correction_prompt("3+4*2\n", ["3+4=7"], "7*2=14")
    assert iv[0]["intervened_returns"] == [1.0] * 3 and iv[0]["original_return"] == 0.0
    assert res.stats["interventions"] == 2 and res.stats["judged_responses"] == 2  # only the failed ones
    assert res.stats["interventions_outcome_changed"] == 1
    assert res.overhead.judge_calls == judge.calls == 6 + 2  # 6 judged steps of 2 failed responses + 2 proposals
    assert res.overhead.env_resets == 6  # the continuations' compute is billed too


def test_int_advantages_follow_the_proposals():
    """Same verdicts, different proposals: different advantages (not independent of the proposals)."""
    batch = make_batch(EPISODES)
    verdicts = [[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, NAN]]
    a, t, _ = run("int", batch, Proposer(verdicts, ["good", "good"]))
    b, _, _ = run("int", batch, Proposer(verdicts, ["bad", "good"]))
    c, _, _ = run("int", batch, Proposer(verdicts, ["bad", "bad"]))
    assert not torch.allclose(a.advantages, b.advantages) and not torch.allclose(b.advantages, c.advantages)
    assert torch.allclose(c.advantages, grpo_adv(t), atol=1e-6)  # no rescue anywhere: GRPO
    # an empty proposal is no intervention: nothing rolled out for it, no blame
    mc = ScriptedContinuations()
    d, _, _ = run("int", batch, Proposer(verdicts, ["", "good"]), mc=mc)
    assert mc.calls[0][0] == [(2, 0)] and d.stats["interventions_empty"] == 1
    assert torch.equal(d.advantages[1], grpo_adv(t)[1].to(d.advantages.dtype))


def test_int_candidates_and_reference_solution():
    batch = make_batch(EPISODES)
    for traj in batch.trajectories:
        traj.privileged = {"answer": "11", "reference_steps": ["4*2=8", "3+8=11"]}
    judge = Proposer([[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, NAN]], ["a", "b", "c", "d"])
    res, _, _ = run("int", batch, judge, candidates="flagged")
    assert [(i["row"], i["step"]) for i in res.records["interventions"]] == [(1, 1), (1, 2), (2, 0), (2, 2)]
    assert all("Reference solution:\n4*2=8\n3+8=11\nanswer 11" in p for p in judge.proposed)
    assert res.stats["interventions_with_reference"] == 4
    judge = Proposer([[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, NAN]], ["a", "b"])
    res, _, _ = run("int", batch, judge, use_reference=False)
    assert not any("Reference" in p for p in judge.proposed) and res.stats["interventions_with_reference"] == 0
    assert "reference solution" in build_method(get_method_class("int").Config()).checklist_note()


def test_int_without_wrong_steps_is_the_base_advantage():
    batch = make_batch(EPISODES)
    judge = ScriptedJudge([[1, 1, 1], [1, 1, 1], [1, 1, NAN], [1, 1, NAN]])
    mc = ScriptedContinuations()
    res, t, ctx = run("int", batch, judge, mc=mc, only_failed=False)
    assert torch.allclose(res.advantages, grpo_adv(t), atol=1e-6)
    assert res.records["interventions"] == [] and judge.calls == 10 and mc.calls == []


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
    mc = ScriptedContinuations()
    ctx = CreditContext(judge=judge, mc_rollouts=mc)
    res = build_method(get_method_class("int").Config(propose_max_new_tokens=4))(t, batch, ctx)
    iv = res.records["interventions"]
    assert [i["step"] for i in iv] == [0, 0] and all(isinstance(i["proposal"], str) for i in iv)
    assert res.overhead.judge_calls == 6 + 2 and res.overhead.extra_tokens >= 2
    for b in (1, 2):  # the scripted continuations never rescue (no "good" in the policy's proposals)
        assert torch.allclose(res.advantages[b], base[b] * t.response_mask[b], atol=1e-6)
