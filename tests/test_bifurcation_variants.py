"""Bifurcation variants with known credit (issue 15): recovery, variable horizon, stochastic slips.

Each variant's exact DP equals exhaustive Monte Carlo of the environment itself under the uniform
policy (every visited state and action, within 4 standard errors) and a hand-computed small case;
the oracle equals the DP (tests/test_credit_oracle.py runs its DP and brute-force tests on the
variants too); on recovery, GRPO credits repaired mistakes positively while the oracle gives them
their true, negative advantage (``credit.gt_repaired_mistake_credit``)."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from fractions import Fraction

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from environments.base import TaskInstance
from environments.tasks.bifurcation import BifurcationFamily
from environments.tasks.bifurcation_config import STOP_ACTION, STOP_CUE, BifurcationConfig, format_action
from environments.tasks.bifurcation_dp import OFF, ON, REPAIR, exact_tables
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.credit.stats import credit_statistics, repaired_mistake_credit
from tests.test_credit_oracle import CharTokenizer, TableScorer, _batch

MC_CONFIGS = [
    dict(horizon=5, num_decisive=2, num_actions=2, slip_prob=0.25),  # slip_prob: the stochastic transitions
    dict(variant="recovery", horizon=5, num_decisive=2, num_actions=2, slip_prob=0.25),
    dict(variant="recovery", horizon=4, num_decisive=2, num_actions=3, terminate_on_error=True, decisive_reward=0.5),
    dict(variant="varh", horizon=5, num_decisive=2, num_actions=2, slip_prob=0.25, continue_cost=0.1),
]


@pytest.mark.parametrize("kw", MC_CONFIGS, ids=lambda kw: kw.get("variant", "decisive"))
def test_dp_equals_exhaustive_monte_carlo_of_the_environment(kw):
    """Play the real environment with uniformly random valid actions (fresh slips per episode);
    the mean return-to-go from every visited (turn, state) and (turn, state, action) is within 4
    standard errors of the DP's V and Q."""
    cfg = BifurcationConfig(**kw)
    fam = BifurcationFamily(cfg)
    rng = random.Random(11)
    checked = 0
    for inst in fam.instances("train", 2, seed=5):
        V, Q = exact_tables(inst.spec, cfg)
        at_v: dict[tuple, list[float]] = defaultdict(list)
        at_q: dict[tuple, list[float]] = defaultdict(list)
        for ep in range(3000):
            env = fam.make(inst, episode_seed=ep)
            env.reset()
            visits, rewards = [], []
            while not env.done:
                t, s = env._t, env._s
                res = env.step(format_action(rng.choice(env.letters)))
                visits.append((t, s, res.action))
                rewards.append(res.reward)
            togo = [sum(rewards[k:]) for k in range(len(rewards))]
            for (t, s, a), g in zip(visits, togo):
                at_v[t, s].append(g)
                at_q[t, s, a].append(g)
        for table, samples in ((lambda k: V[k[0]][k[1]], at_v), (lambda k: Q[k[0]][k[1]][k[2]], at_q)):
            for key, xs in samples.items():
                if len(xs) < 30:
                    continue
                n = len(xs)
                mean = sum(xs) / n
                se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)
                assert abs(mean - float(table(key))) <= 4 * se + 1e-12, (inst.task_id, key, mean, float(table(key)), se)
                checked += 1
    assert checked >= 20


def _instance(spec):
    return TaskInstance(task_id="hand", split="train", seed=1, spec={"rule_seed": 0, **spec})


