"""Bifurcation task family: exact ground truth vs brute force, dynamics, text protocol, splits."""

from __future__ import annotations

import re

import itertools
import json
import math
import random
from collections import Counter
from dataclasses import replace
from fractions import Fraction

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.tasks.bifurcation import BifurcationFamily
from environments.tasks.bifurcation_config import (
    LETTERS,
    STOP_TEXT,
    BifurcationConfig,
    format_action,
    make_rule,
    parse_action,
)
from environments.tasks.bifurcation_dp import exact_values
from environments.tasks.bifurcation_env import BifurcationEnv

# ----------------------------------------------------------------------------- brute force
# An independent reference, written from the task semantics (not from the module's DP):
# the expected return of every open-loop action sequence, by enumerating every slip outcome.


def _simulate(spec, cfg, t0, on, actions, slips):
    """Return (sum of turn rewards + terminal reward) of ``actions`` played from (t0, on)."""
    decisive = set(spec["decisive"])
    total = Fraction(0)
    for k, a in enumerate(actions):
        t = t0 + k
        is_dec = t in decisive
        right = is_dec and a is not None and a == spec["answers"][t]
        if right:
            total += Fraction(cfg.decisive_reward)
            if slips[k]:
                on = False
        elif a is None or is_dec:  # invalid action, or a wrong letter at a decisive turn
            on = False
            if cfg.terminate_on_error:
                return total  # ends at once, terminal reward 0
    return total + (1 if on else 0)


def _expected_return(spec, cfg, t0, on, actions):
    p = Fraction(cfg.slip_prob)
    exp = Fraction(0)
    for slips in itertools.product((False, True), repeat=len(actions)):
        prob = Fraction(1)
        for s in slips:
            prob *= p if s else 1 - p
        if prob:
            exp += prob * _simulate(spec, cfg, t0, on, actions, slips)
    return exp


def brute_force_values(spec, cfg):
    """V[t][on] and Q[t][on][a] by enumerating all continuations (valid letters) and slips.

    Uniform reference: the mean over all continuations. Optimal reference: the max over
    open-loop continuations, which equals the closed-loop optimum here because the rule's
    action is optimal whatever the (hidden) on-track bit."""
    H = spec["horizon"]
    letters = list(LETTERS[: spec["num_actions"]])
    agg = max if cfg.reference_policy == "optimal" else (lambda xs: sum(xs, Fraction(0)) / len(xs))
    V, Q = {}, {}
    for t in range(H):
        for on in (False, True):
            rests = list(itertools.product(letters, repeat=H - t - 1))
            for a in letters + [None]:
                Q[t, on, a] = agg([_expected_return(spec, cfg, t, on, (a,) + r) for r in rests])
            V[t, on] = agg([Q[t, on, a] for a in letters])
    return V, Q


CONFIGS = [
    dict(horizon=4, num_decisive=2, num_actions=2),
    dict(horizon=4, num_decisive=2, num_actions=2, slip_prob=0.25),
    dict(horizon=4, num_decisive=2, num_actions=3, slip_prob=0.1, decisive_reward=0.3),
    dict(horizon=5, num_decisive=3, num_actions=2, slip_prob=0.2, terminate_on_error=True),
    dict(horizon=4, num_decisive=1, num_actions=3, terminate_on_error=True, decisive_reward=0.5),
    dict(horizon=3, num_decisive=3, num_actions=2, slip_prob=0.5, distractors=False),
    dict(horizon=4, num_decisive=0, num_actions=2),
]


@pytest.mark.parametrize("ref", ["uniform", "optimal"])
@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_dp_equals_brute_force(kw, ref):
    cfg = BifurcationConfig(**kw, reference_policy=ref)
    fam = BifurcationFamily(cfg)
    for inst in fam.instances("train", 3, seed=7):
        V, Q = exact_values(inst.spec, cfg)
        Vb, Qb = brute_force_values(inst.spec, cfg)
        H = inst.spec["horizon"]
        assert V[H][:2] == [0.0, 1.0]
        for t in range(H):
            for on in (0, 1):
                assert V[t][on] == pytest.approx(float(Vb[t, bool(on)]), abs=1e-12)
                for a in list(LETTERS[: cfg.num_actions]) + [None]:
                    assert Q[t][on][a] == pytest.approx(float(Qb[t, bool(on), a]), abs=1e-12), (t, on, a)


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_env_dynamics_match_reference_simulator(kw):
    """Realised returns of the live environment equal the reference simulator's on the env's slip table."""
    cfg = BifurcationConfig(**kw)
    fam = BifurcationFamily(cfg)
    rng = random.Random(0)
    choices = list(LETTERS[: cfg.num_actions]) + [None]
    for inst in fam.instances("train", 4, seed=1):
        for ep in range(25):
            env = fam.make(inst, episode_seed=ep)
            env.reset()
            taken, total, res = [], 0.0, None
            while res is None or not res.done:
                a = rng.choice(choices)
                res = env.step(format_action(a) if a else "?\n")
                taken.append(a)
                total += res.reward  # turn rewards; the final step's includes the terminal reward
                assert res.info["turn_reward"] == (res.reward - res.info.get("terminal_reward", 0.0))
            ref = _simulate(inst.spec, cfg, 0, True, taken, [env.slips[t] for t in range(len(taken))])
            assert total == pytest.approx(float(ref), abs=1e-12)
            assert res.success == (res.info["terminal_reward"] == 1.0)
            if not cfg.terminate_on_error:
                assert len(taken) == cfg.horizon


