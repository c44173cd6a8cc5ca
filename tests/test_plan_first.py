"""The plan-first variant (env.plan_first=true; environments/plan_first.py, bifurcation): the
documented plan parse and plan_score, the plan turn does not step the task, the execution turns
and their ground truth (values, advantages, the exported MDP under DP) are the plain episode's,
snapshots, the warm-up corpus, and the sandboxed mode gives the same episodes as in-process."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from environments.ground_truth import GroundTruthCredit
from environments.plan_first import PlanFirstEnv, parse_plan, plan_adherence, plan_score, prepend_plan_turn
from environments.tasks.bifurcation import BifurcationFamily
from environments.tasks.bifurcation_config import BifurcationConfig
from stages.benchmark.oracle import played_advantages, policy_values, stack_mdps
from tests.env_support import play_alike

CFG = BifurcationConfig(horizon=5, num_decisive=2, num_actions=3, slip_prob=0.3, decisive_reward=0.5)
PLAN = replace(CFG, plan_first=True)


def test_plan_parse_and_score():
    assert parse_plan(" B A, C\n", "ABC", 5) == ["B", "A", "C"]
    assert parse_plan(" BACAB\n", "ABC", 3) == ["B", "A", "C"]  # beyond the horizon: ignored
    assert parse_plan("xyz D\n", "ABC", 3) == [] and parse_plan(None, "ABC", 3) == []
    optimal = ("B", None, "A")
    assert plan_score(["B", "C", "A"], optimal) == 1.0  # a routine turn takes any letter
    assert plan_score(["B", "B", "B"], optimal) == 0.5
    assert plan_score(["B"], optimal) == 0.5  # a short plan plans nothing for the rest
    assert plan_score([], (None, None)) == 1.0
    assert plan_adherence(["B", "A"], ["B", "C"]) == 0.5 and plan_adherence(["B"], []) == 0.0


def test_the_plan_turn_does_not_step_the_task_and_the_execution_is_the_plain_episode():
    plain, planned = BifurcationFamily(CFG), BifurcationFamily(PLAN)
    rng = random.Random(3)
    for inst in plain.instances("train", 6, seed=2):
        seed = rng.getrandbits(31)
        e0, e1 = plain.make(inst, episode_seed=seed), planned.make(inst, episode_seed=seed)
        assert isinstance(e1, PlanFirstEnv)
        prompt = e0.reset()
        plan_prompt = e1.reset()
        header, first_obs = prompt.rsplit("\n", 1)
        assert plan_prompt == header + "\nplan for cues " + " ".join(inst.spec["cues"]) + ":"
        inner_before = e1.inner.snapshot()
        key = e1.state_key()
        text = " " + "".join(rng.choice("ABC") for _ in range(5)) + "\n"
        r = e1.step(text)
        # the plan turn: recorded, no transition, no reward, the first observation follows
        assert e1.inner.snapshot() == inner_before and key == e1.inner.state_key() + "|plan"
        assert (r.reward, r.done, r.observation, r.state_key) == (0.0, False, first_obs, e0.state_key())
        assert r.info["plan"] and r.action == text.strip() and e1.plan_text == text
        optimal = [a for a in inst.spec["answers"]]
        assert r.info["plan_score"] == plan_score(list(text.strip()), tuple(optimal))
        actions0, actions1 = [], [r.action]
        while True:
            a = rng.choice([" A\n", " B\n", " C\n", " D\n"])
            s0, s1 = e0.step(a), e1.step(a)
            assert s0 == s1
            actions0.append(s0.action)
            actions1.append(s1.action)
            if s0.done:
                break
        gt0, gt1 = e0.ground_truth(actions0), e1.ground_truth(actions1)
        # the plan turn: advantage 0, value of the first state; execution turns unchanged
        assert (gt1.value[0], gt1.q_value[0], gt1.advantage[0], gt1.decisive[0]) == (gt0.value[0], gt0.value[0], 0.0, False)
        assert (gt1.value[1:], gt1.q_value[1:], gt1.advantage[1:], gt1.decisive[1:]) == (
            gt0.value, gt0.q_value, gt0.advantage, gt0.decisive)
        # the exported MDP: a no-op turn 0; exact DP under the uniform reference gives the same advantages
        m0, m1 = gt0.mdp, gt1.mdp
        assert m1.horizon == m0.horizon + 1 and m1.states == m0.states[:1] + m0.states
        A = len(m0.actions)
        uni = torch.zeros(A, dtype=torch.float64)
        uni[:3] = 1 / 3
        idx0 = [m0.actions.index(a) for a in actions0]
        idx1 = [A - 1] + idx0  # the plan is none of the MDP's actions: scored as the invalid one, a no-op
        adv = []
        for m, idx in ((m0, idx0), (m1, idx1)):
            V, Q = policy_values(stack_mdps([m]), uni.expand(1, m.horizon, A))
            states = torch.full((1, m.horizon), -1, dtype=torch.long)
            acts = torch.full((1, m.horizon), -1, dtype=torch.long)
            states[0, :len(m.states)] = torch.tensor(m.states)
            acts[0, :len(idx)] = torch.tensor(idx)
            adv.append(played_advantages(V, Q, states, acts)[0])
        n = len(actions0)
        assert adv[1][0] == pytest.approx(0.0, abs=1e-12)
        assert torch.allclose(adv[1][1:n + 1], adv[0][:n]) and torch.allclose(adv[0][:n], torch.tensor(gt0.advantage, dtype=torch.float64))
        stats = e1.stats()
        assert stats["plan_score"] == r.info["plan_score"] and 0.0 <= stats["plan_adherence"] <= 1.0
        assert stats["plan_adherence"] == plan_adherence(list(text.strip())[:5], actions0)


def test_snapshots_hold_the_phase_and_the_plan():
    fam = BifurcationFamily(PLAN)
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, episode_seed=5)
    env.reset()
    before = env.snapshot()
    env.step(" BBBBB\n")
    after_plan = env.snapshot()
    first = env.step(" A\n")
    env.restore(after_plan)
    assert env.step(" A\n") == first
    env.restore(before)
    assert not env.planned and env.step(" CCCCC\n").info["plan"] and env.plan == list("CCCCC")
    env.restore(after_plan, reseed=9)  # reseed passes through to the task
    assert env.plan == list("BBBBB")


def test_the_warmup_corpus_opens_with_a_plan_turn():
    fam = BifurcationFamily(PLAN)
    for prompt, turns in fam.warmup_corpus(3, seed=0):
        assert prompt.split("\n")[-1].startswith("plan for cues ")
        plan, obs = turns[0]
        assert len(parse_plan(plan, "ABC", 5)) == 5 and obs == "t1 cue " + prompt.split()[-5]
        assert len(turns) == 1 + 5


def test_prepend_plan_turn_keeps_an_empty_ground_truth():
    gt = GroundTruthCredit(value=[], q_value=[], advantage=[], decisive=[])
    assert prepend_plan_turn(gt) is gt and prepend_plan_turn(None) is None


def test_sandboxed_plan_first_gives_the_in_process_episodes(tmp_path):
    from environments.sandbox import ProcessBackend, SandboxConfig

    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        plain, boxed = BifurcationFamily(PLAN), BifurcationFamily(replace(PLAN, sandboxed=True))
        assert boxed.needs_sandbox
        rng = random.Random(11)
        for inst in plain.instances("train", 2, seed=4):
            seed = rng.getrandbits(31)
            e1, e2 = plain.make(inst, episode_seed=seed), boxed.make(inst, backend.create(), episode_seed=seed)
            assert e1.reset() == e2.reset()
            actions = play_alike(e1, e2, [" ACB\n"] + [rng.choice([" A\n", " B\n", " C\n", "x\n"]) for _ in range(5)])
            assert e1.ground_truth(actions) == e2.ground_truth(actions)
            assert e2.stats()["sandbox_execs"] == len(actions) - 1  # the plan turn runs nothing in the sandbox
            assert e2.stats()["plan_score"] == e1.stats()["plan_score"]
            e2.close()
    finally:
        backend.close()