def test_recovery_hand_computed_case():
    """H=4, decisive turns 0 (answer A) and 2 (answer B), slip 0.1, uniform over A/B; repair
    actions = the rule's action for each cue (A, A, B, A). By hand:
    V3(ON)=1, V3(R)=1/2 (repair A) | V2(ON) = (0.9 + V3(R))/2 = 0.7, V2(R) = 0.9/2 = 0.45 |
    V1(ON)=0.7, V1(R) = 0.7/2 = 0.35 | Q0(ON, A) = 0.9 * 0.7 = 0.63, Q0(ON, B) = V1(R) = 0.35,
    V0(ON) = 0.49: the mistake B at turn 0 has advantage -0.14, repaired or not."""
    cfg = BifurcationConfig(variant="recovery", horizon=4, num_decisive=2, slip_prob=0.1)
    spec = dict(horizon=4, num_actions=2, decisive=[0, 2], cues=["b", "b", "a", "b"], answers=["A", None, "B", None],
                repair=["A", "A", "B", "A"])
    V, Q = exact_tables(spec, cfg)
    assert (V[3][ON], V[3][REPAIR], V[3][OFF]) == (1, Fraction(1, 2), 0)
    approx = lambda *xs: pytest.approx(xs, abs=1e-15)  # noqa: E731  (slip 0.1 is a binary float)
    assert tuple(map(float, (V[2][ON], V[2][REPAIR]))) == approx(0.7, 0.45)
    assert tuple(map(float, (V[1][ON], V[1][REPAIR]))) == approx(0.7, 0.35)
    assert tuple(map(float, (Q[0][ON]["A"], Q[0][ON]["B"], V[0][ON]))) == approx(0.63, 0.35, 0.49)
    # the played episode B (mistake), A (repair), B, A with no slips: success, yet the mistake's credit is -0.14
    fam = BifurcationFamily(cfg)
    env = fam.make(_instance(spec), episode_seed=0)
    env.slips = [False] * 4
    env.reset()
    results = [env.step(format_action(a)) for a in "BABA"]
    assert results[-1].success
    gt = env.ground_truth(env.actions)
    assert gt.mdp.states == [ON, REPAIR, ON, ON]
    assert gt.advantage[0] == pytest.approx(-0.14) and gt.mistake == [True, False, False, False]
    assert gt.decisive == [True, True, True, False]  # decisive turns + the repair turn played
    assert "|on=r" in results[0].state_key
    # a failed repair is off track for good
    env2 = fam.make(_instance(spec), episode_seed=0)
    env2.reset()
    assert not [env2.step(format_action(a)) for a in "BBBA"][-1].success


def test_varh_hand_computed_case():
    """H=4, decisive turn 1 (answer A), stop turn 3 (cue '*'), continue cost 0.05, no slips,
    uniform over A/B/S. By hand: V3(ON) = (1 - 0.05 - 0.05)/3 = 0.3, V3(OFF) = -0.1/3 |
    V2(ON) = (0 + 2 (0.3 - 0.05))/3 = 1/6, V2(OFF) = 2 (-0.05 - 1/30)/3 = -1/18 |
    Q1(ON, A) = 1/6 - 0.05 = 7/60, Q1(ON, B) = -1/18 - 0.05 = -19/180, Q1(ON, S) = 0,
    V1(ON) = (7/60 - 19/180)/3 = 1/270 | V0(ON) = 2 (1/270 - 0.05)/3 = -5/162."""
    cfg = BifurcationConfig(variant="varh", horizon=4, num_decisive=1, continue_cost=0.05)
    spec = dict(horizon=4, num_actions=2, decisive=[1], cues=["a", "b", "b", STOP_CUE], answers=[None, "A", None, None],
                stop_turn=3)
    V, Q = exact_tables(spec, cfg)
    cost = Fraction(0.05)  # the float 0.05 exactly, as the config holds it
    assert V[3][ON] == (1 - 2 * cost) / 3 and V[3][OFF] == -2 * cost / 3
    assert Q[1][ON][STOP_ACTION] == 0 and Q[1][ON]["A"] == V[2][ON] - cost
    assert float(V[1][ON]) == pytest.approx(1 / 270) and float(V[0][ON]) == pytest.approx(-5 / 162)
    fam = BifurcationFamily(cfg)
    env = fam.make(_instance(spec), episode_seed=0)
    prompt = env.reset()
    assert prompt.endswith("A B, or S to stop.\nt1 cue a")
    res = [env.step(format_action(a)) for a in "BAAS"]
    assert [r.observation for r in res] == ["t2 cue b", "t3 cue b", "t4 cue *", "done: success"]
    assert res[-1].success and res[-1].info["terminal_reward"] == 1.0
    assert [r.info["turn_reward"] for r in res] == pytest.approx([-0.05, -0.05, -0.05, 0.0])
    # stopping early ends the episode at once, as a failure (variable length)
    env.reset()
    early = env.step(format_action(STOP_ACTION))
    assert early.done and not early.success and env.ground_truth(env.actions).decisive == [False]


def test_varh_groups_have_variable_lengths_and_time_dependent_values():
    cfg = BifurcationConfig(variant="varh", horizon=6, num_decisive=2, slip_prob=0.1, continue_cost=0.02)
    _, batch, _ = _batch(cfg, n_inst=2, per=16, p_invalid=0.0)
    for g in (0, 1):
        lengths = {len(t.turns) for t in batch.trajectories if t.group_id == g}
        assert len(lengths) >= 3
    fam = BifurcationFamily(cfg)
    inst = fam.instance("train", 0, 0)
    g = inst.spec["stop_turn"]
    assert inst.spec["cues"][g] == STOP_CUE and all(d < g for d in inst.spec["decisive"])
    V, _ = exact_tables(inst.spec, cfg)
    assert len({V[t][ON] for t in range(g + 1)}) == g + 1  # V(t, on track) differs at every turn up to g