def test_ground_truth_advantages_routine_zero_decisive_positive():
    cfg = BifurcationConfig(horizon=6, num_decisive=2, num_actions=3, slip_prob=0.1)
    fam = BifurcationFamily(cfg)
    rng = random.Random(3)
    for inst in fam.instances("train", 10, seed=0):
        answers = inst.spec["answers"]
        for ep in range(5):
            env = fam.make(inst, episode_seed=ep)
            env.reset()
            acts = []
            for t in range(cfg.horizon):
                # play correct decisive actions (so we stay on track unless a slip happens)
                a = answers[t] if answers[t] is not None else rng.choice("ABC")
                env.step(format_action(a))
                acts.append(a)
            gt = env.ground_truth(env.actions)
            assert env.actions == acts
            assert gt.decisive == [t in inst.spec["decisive"] for t in range(cfg.horizon)]
            assert gt.reference_policy == "uniform"
            on = True
            for t in range(cfg.horizon):
                assert gt.advantage[t] == gt.q_value[t] - gt.value[t] or math.isclose(
                    gt.advantage[t], gt.q_value[t] - gt.value[t], abs_tol=1e-15
                )
                if not gt.decisive[t]:
                    assert gt.advantage[t] == 0.0  # exactly
                elif on:
                    assert gt.advantage[t] > 0
                if gt.decisive[t] and env.slips[t]:
                    on = False
    # wrong decisive and invalid actions get negative advantage while on track
    inst = fam.instances("train", 1, seed=0)[0]
    d = inst.spec["decisive"][0]
    wrong = next(x for x in "ABC" if x != inst.spec["answers"][d])
    acts = ["A"] * d + [wrong]
    gt = fam.make(inst).ground_truth(acts)
    assert gt.advantage[d] < 0
    gt = fam.make(inst).ground_truth(["A"] * d + [None])
    assert gt.advantage[d] < 0


def test_optimal_reference_advantages_nonpositive():
    cfg = BifurcationConfig(horizon=5, num_decisive=2, num_actions=3, slip_prob=0.2, reference_policy="optimal")
    fam = BifurcationFamily(cfg)
    rng = random.Random(1)
    for inst in fam.instances("eval", 5, seed=2):
        acts = [rng.choice(["A", "B", "C", None]) for _ in range(cfg.horizon)]
        gt = fam.make(inst, episode_seed=1).ground_truth(acts)
        assert gt.reference_policy == "optimal"
        for t, a in enumerate(acts):
            assert gt.advantage[t] <= 0
            if inst.spec["answers"][t] is not None and a == inst.spec["answers"][t]:
                assert gt.advantage[t] == 0


def test_ground_truth_rejects_actions_beyond_episode():
    cfg = BifurcationConfig(horizon=3, num_decisive=1, terminate_on_error=True)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=0)[0]
    env = fam.make(inst)
    with pytest.raises(ValueError):
        env.ground_truth(["A", "A", "A", "A"])
    with pytest.raises(ValueError):
        env.ground_truth([None, "A"])  # terminated at turn 0


def test_determinism():
    cfg = BifurcationConfig(horizon=6, num_decisive=2, num_actions=3, slip_prob=0.3)
    a = BifurcationFamily(cfg).instances("train", 20, seed=5)
    b = BifurcationFamily(cfg).instances("train", 20, seed=5)
    assert [(i.task_id, i.seed, i.spec) for i in a] == [(i.task_id, i.seed, i.spec) for i in b]
    assert BifurcationFamily(cfg).instances("train", 5, seed=5) == a[:5]  # prefix-stable
    c = BifurcationFamily(cfg).instances("train", 20, seed=6)
    assert [i.spec for i in a] != [i.spec for i in c]
    for inst in a[:5]:
        json.dumps(inst.spec)  # JSON-serialisable

    def play(episode_seed):
        env = BifurcationFamily(cfg).make(a[0], episode_seed=episode_seed)
        out = [env.reset()]
        for t in range(cfg.horizon):
            r = env.step(format_action("ABC"[t % 3]))
            out.append((r.observation, r.reward, r.state_key, r.success))
        return out, env.slips

    assert play(11) == play(11)
    slips = {tuple(play(s)[1]) for s in range(30)}
    assert len(slips) > 1  # episode seeds give different slip outcomes
    assert BifurcationFamily(cfg).warmup_corpus(4, seed=1) == BifurcationFamily(cfg).warmup_corpus(4, seed=1)


def test_train_eval_disjoint():
    fam = BifurcationFamily(BifurcationConfig(horizon=12, num_decisive=3, num_actions=4))
    train = fam.instances("train", 512, seed=0)
    ev = fam.instances("eval", 128, seed=0)
    assert not {i.task_id for i in train} & {i.task_id for i in ev}
    assert not {i.seed for i in train} & {i.seed for i in ev}
    assert len({i.seed for i in train}) == 512
    # with a large layout space the instance layouts themselves are disjoint too
    key = lambda i: json.dumps(i.spec, sort_keys=True)  # noqa: E731
    assert not {key(i) for i in train} & {key(i) for i in ev}
    assert all(i.split == "train" for i in train) and all(i.split == "eval" for i in ev)
    with pytest.raises(ValueError):
        fam.instances("test", 3, seed=0)


def test_instance_structure():
    cfg = BifurcationConfig(horizon=8, num_decisive=3, num_actions=4, distractors=False)
    fam = BifurcationFamily(cfg)
    for inst in fam.instances("train", 20, seed=0):
        s = inst.spec
        assert len(s["decisive"]) == 3 and s["decisive"] == sorted(set(s["decisive"]))
        for t in range(8):
            if t in s["decisive"]:
                assert s["cues"][t] in "abcd" and s["answers"][t] == fam.rule[s["cues"][t]]
            else:
                assert s["cues"][t] == "-" and s["answers"][t] is None


def test_rule_is_derangement():
    for n in range(2, 7):
        for seed in range(5):
            rule = make_rule(seed, n)
            assert sorted(rule.values()) == list(LETTERS[:n])
            assert all(rule[c] != c.upper() for c in rule)
    assert len({tuple(make_rule(s, 4).items()) for s in range(20)}) > 1


def _scripted_optimal(fam, env, obs):
    cue = obs.strip().split("\n")[-1].split()[2]  # "t3 cue b :" -> "b"
    return format_action(fam.rule.get(cue, "A"))


@pytest.mark.parametrize("distractors", [True, False])
def test_scripted_optimal_agent_always_succeeds(distractors):
    cfg = BifurcationConfig(horizon=6, num_decisive=3, num_actions=4, distractors=distractors,
                            terminate_on_error=True, decisive_reward=0.25)
    fam = BifurcationFamily(cfg)
    for inst in fam.instances("eval", 30, seed=3):
        env = fam.make(inst, episode_seed=9)
        obs = env.reset()
        total = 0.0
        while True:
            r = env.step(_scripted_optimal(fam, env, obs))
            total += r.reward
            obs = r.observation
            if r.done:
                break
        assert r.success and r.reason == "success" and r.observation == "done: success"
        assert r.info["terminal_reward"] == 1.0
        assert total == pytest.approx(1.0 + 0.25 * 3)
        V, _ = exact_values(inst.spec, replace(cfg, reference_policy="optimal"))
        assert V[0][1] == pytest.approx(total)