def _methods_on(batch, names):
    tensors = batch.to_tensors(pad_token_id=0)
    H = max(len(t.turns) for t in batch.trajectories)
    table = [{format_action(x): 0.5 for x in "AB"} for _ in range(H)]  # the uniform policy: oracle = DP
    ctx = CreditContext(scorer=TableScorer(table), tokenizer=CharTokenizer())
    out = {}
    for name in names:
        res = build_method(get_method_class(name).Config())(tensors, batch, ctx)
        out[name] = credit_statistics(tensors, res)
    return out


def test_grpo_credits_repaired_mistakes_positively_the_oracle_negatively():
    """Recovery: on successful episodes whose mistake was repaired, GRPO gives the mistake the
    episode's positive credit; the oracle (current policy = uniform, so = the DP) its true,
    negative advantage."""
    cfg = BifurcationConfig(variant="recovery", horizon=6, num_decisive=2, slip_prob=0.1)
    _, batch, _ = _batch(cfg, n_inst=4, per=16, seed=2, p_invalid=0.0)
    stats = _methods_on(batch, ["grpo", "oracle"])
    g, o = stats["grpo"], stats["oracle"]
    assert g["gt_repaired_mistakes"] == o["gt_repaired_mistakes"] >= 5
    assert g["gt_repaired_mistake_advantage"] < 0
    assert g["gt_repaired_mistake_credit"] > 0 and g["gt_repaired_mistake_positive_share"] > 0.5
    assert o["gt_repaired_mistake_credit"] == pytest.approx(o["gt_repaired_mistake_advantage"], abs=1e-6)
    assert o["gt_repaired_mistake_positive_share"] == 0.0
    # the layout: a routine repair turn after every decisive turn
    fam = BifurcationFamily(cfg)
    for inst in fam.instances("train", 50, seed=0):
        d = inst.spec["decisive"]
        assert len(d) == 2 and d[-1] < cfg.horizon - 1 and all(b - a >= 2 for a, b in zip(d, d[1:]))
    # the plain decisive variant marks no mistakes (none can be repaired): no such metric
    _, plain, _ = _batch(BifurcationConfig(horizon=6, num_decisive=2), n_inst=1, per=4, p_invalid=0.0)
    assert plain.to_tensors(pad_token_id=0).gt_repaired_mistake is None


def test_repaired_mistake_credit_hand_case():
    credit = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, 0.0]])
    adv = torch.tensor([[-0.25, 0.0, -0.75], [0.0, 1.0, 0.0]])
    flags = torch.tensor([[True, False, True], [False, False, False]])
    out = repaired_mistake_credit(credit, adv, flags)
    assert out == {"gt_repaired_mistakes": 2.0, "gt_repaired_mistake_credit": 1.25,
                   "gt_repaired_mistake_advantage": -0.5, "gt_repaired_mistake_positive_share": 1.0}
    assert repaired_mistake_credit(credit, adv, torch.zeros_like(flags)) == {"gt_repaired_mistakes": 0.0}


@pytest.mark.parametrize("overrides,key", [
    (["env=bifurcation_recovery", "env.distractors=false"], "env.distractors"),
    (["env=bifurcation", "env.continue_cost=0.1"], "env.continue_cost"),
    (["env=bifurcation_varh", "env.num_decisive=6"], "env.num_decisive"),
    (["env=bifurcation_recovery", "env.num_decisive=4"], "env.num_decisive"),
    (["env=bifurcation_recovery", "env.sandboxed=true"], "env.sandboxed"),
    (["env.variant=nosuch"], "env.variant"),
])
def test_variant_config_rules(overrides, key):
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{key}=")


def test_variant_configs_load():
    from flows.config import load_config

    rec = load_config(["env=bifurcation_recovery"]).env
    varh = load_config(["env=bifurcation_varh"]).env
    assert (rec.variant, varh.variant) == ("recovery", "varh")
    assert rec.slip_prob > 0 and varh.slip_prob > 0 and varh.continue_cost > 0


def test_oracle_on_recovery_runs_through_the_flow(prefect_harness, shared_home):
    """One iteration of ``creditflow train env=bifurcation_recovery credit=oracle``: the
    repaired-mistake metrics are logged, and the oracle's credit agrees in sign with the exact
    advantage (so a repaired mistake, if any was played, gets negative credit)."""
    from flows import api

    out = api.start_run(["iterations=1", "rollout.tasks_per_iteration=4", "rollout.group_size=4", "eval_episodes=4",
                         "env=bifurcation_recovery", "tracking.heatmap_every=0", "credit=oracle"],
                        home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["env.variant"] == "recovery"
    assert m["credit.gt_sign_agreement"] == 1.0
    assert "credit.gt_repaired_mistakes" in m
    if m["credit.gt_repaired_mistakes"] > 0:
        assert m["credit.gt_repaired_mistake_credit"] < 0
        assert m["credit.gt_repaired_mistake_positive_share"] == 0.0