def test_uniform_random_agent_matches_dp_value():
    cfg = BifurcationConfig(horizon=5, num_decisive=2, num_actions=3, slip_prob=0.2)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=4)[0]
    V, _ = exact_values(inst.spec, cfg)
    p = V[0][1]  # decisive_reward = 0: V(s_0) is the success probability under uniform
    rng = random.Random(123)
    n = 4000
    wins = 0
    for ep in range(n):
        env = fam.make(inst, episode_seed=ep)
        env.reset()
        while True:
            r = env.step(format_action(rng.choice("ABC")))
            if r.done:
                break
        wins += r.success
    assert p == pytest.approx((1 / 3) ** 2 * 0.8 ** 2)
    assert abs(wins / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_invalid_actions():
    cfg = BifurcationConfig(horizon=4, num_decisive=1, num_actions=2)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=0)[0]
    routine = next(t for t in range(4) if t not in inst.spec["decisive"])
    for bad in ["C", " a\n", "AB", "", " \n", "A B", "A\nB", "!", "A.\n"]:
        assert parse_action(bad, 2) is None, bad
    for good in ["A", " A\n", "A\n", "  B  ", "\tB"]:
        assert parse_action(good, 2) in ("A", "B")
    # an invalid action on a routine turn fails the episode (format errors fail)
    env = fam.make(inst)
    env.reset()
    for t in range(4):
        text = "Z\n" if t == routine else format_action(inst.spec["answers"][t] or "A")
        r = env.step(text)
        if t == routine:
            assert r.action is None and r.info["valid"] is False
    assert r.done and not r.success and r.reason == "failure" and r.info["terminal_reward"] == 0.0
    assert env.actions[routine] is None
    # terminate_on_error: an invalid action ends the episode at once
    fam2 = BifurcationFamily(replace(cfg, terminate_on_error=True))
    env = fam2.make(inst)
    env.reset()
    r = env.step("hello\n")
    assert r.done and not r.success and r.reason == "invalid_action" and r.observation == "done: failure"
    assert r.state_key.endswith("|end|t=1|on=0")
    with pytest.raises(RuntimeError):
        env.step("A\n")
    # a wrong decisive action with terminate_on_error ends with reason failure
    d = inst.spec["decisive"][0]
    wrong = "A" if inst.spec["answers"][d] == "B" else "B"
    env = fam2.make(inst)
    env.reset()
    for t in range(d):
        env.step("A\n")
    r = env.step(format_action(wrong))
    assert r.done and r.reason == "failure" and len(env.actions) == d + 1


def test_text_protocol_round_trip():
    cfg = BifurcationConfig(horizon=5, num_decisive=2, num_actions=2, mark_decisive=True)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=0)[0]
    env = fam.make(inst)
    prompt = env.reset()
    assert prompt.startswith("Follow the rule. Answer with one letter: A B.\n")
    assert re.search(r"cue [a-z]$", prompt)  # the observation ends with the cue
    transcript = prompt
    obs_list = []
    for t in range(5):
        action = format_action(fam.rule.get(inst.spec["cues"][t], "A"))
        assert action.endswith(STOP_TEXT) and action.count("\n") == 1
        r = env.step(action)
        transcript += action + r.observation
        obs_list.append(r.observation)
        assert not r.observation.startswith("\n")  # the action's newline already ended the line
        if not r.done:
            assert re.fullmatch(rf"t{t + 2}( !)? cue [a-z]", r.observation)
            assert (" ! " in r.observation) == ((t + 1) in inst.spec["decisive"])
    assert r.observation == "done: success"
    lines = transcript.split("\n")
    assert lines[0] == "Follow the rule. Answer with one letter: A B."
    for t, line in enumerate(lines[1:6]):
        m = re.fullmatch(rf"t{t + 1}( !)? cue ([a-z]) ([AB])", line)
        assert m, line
    assert lines[6] == "done: success"
    # an action without the trailing newline: the observation starts a fresh line itself
    env = fam.make(inst)
    env.reset()
    r = env.step("A")
    assert r.observation.startswith("\nt2") and r.action == "A"


def test_docstring_example_transcript():
    from environments.base import TaskInstance

    fam = BifurcationFamily(BifurcationConfig(horizon=3, num_decisive=1))
    assert fam.rule == {"a": "B", "b": "A"}  # the only derangement of two letters
    spec = {"horizon": 3, "num_actions": 2, "decisive": [1], "cues": ["a", "b", "a"],
            "answers": [None, "A", None], "rule_seed": 0}
    env = fam.make(TaskInstance("doc", "train", 0, spec))
    text = env.reset()
    for a in (" A\n", " A\n", " B\n"):
        r = env.step(a)
        text += a + r.observation
    assert text == (
        "Follow the rule. Answer with one letter: A B.\n"
        "t1 cue a A\n"
        "t2 cue b A\n"
        "t3 cue a B\n"
        "done: success"
    )
    assert r.success and r.reward == 1.0


def test_state_keys_identify_true_state():
    cfg = BifurcationConfig(horizon=5, num_decisive=2, num_actions=2)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=0)[0]
    ans = inst.spec["answers"]
    d0 = inst.spec["decisive"][0]

    def keys(acts):
        env = fam.make(inst, episode_seed=len(acts))
        env.reset()
        out = [env.state_key()]
        for a in acts:
            out.append(env.step(format_action(a)).state_key)
        return out

    k_right = keys([ans[t] or "A" for t in range(5)])
    k_right2 = keys([ans[t] or "B" for t in range(5)])
    flipped = [ans[t] or "A" for t in range(5)]
    flipped[d0] = "A" if ans[d0] == "B" else "B"
    k_wrong = keys(flipped)
    assert k_right == k_right2  # routine choices do not change the state
    assert k_right[: d0 + 1] == k_wrong[: d0 + 1]
    assert k_right[d0 + 1] != k_wrong[d0 + 1] and k_wrong[d0 + 1].endswith("on=0")
    assert k_right[-1].endswith("|end|t=5|on=1")
    other = fam.instances("train", 2, seed=0)[1]
    env = fam.make(other)
    env.reset()
    assert env.state_key() != k_right[0]  # different instances are different MDPs


def test_snapshot_restore_and_reseed():
    cfg = BifurcationConfig(horizon=6, num_decisive=6, num_actions=2, slip_prob=0.5)
    fam = BifurcationFamily(cfg)
    inst = fam.instances("train", 1, seed=0)[0]
    ans = inst.spec["answers"]
    env = fam.make(inst, episode_seed=1)
    env.reset()
    env.step(format_action(ans[0]))
    snap = env.snapshot()
    first = [env.step(format_action(ans[t])).state_key for t in range(1, 6)]
    env.restore(snap)
    again = [env.step(format_action(ans[t])).state_key for t in range(1, 6)]
    assert first == again  # same future randomness without reseed
    tables = set()
    for k in range(20):
        env.restore(snap, reseed=k)
        assert env.slips[0] == snap["slips"][0]  # the past is kept
        tables.add(tuple(env.slips))
        res = [env.step(format_action(ans[t])) for t in range(1, 6)]
        # ground truth follows the episode actually played (the reseeded slips)
        gt = env.ground_truth(env.actions)
        on = not env.slips[0]
        for t in range(1, 6):
            assert gt.value[t] == pytest.approx(exact_values(inst.spec, cfg)[0][t][int(on)])
            on = on and not env.slips[t]
        assert res[-1].success == on
    assert len(tables) > 1


def test_warmup_corpus():
    cfg = BifurcationConfig(horizon=6, num_decisive=2, num_actions=3, terminate_on_error=True)
    fam = BifurcationFamily(cfg)
    corpus = fam.warmup_corpus(300, seed=0)
    assert len(corpus) == 300
    counts = Counter()
    lengths = Counter()
    for prompt, turns in corpus:
        assert prompt.startswith("Follow the rule. Answer with one letter: A B C.\n") and re.search(r"cue [a-z]$", prompt)
        lengths[len(turns)] += 1
        for k, (action, obs) in enumerate(turns):
            assert action in (" A\n", " B\n", " C\n")
            counts[action] += 1
            assert not obs.startswith("\n")
            if k < len(turns) - 1:
                assert re.search(r"cue [a-z]$", obs)
            else:
                assert obs in ("done: success", "done: failure")
    total = sum(counts.values())
    for a in (" A\n", " B\n", " C\n"):
        assert abs(counts[a] / total - 1 / 3) < 0.05
    assert len(lengths) > 1  # terminate_on_error gives variable lengths
    # warm-up instances are not the train/eval pools
    train_ids = {i.task_id for i in fam.instances("train", 300, seed=0)}
    assert all(i.task_id not in train_ids for i in [fam.instance("warmup", k, 0) for k in range(10)])


def test_registry_config_describe():
    cls = get_family_class("bifurcation")
    assert cls is BifurcationFamily and cls.Config is BifurcationConfig and not cls.needs_sandbox
    fam = cls(BifurcationConfig(rule_seed=3, train_size=100, eval_size=20))
    d = fam.describe()
    for key in ("source", "size", "filtering", "metric", "benchmark"):
        assert isinstance(d[key], str) and d[key]
    assert "rule_seed=3" in d["source"] and "100" in d["size"] and "20" in d["size"]
    assert d["filtering"] == "none" and d["metric"].startswith("success rate")
    assert fam.pool_size("train") == 100 and fam.pool_size("eval") == 20
    for bad in (dict(num_actions=7), dict(num_actions=1), dict(num_decisive=5), dict(slip_prob=1.5),
                dict(reference_policy="greedy"), dict(horizon=0)):
        with pytest.raises(ValueError):
            BifurcationFamily(BifurcationConfig(**bad))
    assert isinstance(fam.make(fam.instances("train", 1, 0)[0]), BifurcationEnv)


def test_config_fields_have_defaults_and_help():
    from dataclasses import MISSING, fields

    from stages.config_fields import HELP_KEY

    for f in fields(BifurcationConfig):
        assert f.default is not MISSING or f.default_factory is not MISSING, f.name
        assert str(f.metadata.get(HELP_KEY, "")).strip(), f.name
